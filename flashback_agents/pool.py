"""ContextPool: several cached contexts for one model, picked by longest common prefix.

Agent frameworks re-send the whole conversation at every step; the pool finds the context whose
tokens share the longest prefix with the new request, so only the new tail is computed. A context
in use by one caller is never handed to another; idle contexts are evicted LRU under a byte budget.

A call never waits behind other callers: when every context is leased (say by streams left open and
unread) and the pool is at ``max_contexts``, the call runs on a fresh *temporary* context that is not
kept in the pool afterwards (counted in the byte budget while it is used, written to the disk tier when
dropped). ``max_contexts=0`` makes every call temporary: nothing is cached in memory.

With a disk tier (``store=``, a :class:`~flashback_agents.kvstore.DiskKVStore`), an evicted context is
written to disk first (and every idle one on :meth:`ContextPool.clear` and at interpreter exit), and
``acquire`` restores the longest stored prefix when it beats what memory holds, so a conversation
survives eviction and process restarts without being recomputed.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .context import CachedContext, ContextConfig, ContextError, SyncResult, common_prefix
from .errors import FlashBackError
from .kvstore import DiskKVStore, KVStoreWarning
from .models import LoadedModel

logger = logging.getLogger("flashback_agents")


class PoolTimeoutError(TimeoutError, FlashBackError):
    """Every context of the pool stayed busy for the whole timeout; nothing was computed.

    Kept for compatibility: a pool no longer waits for a context (a call finding every one leased runs
    on a temporary one), so :meth:`ContextPool.acquire` does not raise it."""


class PoolBudgetWarning(UserWarning):
    """One conversation alone is larger than the pool's byte budget (kept anyway: it is the newest)."""


def check_byte_budget(value: object, name: str = "max_cached_bytes", optional: bool = False) -> None:
    """:class:`ContextError` unless ``value`` is a byte count (an int >= 0; ``None`` too when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ContextError(f"{name} must be a number of bytes (an int >= 0{' or None' if optional else ''}), got "
                           f"{type(value).__name__} {value!r:.40}; pass e.g. {name}=2 << 30 for 2 GiB.")
    if value < 0:
        raise ContextError(f"{name} must be >= 0 bytes, got {value}; pass e.g. {name}=2 << 30 for 2 GiB.")


def check_engine_args(*, max_cached_bytes: object = None, max_context_tokens: object = None,
                      acquire_timeout: object = None) -> None:
    """The checks of :class:`~flashback_agents.chat.ChatEngine`'s settings that must run before the
    engine touches what it shares with the model's other engines (the byte budget) or applies a
    default (``max_context_tokens=0`` is an error, not "the model's window")."""
    check_byte_budget(max_cached_bytes, optional=True)
    if max_context_tokens is not None and (isinstance(max_context_tokens, bool) or
                                           not isinstance(max_context_tokens, int) or max_context_tokens < 1):
        raise ContextError(f"max_context_tokens must be a positive integer (tokens per conversation) or None for the "
                           f"model's window, got {max_context_tokens!r:.40}; pass e.g. max_context_tokens=4096.")
    if acquire_timeout is not None and (isinstance(acquire_timeout, bool) or
                                        not isinstance(acquire_timeout, (int, float)) or
                                        math.isnan(acquire_timeout) or acquire_timeout < 0):
        raise ContextError(f"acquire_timeout must be a number of seconds >= 0 or None (wait forever), got "
                           f"{acquire_timeout!r:.40}; pass e.g. acquire_timeout=300.")


class MemoryBudget:
    """One byte budget (and one lock) shared by every pool of a model.

    Engines with different settings (say two ``max_context_tokens``) each have a pool; without a
    shared budget each pool had its own 2 GiB, so the process-wide cache had no bound. Pools that
    share a budget evict least recently used idle contexts across all of them.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        check_byte_budget(max_bytes, "max_bytes")
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.free = threading.Condition(self.lock)
        self._pools: weakref.WeakSet[ContextPool] = weakref.WeakSet()

    def pools(self) -> list["ContextPool"]:
        return list(self._pools)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pools())


@dataclass
class _Entry:
    ctx: CachedContext
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)
    temporary: bool = False  # a call's context outside the pool's count: dropped when released


@dataclass(frozen=True)
class Lease:
    """What ``acquire`` did for this request."""

    ctx: CachedContext
    sync: SyncResult
    restored: int = 0  # tokens of ``sync.reused`` read back from the disk tier (not in memory before)


class ContextPool:
    """Holds contexts for one model; ``acquire(ids)`` yields a synced, exclusively held context."""

    def __init__(self, lm: LoadedModel, *, max_bytes: int = 2 << 30, max_contexts: int = 16,
                 max_context_tokens: int | None = None, on_overflow: str = "error", low_water: float = 0.75,
                 budget: MemoryBudget | None = None, config: ContextConfig | None = None,
                 store: "DiskKVStore | None" = None):
        """``budget``: a :class:`MemoryBudget` shared with other pools of the same model (then
        ``max_bytes`` is ignored: the shared budget's ``max_bytes`` applies to all of them together).
        ``config``: the settings of every context (:class:`ContextConfig`), or the loose keyword arguments.
        ``store``: a disk tier (:class:`~flashback_agents.kvstore.DiskKVStore`) evicted contexts are
        written to and restored from (None: memory only)."""
        #: the settings every context of this pool gets
        self.config = ContextConfig.of(config, max_context_tokens=max_context_tokens, on_overflow=on_overflow,
                                       low_water=low_water)
        self.lm = lm
        self.budget = budget if budget is not None else MemoryBudget(max_bytes)
        self.budget._pools.add(self)
        if isinstance(max_contexts, bool) or not isinstance(max_contexts, int) or max_contexts < 0:
            raise ContextError(f"max_contexts must be a non-negative integer, got {max_contexts!r}; pass e.g. 16 "
                               "(0: nothing is kept in memory, every call runs on a temporary context)")
        self.max_contexts = max_contexts
        #: calls that found every context leased (or max_contexts=0) and ran on a temporary context
        self.temporary_contexts = 0
        self._entries: list[_Entry] = []
        self._lock = self.budget.lock
        self._free = self.budget.free
        self._warned_oversize = False
        #: the disk tier below this pool (None: memory only)
        self.store = store
        if store is not None:
            _STORED_POOLS.add(self)

    @property
    def max_context_tokens(self) -> int | None:
        return self.config.max_context_tokens

    @property
    def on_overflow(self) -> str:
        return self.config.on_overflow

    @property
    def low_water(self) -> float:
        return self.config.low_water

    @property
    def max_bytes(self) -> int:
        return self.budget.max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        self.budget.max_bytes = value

    def __len__(self) -> int:
        """Contexts kept by the pool (the temporary ones calls are running on are not counted)."""
        return sum(not e.temporary for e in self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.ctx.nbytes for e in self._entries)

    def _pick(self, ids: Sequence[int]) -> tuple[_Entry, bool]:
        """Best idle entry for ``ids`` (caller holds the lock). Returns (entry, needs_fork)."""
        best, best_len = None, -1
        for e in self._entries:
            if e.busy:
                continue
            n = common_prefix(e.ctx.ids, e.ctx.view_of(ids))
            if n > best_len or (n == best_len and best is not None and len(e.ctx) < len(best.ctx)):
                best, best_len = e, n
        if best is None or best_len == 0:
            entry = _Entry(CachedContext(self.lm, config=self.config))
            self._entries.append(entry)
            return entry, False
        # If using `best` would crop away a long tail another conversation may come back to, copy the
        # shared prefix into a new context instead (cost ~ prefix size, far cheaper than recomputing).
        fork = best_len < len(best.ctx) and (len(best.ctx) - best_len) > 64
        return best, fork

    @contextmanager
    def acquire(self, ids: Sequence[int], timeout: float | None = None, reserve: int = 0) -> Iterator[Lease]:
        """Hold the best context for ``ids``, synced to them, for the duration of the ``with`` block.

        ``reserve``: tokens of room wanted for the reply (used by contexts that compact on overflow).

        Never waits for another caller: when every context is leased and the pool already holds
        ``max_contexts``, the call gets a fresh temporary context, counted in the byte budget while it
        is used and dropped when the block ends (written to the disk tier first, if there is one).
        ``timeout`` is accepted for compatibility and not used (there is nothing to wait for).
        """
        # Disk lookup before taking the lock (it lists the store directory): (entry, tokens) or (None, 0)
        disk = self.store.longest_prefix(self.lm, ids, self.config.on_overflow) if self.store is not None \
            else (None, 0)
        restore = None
        with self._free:
            kept = [e for e in self._entries if not e.temporary]
            if len(kept) >= self.max_contexts and all(e.busy for e in kept):
                # every context is leased (or none may be kept): run outside the pool, never wait
                entry, fork = _Entry(CachedContext(self.lm, config=self.config), temporary=True), False
                self._entries.append(entry)  # in the byte budget while in use
                self.temporary_contexts += 1
            else:
                entry, fork = self._pick(ids)
            if disk[0] is not None:
                mem = common_prefix(entry.ctx.ids, entry.ctx.view_of(ids)) if len(entry.ctx) else 0
                if disk[1] >= mem + self.store.min_gain:  # restoring beats memory by enough to pay the read
                    restore, fork = disk, False
                    if len(entry.ctx):
                        entry = _Entry(CachedContext(self.lm, config=self.config), temporary=entry.temporary)
                        self._entries.append(entry)
            if fork:
                n = common_prefix(entry.ctx.ids, entry.ctx.view_of(ids))
                entry = _Entry(entry.ctx.fork_prefix(n))
                self._entries.append(entry)
            entry.busy = True
        evicted: list[tuple[ContextPool, CachedContext]] = []
        try:
            restored = 0
            if restore is not None:  # the entry is busy (ours) and empty: fill it from disk, outside the lock
                loaded = self.store.load(restore[0], self.lm, restore[1], ids, config=self.config)
                if loaded is not None:  # None: gone, corrupt or foreign (warned): recomputed below
                    entry.ctx, restored = loaded, restore[1]
            result = entry.ctx.sync(ids, reserve=reserve)
            yield Lease(entry.ctx, result, min(restored, result.reused))
        finally:
            with self._free:
                entry.busy = False
                entry.last_used = time.monotonic()
                if (len(entry.ctx) == 0 or entry.temporary) and entry in self._entries:
                    self._entries.remove(entry)
                    if entry.temporary and self.store is not None:
                        evicted.append((self, entry.ctx))  # dropped from memory: its conversation goes to disk
                evicted += self._evict(keep=None if entry.temporary else entry)
                self._free.notify_all()
            _persist(evicted)

    def persist(self) -> int:
        """Write every idle context to the disk tier now (they stay in memory); returns how many were
        written. Called at interpreter exit for pools with a store, so a restart resumes from disk."""
        if self.store is None:
            return 0
        with self._lock:
            ctxs = [e.ctx for e in self._entries if not e.busy]
        return _persist([(self, c) for c in ctxs])

    def _evict(self, keep: _Entry | None = None) -> list[tuple["ContextPool", CachedContext]]:
        """Drop least recently used idle contexts (of every pool sharing the budget) while over the byte
        budget, and this pool's while over its count (caller holds the shared lock). Returns the evicted
        contexts a disk tier wants, for the caller to write once the lock is released.

        ``keep`` (the context just released) is never dropped for bytes: a conversation larger than
        the whole budget would otherwise be evicted after every call and reuse nothing next time; it
        is kept alone instead, with a warning.
        """
        pools = self.budget.pools() or [self]
        idle = sorted(((p, e) for p in pools for e in p._entries if not e.busy and e is not keep),
                      key=lambda pe: pe[1].last_used)
        total = sum(e.ctx.nbytes for p in pools for e in p._entries)
        out: list[tuple[ContextPool, CachedContext]] = []
        for p, e in list(idle):
            if p is self and len(self) > self.max_contexts:
                pass
            elif total <= self.max_bytes:
                continue
            total -= e.ctx.nbytes
            p._entries.remove(e)
            if p.store is not None:
                out.append((p, e.ctx))
        if keep is not None and total > self.max_bytes and keep.ctx.nbytes > self.max_bytes \
                and not self._warned_oversize:
            self._warned_oversize = True
            msg = (f"flashback-agents: one conversation holds {keep.ctx.nbytes / 2**20:.1f} MiB of cache, more "
                   f"than the pool's whole budget ({self.max_bytes / 2**20:.1f} MiB); it is kept (the newest) so "
                   "its next step still reuses it. Raise max_cached_bytes, or set max_context_tokens with "
                   "on_overflow='evict'.")
            logger.warning(msg)
            warnings.warn(msg, PoolBudgetWarning, stacklevel=4)
        return out

    def clear(self) -> None:
        """Drop every idle context (written to the disk tier first, if there is one)."""
        with self._lock:
            dropped = [(self, e.ctx) for e in self._entries if not e.busy and self.store is not None]
            self._entries = [e for e in self._entries if e.busy]
        _persist(dropped)


_STORED_POOLS: "weakref.WeakSet[ContextPool]" = weakref.WeakSet()


def _persist(items: list[tuple[ContextPool, CachedContext]]) -> int:
    """Write contexts to their pool's disk tier (no pool lock held); a failure warns, never raises."""
    if not items:
        return 0
    written = 0
    for pool, ctx in items:
        if pool.store is None or not pool.store.storable(ctx):
            continue
        try:
            written += pool.store.put(ctx) is not None
        except Exception as exc:  # a full disk or a vanished directory must not fail the call
            msg = f"flashback-agents: could not write a context to {pool.store} ({type(exc).__name__}: {exc})"
            logger.warning(msg)
            warnings.warn(msg, KVStoreWarning, stacklevel=3)
    return written


@atexit.register
def _persist_all_at_exit() -> None:
    """A process that ends normally leaves its conversations on disk for the next one."""
    for pool in list(_STORED_POOLS):
        try:
            pool.persist()
        except Exception:  # pragma: no cover - interpreter shutdown: best effort
            logger.debug("flashback-agents: could not persist a pool at exit", exc_info=True)
