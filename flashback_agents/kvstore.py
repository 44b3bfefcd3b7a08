"""The on-disk tier below the context pool: its files, their index and their byte budget (LRU).

A conversation evicted from RAM (or left when the process ends) is written here, so its next step, in
this process or the next one, reloads its keys and values instead of recomputing them (llama.cpp's
``--slot-save-auto``, LMCache for vLLM).

The files are in the one saved-context format (:mod:`flashback_agents.contextfile`).

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
import os
import stat
import struct
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from . import kvcache
from .compaction import Compactor
from .context import CachedContext, ContextConfig, ContextLoadError, common_prefix
from .kvfiles import (MARKER, SUFFIX, KVStoreError, KVStoreWarning, create_store_dir, delete_all,  # noqa: F401
                      enforce_budget, is_owned, store_path, stored_bytes)
from .contextfile import BLOCK_TOKENS, FORMAT, is_v3_file, model_key, read_meta, read_state, write_state  # noqa: F401

if TYPE_CHECKING:
    from .models import LoadedModel

logger = logging.getLogger("flashback_agents")




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


def block_hashes(key: str, ids: Sequence[int]) -> list[str]:
    """Chained hash of every full block of ``ids``: hash j commits to the model key and ids[:j*B]."""
    out, prev = [], key.encode()
    for j in range(len(ids) // BLOCK_TOKENS):
        blk = ids[j * BLOCK_TOKENS:(j + 1) * BLOCK_TOKENS]
        prev = hashlib.blake2b(prev + struct.pack(f"<{len(blk)}q", *blk), digest_size=16).digest()
        out.append(prev.hex())
    return out


def write_context(ctx: CachedContext, path: str | os.PathLike, n: int | None = None) -> int:
    """Write the first ``n`` cached tokens of ``ctx`` (default: all cached) atomically; returns bytes
    (:func:`flashback_agents.contextfile.write_state`). The caller holds ``ctx.lock`` or owns ``ctx``."""
    return write_state(ctx.lm, ctx.state(), path, n)


def read_context(lm: "LoadedModel", path: str | os.PathLike, n: int | None = None, *,
                 expect_ids: Sequence[int] | None = None, config: ContextConfig | None = None) -> CachedContext:
    """The first ``n`` tokens (default: all) of a v3 file as a context on ``lm`` (``config``: its settings
    instead of the stored ones); every check of :func:`flashback_agents.contextfile.read_state` applies."""
    return CachedContext.from_state(lm, read_state(lm, path, n, expect_ids=expect_ids, config=config))


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

    def apply_stubs(self, lm: "LoadedModel", ids: list[int]) -> list[int]:
        """``ids`` with this entry's evicted spans replaced by their stubs (a compactor built once)."""
        if self._compactor is None:
            self._compactor = Compactor(tokens=lm, budget=max(16, len(self.ids)))
            self._compactor.restore({"stubs": self.stubs})
        return self._compactor.apply(ids)

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
        create_store_dir(self.directory)  # private when new: see **Trust**
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

    def _skip(self, path: Path, why: str, delete: bool = False) -> None:
        """Warn once about a file that is not used; a corrupt one the store wrote is deleted (it can only
        come back rewritten, under the same content name); any other is left and ignored from now on."""
        self.stats.skipped += 1
        if delete and is_owned(self.directory, path):
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
                        view = e.apply_stubs(lm, ids)
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

    def load(self, entry: StoredEntry, lm: "LoadedModel", n: int, ids: Sequence[int] | None = None,
             config: ContextConfig | None = None) -> CachedContext | None:
        """The first ``n`` tokens of ``entry`` as a new context (``config``: its settings), or None when
        the file is gone, corrupt or foreign (skipped with a :class:`KVStoreWarning`: recompute)."""
        t0 = time.perf_counter()
        try:
            expect = entry.ids if ids is None else (entry.apply_stubs(lm, list(ids)) if entry.stubs else ids)
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
            record = ctx.state().evicted
            stubs = record["stubs"] if record else None
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
            for key_, gone in enforce_budget(self.directory, self.max_bytes, keep=path):
                self.stats.evicted_files += 1
                self._forget(key_, gone.name)
        return path

    def _remove(self, key: str, name: str, e: StoredEntry) -> None:
        if not is_owned(self.directory, e.path):  # a file the store did not write (say one CachedContext.save wrote): kept
            return
        try:
            e.path.unlink()
            self.stats.evicted_files += 1
        except FileNotFoundError:
            pass
        except OSError:
            return
        self._forget(key, name)

    @property
    def nbytes(self) -> int:
        """Bytes of stored contexts in the directory (every model; only files the store wrote)."""
        return stored_bytes(self.directory)

    def clear(self) -> None:
        """Delete every stored context (every model) from the directory: the files the store wrote,
        nothing else."""
        with self._lock:
            delete_all(self.directory)
            self._index.clear()
            self._by_block.clear()


# ------------------------------------------------------------------ one store object per directory
_STORES: dict[str, DiskKVStore] = {}

_STORES_LOCK = threading.Lock()


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
