"""The one file format of a saved context (``flashback-context-v3``), written by ``CachedContext.save`` and
the disk KV store alike and read back as a :class:`~flashback_agents.contextbase.ContextState`; v1/v2 files
are still read (:mod:`.contextfile_legacy`). One safetensors file: KV tensors token-major (``k.<layer>``,
``v.<layer>``, ``[tokens, kv_heads, head_dim]``: a prefix is a byte range ``get_slice`` reads alone); the
ids, model fingerprint and key, settings, compaction state, a CRC-32 per 256-token block of every tensor and
a SHA-256 of that JSON in the header. Written to a temporary file, then ``os.replace``d; nothing pickled.
Everything is checked before use (damage, not an attacker: see :mod:`.kvstore`'s **Trust** note)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import threading
import time
import uuid
import weakref
import zlib
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import torch
from safetensors import safe_open

from . import kvcache
from .contextbase import (ContextConfig, ContextError, ContextLoadError, ContextState, ContextFileNotFoundError,
                          ContextTypeError)
from .contextfile_legacy import kv_shape, read_payload


FORMAT = "flashback-context-v3"

BLOCK_TOKENS = 256  # CRC and index granularity (llama.cpp / vLLM prefix caching use blocks too)

_MAX_HEADER = 256 << 20

# ------------------------------------------------------------------ model identity
_KEYS: dict[int, tuple[Any, str]] = {}

_KEYS_LOCK = threading.Lock()


def model_key(lm: Any) -> str:
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


# ------------------------------------------------------------------ the file format
def _crcs(t: torch.Tensor) -> list[int]:
    """CRC-32 of each BLOCK_TOKENS-token block of a token-major CPU tensor."""
    rows = t.contiguous().view(torch.uint8).reshape(t.shape[0], -1).numpy()
    return [zlib.crc32(rows[i:i + BLOCK_TOKENS]) for i in range(0, t.shape[0], BLOCK_TOKENS)]


def _meta_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_state(lm: Any, state: ContextState, path: str | os.PathLike, n: int | None = None) -> int:
    """Write the first ``n`` cached tokens of a context's ``state`` (default: all cached) atomically; returns
    bytes. ``state`` is :meth:`CachedContext.state` (the caller holds the context's lock or owns it). A hybrid
    model's context is written as ids only."""
    cache = state.cache if state.cache is not None else kvcache.new_cache(lm.model)
    plain = kvcache.is_plain(cache)
    held = kvcache.cache_len(cache) if plain else 0
    n = held if n is None else min(n, held)
    ids = list(state.ids[:n] if plain else state.ids)
    config = state.config
    tensors: dict[str, torch.Tensor] = {}
    checksums = []
    if plain and n:
        for i, (k, v) in enumerate(kvcache.layer_tensors(cache)):
            kt = k[0, :, :n, :].transpose(0, 1).contiguous().cpu()  # token-major: a prefix is a byte prefix
            vt = v[0, :, :n, :].transpose(0, 1).contiguous().cpu()
            tensors[f"k.{i}"], tensors[f"v.{i}"] = kt, vt
            checksums.append([_crcs(kt), _crcs(vt)])
    evicted = state.evicted or None
    meta = {"format": FORMAT, "fingerprint": lm.fingerprint, "model_key": model_key(lm), "model": lm.name,
            "token_ids": ids, "kv_tokens": n if plain else 0, "layers": len(checksums), "block": BLOCK_TOKENS,
            "checksums": checksums, "max_context_tokens": config.max_context_tokens, "on_overflow": config.on_overflow,
            "low_water": float(config.low_water), "prefill_chunk": int(config.prefill_chunk), "evicted": evicted,
            "saved_at": time.time()}
    meta["meta_checksum"] = _meta_checksum(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            safetensors.torch.save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta)})
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors reports I/O errors (EFBIG, ENOSPC) as SafetensorError
            raise _WriteError(path, exc) from exc
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink(missing_ok=True)
    return path.stat().st_size


class _WriteError(ContextError, OSError):
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


def read_state(lm: Any, path: str | os.PathLike, n: int | None = None, *,
               expect_ids: Sequence[int] | None = None, config: ContextConfig | None = None) -> ContextState:
    """The first ``n`` tokens (default: all) of a v3 file, as the state of a context on ``lm``.

    Nothing in the file is taken on faith (against damage; see the module's **Trust** note for tampering):
    the header is checked (format, SHA-256 of the metadata, the model
    fingerprint and key, ids in the vocabulary, settings), ``expect_ids[:n]`` must equal the stored ids,
    and only the blocks covering ``n`` tokens are read, each checked against its CRC-32, dtype, shape and
    for NaN/inf. ``config``: build the context with these settings instead of the stored ones (the pool's).
    """
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
        config, evicted = _settings(lm, meta, path, config)
        state = ContextState(list(ids[:n]), None, config, evicted)
        probe = kvcache.new_cache(lm.model)
        if not meta["kv_tokens"]:  # a hybrid model (or an empty context): ids only, recomputed when used
            if ids and kvcache.is_plain(probe):
                raise _bad(path, "it holds token ids but no cache for a model that keeps one")
            return state
        if not kvcache.is_plain(probe):
            raise _bad(path, "it holds a per-token cache but this model keeps recurrent state")
        n_layers = len(probe.layers)
        if meta["layers"] != n_layers:
            raise _bad(path, f"the cache has {meta['layers']} layers, this model {n_layers}")
        if n == 0:
            return state
        heads, head_dim = kv_shape(lm)
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
    state.cache = kvcache.cache_from_tensors(lm.model, tensors, copy=False)
    return state


def _settings(lm: Any, meta: dict, path: Path, config: ContextConfig | None) -> tuple[ContextConfig, dict | None]:
    """The stored settings (or ``config``) and the stored compaction state, checked against ``lm``."""
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
        budget = config.budget_for(lm)  # a bad budget / low_water for this model raises here
    except (ContextError, ValueError) as exc:
        raise _bad(path, f"settings {config} ({exc})") from exc
    if from_file and len(meta["token_ids"]) > budget:
        raise _bad(path, f"it holds {len(meta['token_ids'])} tokens but its budget (max_context_tokens, capped at "
                         f"the model's window) is {budget}")
    evicted = meta["evicted"]
    if evicted is not None:
        vocab = lm.model.get_input_embeddings().weight.shape[0]
        stubs = evicted.get("stubs") if isinstance(evicted, dict) else None
        keys = evicted.get("stub_keys") if isinstance(evicted, dict) else None
        if not isinstance(stubs, dict) or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) \
                or any(not _is_ids(s) or any(not 0 <= t < vocab for t in s) for s in stubs.values()):
            raise _bad(path, "the record of evicted blocks is malformed")
        if from_file and config.on_overflow == "error":
            raise _bad(path, "it records evicted blocks but on_overflow is 'error'")
        if config.on_overflow != "error":
            return config, {"stubs": {k: list(v) for k, v in stubs.items()}, "stub_keys": list(keys)}
    return config, None


def check_save_path(path: Any) -> Path:
    """The file ``CachedContext.save(path)`` writes, or :class:`ContextError` for a path it cannot be (not a
    path, a directory, under a file)."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ContextTypeError(f"save takes a file path, got {type(path).__name__} {path!r:.60}; pass e.g. "
                               "ctx.save('conversation.safetensors').")
    target = Path(os.path.expanduser(str(path)))
    if target.is_dir():
        raise ContextError(f"{target} is a directory; save takes a file path: pass e.g. "
                           f"ctx.save('{target / 'context.safetensors'}').")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ContextError(f"{target} lies under {parent}, which is a file, not a directory; pass a path "
                                   "in a directory (missing directories are created).")
            break
    return target


def load_state(lm: Any, path: str | os.PathLike) -> ContextState:
    """The state of a saved context on ``lm``: format v3 (what ``save`` writes) or the older torch files
    (v1/v2, read with ``weights_only=True``: no code runs); refused (:class:`ContextLoadError`) when made
    with other weights or another tokenizer, or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ContextFileNotFoundError(f"No saved context at {path}: pass the path CachedContext.save wrote.")
    if is_v3_file(path):
        try:
            return read_state(lm, path)
        except FileNotFoundError:
            raise ContextFileNotFoundError(f"No saved context at {path}: pass the path CachedContext.save "
                                           "wrote.") from None
    try:  # format v1/v2 (torch zip, read with weights_only=True): still loaded
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ContextLoadError(f"{path} is not a saved flashback-agents context ({exc.__class__.__name__}); "
                               "pass a file written by CachedContext.save, or rebuild the context.") from exc
    return read_payload(lm, payload, path)
