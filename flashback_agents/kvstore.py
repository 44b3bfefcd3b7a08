"""The on-disk tier below the context pool, and the one file format of a saved context.

A conversation evicted from RAM (or left when the process ends) is written here, so its next step, in
this process or the next one, reloads its keys and values instead of recomputing them (llama.cpp's
``--slot-save-auto``, LMCache for vLLM).

**Format** (``flashback-context-v3``; :meth:`CachedContext.save` writes it too): one safetensors file.
The KV tensors are stored token-major (``k.<layer>``/``v.<layer>``, shape ``[tokens, kv_heads,
head_dim]``), so a prefix is a contiguous byte range that ``safe_open(...).get_slice`` reads alone.
Everything else (token ids, model fingerprint, settings, compaction state, a CRC-32 per 256-token
block of every tensor, a SHA-256 of that JSON) is one JSON object in the safetensors header. One file
per context makes a write atomic with a single ``os.replace``; nothing is pickled.

**Store layout**: ``DIR/<model key>/<content hash>.safetensors``. The model key hashes the model
fingerprint, the adapter's identity (its files' bytes: the KV depends on the adapter) and the dtype,
so two models never see each other's files. A file's name hashes its ids and compaction state, so a
file never changes once written: two processes sharing the directory write to a temporary file and
``os.replace`` it (a reader sees the old file, the new one or none, never half of one), and a reader
keeps an in-memory index built from headers it already read (a chained hash per 256-token block ->
files), so a lookup lists the directory and reads only headers it has not seen. Before any tensor
is used, the stored ids are checked against the request and the loaded blocks against their CRCs;
a corrupt or foreign file is skipped with a :class:`KVStoreWarning` and the tokens are recomputed.

**Ownership**: the store counts and deletes only what it writes: in sub-directories named by a model
key (24 hex digits) that are real directories (a symbolic link is never followed), the files named
``<32 hex digits>.safetensors`` (and its own ``.<name>.<pid>.<id>.tmp`` files). Anything else under the
directory (a model's ``model.safetensors``, other folders) is never deleted and not counted in the byte
budget; a file :meth:`CachedContext.save` wrote into a model-key directory is still read (validated),
never deleted. A new store directory gets a ``.flashback-kvstore`` marker file saying so. A file that
is not a regular file (a FIFO, a device, a link) is skipped without being opened.

**Trust**: the checks above catch damage (a torn write, a bad disk, a foreign or older file), not an
attacker: the CRCs and the header's SHA-256 are recomputable, so whoever can write the store directory
can change stored keys and values (and with them the model's answers) without being detected, as
whoever can write the model's weights can. Keep the directory as private as the weights: a new store
directory is created readable and writable by its owner only (mode 0700), and a store shared between
users must only be shared with users trusted with the model itself.

**Limits**: contexts of hybrid models (recurrent/conv state layers) are not stored by the pool (their
state cannot be cut at an arbitrary prefix); :meth:`CachedContext.save` stores their ids only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
import threading
import time
import uuid
import warnings
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from . import kvcache
from .context import CachedContext, ContextConfig, ContextError, ContextLoadError, common_prefix

if TYPE_CHECKING:
    from .models import LoadedModel

logger = logging.getLogger("flashback_agents")

FORMAT = "flashback-context-v3"
BLOCK_TOKENS = 256  # CRC and index granularity (llama.cpp / vLLM prefix caching use blocks too)
SUFFIX = ".safetensors"
_MAX_HEADER = 256 << 20
MARKER = ".flashback-kvstore"  # written into a directory the store creates (or finds empty)
_KEY_DIR = re.compile(r"[0-9a-f]{24}\Z")  # DIR/<model key>/
_OWN_FILE = re.compile(r"[0-9a-f]{32}" + re.escape(SUFFIX) + r"\Z")  # DIR/<model key>/<content hash>.safetensors
_OWN_TMP = re.compile(r"\.[0-9a-f]{32}" + re.escape(SUFFIX) + r"\.\d+\.[0-9a-f]{8}\.tmp\Z")  # write_context's temp


class KVStoreWarning(UserWarning):
    """A stored context was skipped (corrupt, truncated, foreign or unreadable) and is recomputed.

    Nothing from the file was used. Delete the file (or the store directory) if the warning recurs."""


class KVStoreError(ContextError):
    """A disk store that cannot be used as configured (bad directory or budget)."""


@dataclass(frozen=True)
class KVStoreConfig:
    """Settings of a :class:`DiskKVStore`: where, how many bytes at most (LRU beyond), the smallest
    context worth writing, and the fewest extra tokens a restore must win over memory to be used."""

    directory: str
    max_bytes: int = 16 << 30
    min_tokens: int = BLOCK_TOKENS
    min_gain: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.directory, (str, os.PathLike)) or not str(self.directory):
            raise KVStoreError(f"kv_store_dir must be a directory path, got {self.directory!r}")
        for name in ("max_bytes", "min_tokens", "min_gain"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise KVStoreError(f"{name} must be a non-negative integer, got {v!r}; pass e.g. max_bytes=8 << 30")


@dataclass
class KVStoreStats:
    """What the store did in this process (cumulative)."""

    writes: int = 0
    bytes_written: int = 0
    write_seconds: float = 0.0
    restores: int = 0
    tokens_restored: int = 0
    restore_seconds: float = 0.0
    evicted_files: int = 0
    skipped: int = 0  # corrupt / foreign / vanished files not used

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ------------------------------------------------------------------ model identity
_KEYS: dict[int, tuple[Any, str]] = {}
_KEYS_LOCK = threading.Lock()


def model_key(lm: "LoadedModel") -> str:
    """What a stored KV cache is valid for: weights + tokenizer (``lm.fingerprint``), the adapter's
    files (a merged LoRA on k/v changes every key while the sampled fingerprint may not see it), the
    base-weight probe and the dtype. Computed once per loaded model."""
    with _KEYS_LOCK:
        hit = _KEYS.get(id(lm))
        if hit is not None and hit[0]() is lm:
            return hit[1]
    h = hashlib.sha256(f"{FORMAT}|{lm.fingerprint}|{lm.dtype}".encode())
    h.update(json.dumps(lm.base_fingerprint, sort_keys=True, default=str).encode())
    adapter = getattr(lm, "adapter", None)
    if adapter:
        h.update(b"adapter")
        root = Path(adapter)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        for p in files:
            h.update(str(p.relative_to(root)).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        if not files:
            h.update(str(adapter).encode())
    key = h.hexdigest()[:24]
    with _KEYS_LOCK:
        for dead in [k for k, (ref, _) in _KEYS.items() if ref() is None]:  # bounded by the live models
            del _KEYS[dead]
        _KEYS[id(lm)] = (weakref.ref(lm), key)
    return key


def block_hashes(key: str, ids: Sequence[int]) -> list[str]:
    """Chained hash of every full block of ``ids``: hash j commits to the model key and ids[:j*B]."""
    out, prev = [], key.encode()
    for j in range(len(ids) // BLOCK_TOKENS):
        blk = ids[j * BLOCK_TOKENS:(j + 1) * BLOCK_TOKENS]
        prev = hashlib.blake2b(prev + struct.pack(f"<{len(blk)}q", *blk), digest_size=16).digest()
        out.append(prev.hex())
    return out


# ------------------------------------------------------------------ the file format
def _crcs(t: torch.Tensor) -> list[int]:
    """CRC-32 of each BLOCK_TOKENS-token block of a token-major CPU tensor."""
    rows = t.contiguous().view(torch.uint8).reshape(t.shape[0], -1).numpy()
    return [zlib.crc32(rows[i:i + BLOCK_TOKENS]) for i in range(0, t.shape[0], BLOCK_TOKENS)]


def _meta_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_context(ctx: CachedContext, path: str | os.PathLike, n: int | None = None) -> int:
    """Write the first ``n`` cached tokens of ``ctx`` (default: all cached) atomically; returns bytes.

    The caller holds ``ctx.lock`` or owns ``ctx``. A hybrid model's context is written as ids only."""
    from safetensors.torch import save_file

    lm = ctx.lm
    cache = ctx.cache
    plain = kvcache.is_plain(cache)
    held = kvcache.cache_len(cache) if plain else 0
    n = held if n is None else min(n, held)
    ids = list(ctx.ids[:n] if plain else ctx.ids)
    tensors: dict[str, torch.Tensor] = {}
    checksums = []
    if plain and n:
        for i, (k, v) in enumerate(kvcache.layer_tensors(cache)):
            kt = k[0, :, :n, :].transpose(0, 1).contiguous().cpu()  # token-major: a prefix is a byte prefix
            vt = v[0, :, :n, :].transpose(0, 1).contiguous().cpu()
            tensors[f"k.{i}"], tensors[f"v.{i}"] = kt, vt
            checksums.append([_crcs(kt), _crcs(vt)])
    comp = ctx._compactor
    evicted = None
    if comp is not None and comp._stubs:
        evicted = {"stubs": {k: list(v) for k, v in comp._stubs.items()}, "stub_keys": sorted(comp._stub_keys)}
    meta = {"format": FORMAT, "fingerprint": lm.fingerprint, "model_key": model_key(lm), "model": lm.name,
            "token_ids": ids, "kv_tokens": n if plain else 0, "layers": len(checksums), "block": BLOCK_TOKENS,
            "checksums": checksums, "max_context_tokens": ctx.max_context_tokens, "on_overflow": ctx.on_overflow,
            "low_water": float(ctx.low_water), "prefill_chunk": int(ctx.prefill_chunk), "evicted": evicted,
            "saved_at": time.time()}
    meta["meta_checksum"] = _meta_checksum(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta)})
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors reports I/O errors (EFBIG, ENOSPC) as SafetensorError
            raise _WriteError(path, exc) from exc
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink(missing_ok=True)
    return path.stat().st_size


class _WriteError(KVStoreError, OSError):
    """A context file that could not be written (also an ``OSError``: the store skips it, as it skips any
    failed write; :meth:`CachedContext.save` raises it)."""

    def __init__(self, path: Path, cause: BaseException):
        text = (str(cause).splitlines() or [""])[0][:200]
        code = re.search(r"os error (\d+)", text)
        self.errno = int(code.group(1)) if code else None
        self.strerror = os.strerror(self.errno) if self.errno else text
        self.filename = str(path)
        super().__init__(f"cannot write the context file {path} ({self.strerror}); pass a path on a writable file "
                         "system with room for it (a file this large needs a file system that takes it, not FAT32 "
                         "or a quota-limited one).")

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _open_regular(path: str | os.PathLike):
    """Open a file for reading only if it is a regular file: a FIFO, a device or a socket is refused
    without blocking on it (opened non-blocking, checked with ``fstat`` before any read)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file (a FIFO, device or socket is never read)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_v3_file(path: str | os.PathLike) -> bool:
    """A file that is not a torch zip archive (``PK``): read as format v3 (the loader checks the rest)."""
    try:
        f = _open_regular(path)
    except ValueError:
        return True  # not a regular file: the v3 reader refuses it with a ContextLoadError
    with f:
        return f.read(4) != b"PK\x03\x04"


def _is_offset(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_header(header: Any) -> int:
    """Validate a safetensors header's tensor entries; returns the end of the data they describe."""
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ValueError(f"tensor {name[:40]!r} is not described by a JSON object")
        offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_offset(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name[:40]!r} has malformed data_offsets ({repr(offsets)[:60]})")
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_is_offset(d) for d in shape):
            raise ValueError(f"tensor {name[:40]!r} has a malformed dtype or shape")
        end = max(end, offsets[1])
    return end


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata of a v3 file, read from its header only (no tensor bytes); checked for
    format and integrity (raises :class:`ContextLoadError`)."""
    path = Path(path)
    try:
        with _open_regular(path) as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a safetensors header")
            (size,) = struct.unpack("<Q", head)
            if not 2 <= size <= _MAX_HEADER:
                raise ValueError(f"header size {size}")
            raw = f.read(size)
            if len(raw) != size:
                raise ValueError("truncated header")
            total = os.fstat(f.fileno()).st_size
        header = json.loads(raw)
        end = _check_header(header)
        if 8 + size + end != total:
            raise ValueError(f"truncated or padded: {total} bytes, the header describes {8 + size + end}")
        md = header.get("__metadata__")
        if not isinstance(md, dict) or md.get("format") != FORMAT or not isinstance(md.get("meta"), str):
            raise ValueError(f"no {FORMAT} metadata")
        meta = json.loads(md["meta"])
    except (OSError, ValueError, UnicodeDecodeError, struct.error, RecursionError, MemoryError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:300]
        raise ContextLoadError(f"{path} is not a saved flashback-agents context ({why}); pass a file written by "
                               "CachedContext.save, or rebuild the context.") from None
    _check_meta(meta, path)
    return meta


def _bad(path: Path, what: str) -> ContextLoadError:
    return ContextLoadError(f"{path} is corrupt or not a saved context: {what}. Rebuild the context "
                            "(or save it again) with CachedContext.save.")


def _is_ids(x: Any, limit: int = 2**31) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < limit for t in x)


def _check_meta(meta: Any, path: Path) -> None:
    """Check the stored metadata's shape and checksum (raises :class:`ContextLoadError`, never anything else)."""
    try:
        _check_meta_fields(meta, path)
    except ContextLoadError:
        raise
    except (RecursionError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise _bad(path, f"its metadata is malformed ({type(exc).__name__})") from None


def _check_meta_fields(meta: Any, path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ContextLoadError(f"{path} is not a saved flashback-agents context (format {FORMAT}); pass a file "
                               "written by CachedContext.save.")
    need = ("fingerprint", "model_key", "token_ids", "kv_tokens", "layers", "block", "checksums",
            "max_context_tokens", "on_overflow", "low_water", "prefill_chunk", "evicted", "meta_checksum")
    missing = [k for k in need if k not in meta]
    if missing:
        raise _bad(path, f"missing {missing}")
    if meta["meta_checksum"] != _meta_checksum(meta):
        raise _bad(path, "its checksum does not match its contents (the file was altered or damaged after it "
                         "was saved)")
    if not isinstance(meta["fingerprint"], str) or not isinstance(meta["model_key"], str):
        raise _bad(path, "the model fingerprint is not a string")
    if not _is_ids(meta["token_ids"]):
        raise _bad(path, "token_ids is not a list of integers")
    ev = meta["evicted"]
    if ev is not None and not (isinstance(ev, dict) and isinstance(ev.get("stubs"), dict)
                               and all(isinstance(k, str) and _is_ids(v) for k, v in ev["stubs"].items())
                               and isinstance(ev.get("stub_keys"), list)):
        raise _bad(path, "the record of evicted blocks is malformed")
    kv, layers = meta["kv_tokens"], meta["layers"]
    if not isinstance(kv, int) or not isinstance(layers, int) or meta["block"] != BLOCK_TOKENS or \
            not 0 <= kv <= len(meta["token_ids"]) or (kv and kv != len(meta["token_ids"])):
        raise _bad(path, "the cache length does not match the token ids")
    cs = meta["checksums"]
    nblocks = math.ceil(kv / BLOCK_TOKENS)
    if not isinstance(cs, list) or len(cs) != layers or any(
            not isinstance(p, list) or len(p) != 2 or any(not _is_ids(c, 2**32) or len(c) != nblocks for c in p) for p in cs):
        raise _bad(path, "the block checksums are malformed")


def read_context(lm: "LoadedModel", path: str | os.PathLike, n: int | None = None, *,
                 expect_ids: Sequence[int] | None = None, config: ContextConfig | None = None) -> CachedContext:
    """Load the first ``n`` tokens (default: all) of a v3 file as a context on ``lm``.

    Nothing in the file is taken on faith (against damage; see the module's **Trust** note for tampering):
    the header is checked (format, SHA-256 of the metadata, the model
    fingerprint and key, ids in the vocabulary, settings), ``expect_ids[:n]`` must equal the stored ids,
    and only the blocks covering ``n`` tokens are read, each checked against its CRC-32, dtype, shape and
    for NaN/inf. ``config``: build the context with these settings instead of the stored ones (the pool's).
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        _open_regular(path).close()  # a FIFO or device would block safe_open: refused first
        f_cm = safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a bad header or size
        if not path.exists():
            raise FileNotFoundError(path) from None
        raise ContextLoadError(f"{path} is not a saved flashback-agents context ({type(exc).__name__}: "
                               f"{str(exc)[:200]}); pass a file written by CachedContext.save, or rebuild the "
                               "context.") from None
    with f_cm as f:
        md = f.metadata() or {}
        if md.get("format") != FORMAT or not isinstance(md.get("meta"), str):
            raise ContextLoadError(f"{path} is not a saved flashback-agents context (format {FORMAT}); pass a "
                                   "file written by CachedContext.save.")
        try:
            meta = json.loads(md["meta"])
        except (ValueError, RecursionError) as exc:
            raise _bad(path, "its metadata is nested too deeply" if isinstance(exc, RecursionError)
                       else f"its metadata is not JSON ({str(exc)[:200]})") from None
        _check_meta(meta, path)
        if meta["fingerprint"] != lm.fingerprint:
            raise ContextLoadError(
                f"{path} was saved with another model or tokenizer ({meta.get('model')!r}, fingerprint "
                f"{meta['fingerprint']}); this one is {lm.name!r} ({lm.fingerprint}). Rebuild the context "
                "with this model instead.")
        if meta["model_key"] != model_key(lm):
            raise ContextLoadError(f"{path} was saved with this model but another adapter or dtype (key "
                                   f"{meta['model_key']}, this one {model_key(lm)}); rebuild the context with "
                                   "the adapter and dtype it was saved with, or recompute it.")
        ids = meta["token_ids"]
        vocab = lm.model.get_input_embeddings().weight.shape[0]
        if any(t < 0 or t >= vocab for t in ids):
            raise _bad(path, f"token ids outside this model's vocabulary (0..{vocab - 1})")
        n = len(ids) if n is None else n
        if not 0 <= n <= len(ids):
            raise ContextError(f"cannot load {n} tokens from {path}: it holds {len(ids)}; pass at most that")
        if expect_ids is not None and (len(expect_ids) < n or list(expect_ids[:n]) != ids[:n]):
            raise _bad(path, "its token ids are not the ones its index entry promised")
        ctx = _new_context(lm, meta, path, config)
        ctx._ids = list(ids[:n])
        if not meta["kv_tokens"]:  # a hybrid model (or an empty context): ids only, recomputed when used
            if ids and not kvcache.is_plain(ctx.cache):
                ctx.stats.tokens_recomputed += n
                return ctx
            if ids:
                raise _bad(path, "it holds token ids but no cache for a model that keeps one")
            return ctx
        if not kvcache.is_plain(ctx.cache):
            raise _bad(path, "it holds a per-token cache but this model keeps recurrent state")
        n_layers = len(ctx.cache.layers)
        if meta["layers"] != n_layers:
            raise _bad(path, f"the cache has {meta['layers']} layers, this model {n_layers}")
        if n == 0:
            return ctx
        from .context import _kv_shape

        heads, head_dim = _kv_shape(lm)
        m = min(len(ids), math.ceil(n / BLOCK_TOKENS) * BLOCK_TOKENS)  # whole blocks: each one is CRC-checked
        names = set(f.keys())
        tensors = []
        for i in range(n_layers):
            pair = []
            for j, kind in enumerate("kv"):
                name = f"{kind}.{i}"
                if name not in names:
                    raise _bad(path, f"tensor {name} is missing")
                try:
                    t = f.get_slice(name)[0:m]
                except Exception as exc:
                    raise _bad(path, f"tensor {name} cannot be read ({type(exc).__name__})") from None
                if not t.is_floating_point():
                    raise _bad(path, f"layer {i} {kind} has dtype {t.dtype}, not a floating point type")
                if t.dim() != 3 or t.shape[0] != m or (heads is not None and t.shape[1] != heads) or \
                        (head_dim is not None and t.shape[2] != head_dim):
                    raise _bad(path, f"layer {i} {kind} has shape {tuple(t.shape)}; this model needs "
                                     f"[{m}, {heads}, {head_dim}]")
                if _crcs(t) != meta["checksums"][i][j][: math.ceil(m / BLOCK_TOKENS)]:
                    raise _bad(path, f"layer {i} {kind} does not match its checksum (damaged after it was saved)")
                t = t[:n]
                if not math.isfinite(float(t.sum(dtype=torch.float32))):  # NaN/inf anywhere (one fast pass)
                    raise _bad(path, f"layer {i} {kind} holds NaN or infinite values")
                pair.append(t.transpose(0, 1).unsqueeze(0).to(lm.device, lm.dtype))
            tensors.append((pair[0], pair[1]))
    ctx._cache = kvcache.cache_from_tensors(lm.model, tensors, copy=False)
    return ctx


def _new_context(lm: "LoadedModel", meta: dict, path: Path, config: ContextConfig | None) -> CachedContext:
    """An empty context with the stored settings (or ``config``) and the stored compaction state."""
    from_file = config is None
    if config is None:
        budget = meta["max_context_tokens"]
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise _bad(path, f"max_context_tokens is {budget!r}")
        try:
            config = ContextConfig(budget, meta["on_overflow"], meta["low_water"], meta["prefill_chunk"])
        except (ContextError, ValueError, TypeError) as exc:
            raise _bad(path, f"its settings are invalid ({exc})") from None
    try:
        ctx = CachedContext(lm, config=config)
        if config.on_overflow != "error":
            ctx.compactor  # noqa: B018 - builds it now, so a bad budget/low_water raises here
    except (ContextError, ValueError) as exc:
        raise _bad(path, f"settings {config} ({exc})") from exc
    if from_file and len(meta["token_ids"]) > ctx.max_context_tokens:
        raise _bad(path, f"it holds {len(meta['token_ids'])} tokens but its budget (max_context_tokens, capped at "
                         f"the model's window) is {ctx.max_context_tokens}")
    evicted = meta["evicted"]
    if evicted is not None:
        vocab = lm.model.get_input_embeddings().weight.shape[0]
        stubs = evicted.get("stubs") if isinstance(evicted, dict) else None
        keys = evicted.get("stub_keys") if isinstance(evicted, dict) else None
        if not isinstance(stubs, dict) or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) \
                or any(not _is_ids(s) or any(not 0 <= t < vocab for t in s) for s in stubs.values()):
            raise _bad(path, "the record of evicted blocks is malformed")
        if from_file and ctx.on_overflow == "error":
            raise _bad(path, "it records evicted blocks but on_overflow is 'error'")
        if ctx.on_overflow != "error":
            ctx.compactor._stubs = {k: list(v) for k, v in stubs.items()}
            ctx.compactor._stub_keys = set(keys)
    return ctx


# ------------------------------------------------------------------ the store
@dataclass
class StoredEntry:
    """One stored context as the index knows it (from its header)."""

    path: Path
    ids: list[int]
    blocks: list[str]
    stubs: dict[str, list[int]] | None
    nbytes: int
    mtime: float = 0.0
    _compactor: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)


class DiskKVStore:
    """Contexts on disk, found by longest common prefix, bounded by a byte budget (LRU by access).

    Safe to share between processes: files are immutable and named by content, written to a
    temporary file and ``os.replace``d; a file that vanishes (another process evicted it) is a miss.
    """

    def __init__(self, directory: str | os.PathLike, *, max_bytes: int = 16 << 30, min_tokens: int = BLOCK_TOKENS,
                 min_gain: int = 64, config: KVStoreConfig | None = None):
        if config is None and (isinstance(directory, bool) or not isinstance(directory, (str, os.PathLike))
                               or not str(directory).strip()):
            raise KVStoreError(f"DiskKVStore takes a directory path (str or Path), got {type(directory).__name__} "
                               f"{directory!r:.60}; pass e.g. DiskKVStore('~/.cache/flashback-agents/kv').")
        self.config = config or KVStoreConfig(str(directory), max_bytes, min_tokens, min_gain)
        self.directory = Path(os.path.expanduser(str(self.config.directory)))
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # private when new: see **Trust**
            with os.scandir(self.directory) as it:
                empty = next(it, None) is None
            if empty:  # new (or empty): say whose it is
                (self.directory / MARKER).write_text(
                    "A flashback-agents KV store (flashback_agents.kvstore.DiskKVStore). Its byte budget and "
                    "clear() delete only <24 hex digits>/<32 hex digits>.safetensors files in it (and their "
                    ".tmp files); nothing else here is touched.\n", encoding="utf-8")
        except OSError as exc:
            raise KVStoreError(f"cannot create the KV store directory {self.directory} ({exc}); pass a writable "
                               "kv_store_dir") from exc
        self.stats = KVStoreStats()
        self._lock = threading.RLock()
        self._index: dict[str, dict[str, StoredEntry]] = {}  # model key -> file name -> entry
        self._by_block: dict[str, dict[str, set[str]]] = {}  # model key -> block hash -> file names
        self._warned: set[str] = set()

    @property
    def max_bytes(self) -> int:
        return self.config.max_bytes

    @property
    def min_tokens(self) -> int:
        return self.config.min_tokens

    @property
    def min_gain(self) -> int:
        return self.config.min_gain

    def __repr__(self) -> str:
        return f"DiskKVStore({str(self.directory)!r}, max_bytes={self.max_bytes})"

    # -------------------------------------------------------------- index
    def _dir(self, key: str) -> Path:
        return self.directory / key

    def _key_dirs(self) -> list[os.DirEntry]:
        """The store's own sub-directories: named by a model key, real directories (links not followed)."""
        try:
            with os.scandir(self.directory) as it:
                return [e for e in it if _KEY_DIR.match(e.name) and e.is_dir(follow_symlinks=False)]
        except OSError:
            return []

    @staticmethod
    def _own_files(sub: str | os.PathLike, tmp: bool = False) -> list[tuple[os.DirEntry, os.stat_result]]:
        """Regular files (never links) in one of the store's sub-directories named as the store names
        them: its stored contexts, or (``tmp``) its temporary files."""
        pattern = _OWN_TMP if tmp else _OWN_FILE
        out = []
        try:
            with os.scandir(sub) as it:
                for e in it:
                    if not pattern.match(e.name):
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        out.append((e, st))
        except OSError:
            pass
        return out

    def _owned(self, path: Path) -> bool:
        """Whether the store wrote ``path`` (its naming, in one of its real sub-directories, a regular
        file): only such a file is ever deleted."""
        parent = path.parent
        if parent.parent != self.directory or not _KEY_DIR.match(parent.name) or not _OWN_FILE.match(path.name):
            return False
        try:
            return stat.S_ISDIR(os.lstat(parent).st_mode) and stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            return False

    def _skip(self, path: Path, why: str, delete: bool = False) -> None:
        """Warn once about a file that is not used; a corrupt one the store wrote is deleted (it can only
        come back rewritten, under the same content name); any other is left and ignored from now on."""
        self.stats.skipped += 1
        if delete and self._owned(path):
            try:
                path.unlink()
            except OSError:
                pass
        else:
            delete = False
        if str(path) not in self._warned:
            if not delete:
                self._warned.add(str(path))
            msg = f"flashback-agents: skipped the stored context {path}: {why}; its tokens are recomputed."
            logger.warning(msg)
            warnings.warn(msg, KVStoreWarning, stacklevel=4)

    def _refresh(self, key: str) -> dict[str, StoredEntry]:
        """Bring this process's index of ``key``'s directory up to date (reads new headers only)."""
        d = self._dir(key)
        names: dict[str, os.DirEntry] = {}
        if d.is_symlink():
            if str(d) not in self._warned:
                self._skip(d, "it is a symbolic link, which the store never follows")
        else:
            try:
                with os.scandir(d) as it:
                    names = {e.name: e for e in it if e.name.endswith(SUFFIX) and not e.name.startswith(".")}
            except (FileNotFoundError, NotADirectoryError):
                names = {}
        index = self._index.setdefault(key, {})
        by_block = self._by_block.setdefault(key, {})
        for gone in [n for n in index if n not in names]:
            self._forget(key, gone)
        for name, de in names.items():
            if name in index or str(de.path) in self._warned:
                continue
            path = Path(de.path)
            try:
                st = de.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a link may lead anywhere: never opened
                    self._skip(path, "it is not a regular file (a link, FIFO or device is never opened)")
                    continue
                meta = read_meta(path)
            except FileNotFoundError:
                continue
            except ContextLoadError as exc:
                self._skip(path, str(exc), delete=True)
                continue
            except Exception as exc:  # noqa: BLE001 - whatever a file holds, it is skipped, never raised
                self._skip(path, f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            if meta["model_key"] != key:
                self._skip(path, f"it was written for another model (key {meta['model_key']}, this one {key})")
                continue
            ids = meta["token_ids"]
            stubs = meta["evicted"]["stubs"] if isinstance(meta["evicted"], dict) else None
            entry = StoredEntry(path, ids, block_hashes(key, ids), stubs or None, st.st_size, st.st_mtime)
            index[name] = entry
            for h in entry.blocks:
                by_block.setdefault(h, set()).add(name)
        return index

    def _forget(self, key: str, name: str) -> None:
        entry = self._index.get(key, {}).pop(name, None)
        if entry is not None:
            by_block = self._by_block.get(key, {})
            for h in entry.blocks:
                s = by_block.get(h)
                if s is not None:
                    s.discard(name)
                    if not s:
                        del by_block[h]

    def entries(self, lm: "LoadedModel") -> list[StoredEntry]:
        """The stored contexts of ``lm`` (refreshed from the directory)."""
        with self._lock:
            return list(self._refresh(model_key(lm)).values())

    # -------------------------------------------------------------- lookup
    def longest_prefix(self, lm: "LoadedModel", ids: Sequence[int],
                       on_overflow: str = "error") -> tuple[StoredEntry | None, int]:
        """The stored context sharing the longest prefix with ``ids`` and that length (``(None, 0)``
        when none shares a whole block). With compaction (``on_overflow`` not "error"), a stored
        context's evicted blocks are replaced by their stubs in ``ids`` before comparing."""
        key = model_key(lm)
        ids = list(ids)
        with self._lock:
            index = self._refresh(key)
            if not index:
                return None, 0
            by_block = self._by_block.get(key, {})
            hashes = block_hashes(key, ids)
            cands: set[str] = set()
            for h in reversed(hashes):  # deepest block that some file shares
                if h in by_block:
                    cands = set(by_block[h])
                    break
            if on_overflow != "error":
                cands |= {n for n, e in index.items() if e.stubs}
            best, best_n = None, 0
            for name in cands:
                e = index.get(name)
                if e is None:
                    continue
                view = ids
                if e.stubs:
                    if on_overflow == "error":
                        continue
                    try:
                        view = self._apply_stubs(lm, e, ids)
                    except Exception as exc:  # noqa: BLE001 - a crafted stub record: never trusted
                        self._forget(key, name)
                        self._skip(e.path, f"its record of evicted blocks cannot be applied ({exc})")
                        continue
                n = common_prefix(e.ids, view)
                if n > best_n or (n == best_n and best is not None and e.mtime > best.mtime):
                    best, best_n = e, n
            if best is None or best_n < min(self.min_tokens, BLOCK_TOKENS):
                return None, 0
            return best, best_n

    @staticmethod
    def _apply_stubs(lm: "LoadedModel", e: StoredEntry, ids: list[int]) -> list[int]:
        from .compaction import Compactor

        if e._compactor is None:
            e._compactor = Compactor(tokens=lm, budget=max(16, len(e.ids)))
            e._compactor._stubs = {k: list(v) for k, v in e.stubs.items()}
        return e._compactor.apply(ids)

    def load(self, entry: StoredEntry, lm: "LoadedModel", n: int, ids: Sequence[int] | None = None,
             config: ContextConfig | None = None) -> CachedContext | None:
        """The first ``n`` tokens of ``entry`` as a new context (``config``: its settings), or None when
        the file is gone, corrupt or foreign (skipped with a :class:`KVStoreWarning`: recompute)."""
        t0 = time.perf_counter()
        try:
            expect = entry.ids if ids is None else (self._apply_stubs(lm, entry, list(ids)) if entry.stubs else ids)
            ctx = read_context(lm, entry.path, n, expect_ids=expect, config=config)
        except FileNotFoundError:
            with self._lock:
                self._forget(model_key(lm), entry.path.name)
            self.stats.skipped += 1
            return None
        except Exception as exc:  # noqa: BLE001 - whatever a file does, it is skipped and recomputed
            with self._lock:
                self._forget(model_key(lm), entry.path.name)
                self._skip(entry.path, f"{type(exc).__name__}: {exc}", delete=isinstance(exc, ContextLoadError)
                           and "another" not in str(exc))
            return None
        try:
            os.utime(entry.path)  # LRU by access: the budget drops the least recently used files first
            entry.mtime = time.time()
        except OSError:
            pass
        self.stats.restores += 1
        self.stats.tokens_restored += n
        self.stats.restore_seconds += time.perf_counter() - t0
        return ctx

    # -------------------------------------------------------------- write
    def storable(self, ctx: CachedContext) -> bool:
        """Worth writing: a plain (per-token) cache of at least ``min_tokens`` cached tokens."""
        return kvcache.is_plain(ctx.cache) and min(len(ctx), ctx.cached_tokens) >= max(1, self.min_tokens)

    def put(self, ctx: CachedContext) -> Path | None:
        """Write ``ctx`` (its cached tokens) unless already stored; drop stored contexts it extends
        and the least recently used ones beyond the byte budget. Returns the file, or None if skipped."""
        if not self.storable(ctx):
            return None
        lm = ctx.lm
        key = model_key(lm)
        with ctx.lock:
            if len(ctx) == ctx.cached_tokens + 1:  # the last sampled token is pending: one forward, then whole
                ctx.flush()
            n = min(len(ctx), ctx.cached_tokens)
            ids = list(ctx.ids[:n])
            comp = ctx._compactor
            stubs = {k: list(v) for k, v in comp._stubs.items()} if comp is not None and comp._stubs else None
            per_token = sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k, _ in kvcache.layer_tensors(ctx.cache))
            if per_token * n > self.max_bytes:
                return None
            h = hashlib.blake2b(key.encode(), digest_size=16)
            h.update(struct.pack(f"<{n}q", *ids))
            h.update(json.dumps(stubs, sort_keys=True).encode())
            path = self._dir(key) / (h.hexdigest() + SUFFIX)
            if self._dir(key).is_symlink():  # never written through a link out of the store
                if str(self._dir(key)) not in self._warned:
                    self._skip(self._dir(key), "it is a symbolic link, which the store never follows")
                return None
            if path.exists():
                try:
                    os.utime(path)
                    return path
                except OSError:
                    pass
            t0 = time.perf_counter()
            try:
                size = write_context(ctx, path, n)
            except OSError as exc:
                msg = f"flashback-agents: could not write a context to the KV store {self.directory} ({exc})"
                logger.warning(msg)
                warnings.warn(msg, KVStoreWarning, stacklevel=3)
                return None
        self._warned.discard(str(path))
        self.stats.writes += 1
        self.stats.bytes_written += size
        self.stats.write_seconds += time.perf_counter() - t0
        with self._lock:
            index = self._refresh(key)
            new = index.get(path.name)
            if new is not None:  # a stored prefix of this context (same stubs) is now redundant
                for name, e in list(index.items()):
                    if name != path.name and len(e.ids) < n and ids[:len(e.ids)] == e.ids and \
                            (not e.stubs or (stubs and all(stubs.get(k) == v for k, v in e.stubs.items()))):
                        self._remove(key, name, e)
            self._enforce_budget(keep=path)
        return path

    def _remove(self, key: str, name: str, e: StoredEntry) -> None:
        if not self._owned(e.path):  # a file the store did not write (say one CachedContext.save wrote): kept
            return
        try:
            e.path.unlink()
            self.stats.evicted_files += 1
        except FileNotFoundError:
            pass
        except OSError:
            return
        self._forget(key, name)

    def _enforce_budget(self, keep: Path | None = None) -> None:
        """Delete least recently used stored contexts (of every model in the directory) while over the
        budget; the store's temporary files older than an hour (a writer that died) go too. Only files
        the store wrote are counted or deleted (see the module's *Ownership*)."""
        files = []
        now = time.time()
        for sub in self._key_dirs():
            for de, st in self._own_files(sub.path, tmp=True):
                if now - st.st_mtime > 3600:
                    Path(de.path).unlink(missing_ok=True)
            for de, st in self._own_files(sub.path):
                files.append((st.st_mtime, st.st_size, Path(de.path), sub.name))
        total = sum(f[1] for f in files)
        for mtime, size, path, key in sorted(files):
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            try:
                path.unlink()
                self.stats.evicted_files += 1
            except OSError:
                continue
            total -= size
            self._forget(key, path.name)

    @property
    def nbytes(self) -> int:
        """Bytes of stored contexts in the directory (every model; only files the store wrote)."""
        return sum(st.st_size for sub in self._key_dirs() for _, st in self._own_files(sub.path))

    def clear(self) -> None:
        """Delete every stored context (every model) from the directory: the files the store wrote,
        nothing else."""
        with self._lock:
            for sub in self._key_dirs():
                for de, _ in self._own_files(sub.path):
                    Path(de.path).unlink(missing_ok=True)
            self._index.clear()
            self._by_block.clear()


# ------------------------------------------------------------------ one store object per directory
_STORES: dict[str, DiskKVStore] = {}
_STORES_LOCK = threading.Lock()


def store_path(directory: str | os.PathLike) -> str:
    """The canonical form of a store directory (engines and stores are keyed by it)."""
    if not isinstance(directory, (str, os.PathLike)) or not str(directory).strip():
        raise KVStoreError(f"kv_store_dir must be a directory path, got {directory!r}")
    return str(Path(os.path.expanduser(str(directory))).resolve())


def shared_store(directory: str | os.PathLike, max_bytes: int | None = None) -> DiskKVStore:
    """The process-wide :class:`DiskKVStore` of a directory (engines sharing a directory share its
    index and counters); ``max_bytes`` given again replaces its budget."""
    path = store_path(directory)
    with _STORES_LOCK:
        store = _STORES.get(path)
        if store is None:
            store = _STORES[path] = DiskKVStore(path, **({"max_bytes": max_bytes} if max_bytes is not None else {}))
        elif max_bytes is not None and max_bytes != store.max_bytes:
            store.config = KVStoreConfig(store.config.directory, max_bytes, store.min_tokens, store.min_gain)
        return store
