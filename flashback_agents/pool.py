"""ContextPool: several cached contexts for one model, picked by longest common prefix.

Agent frameworks re-send the whole conversation at every step; the pool finds the context whose
tokens share the longest prefix with the new request, so only the new tail is computed. A context
in use by one caller is never handed to another; idle contexts are evicted LRU under a byte budget.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .context import CachedContext, SyncResult, common_prefix
from .models import LoadedModel


@dataclass
class _Entry:
    ctx: CachedContext
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Lease:
    """What ``acquire`` did for this request."""

    ctx: CachedContext
    sync: SyncResult


class ContextPool:
    """Holds contexts for one model; ``acquire(ids)`` yields a synced, exclusively held context."""

    def __init__(self, lm: LoadedModel, *, max_bytes: int = 2 << 30, max_contexts: int = 16,
                 max_context_tokens: int | None = None, on_overflow: str = "error", low_water: float = 0.75):
        self.lm = lm
        self.max_bytes = max_bytes
        self.max_contexts = max_contexts
        self.max_context_tokens = max_context_tokens
        self.on_overflow = on_overflow
        self.low_water = low_water
        self._entries: list[_Entry] = []
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.ctx.nbytes for e in self._entries)

    def _pick(self, ids: Sequence[int]) -> tuple[_Entry, bool]:
        """Best idle entry for ``ids`` (caller holds the lock). Returns (entry, needs_fork)."""
        best, best_len = None, -1
        for e in self._entries:
            if e.busy:
                continue
            n = common_prefix(e.ctx._ids, e.ctx.view_of(ids))
            if n > best_len or (n == best_len and best is not None and len(e.ctx) < len(best.ctx)):
                best, best_len = e, n
        if best is None or best_len == 0:
            entry = _Entry(CachedContext(self.lm, max_context_tokens=self.max_context_tokens,
                                         on_overflow=self.on_overflow, low_water=self.low_water))
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
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._free:
            while all(e.busy for e in self._entries) and len(self._entries) >= self.max_contexts:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("all contexts in the pool are busy")
                self._free.wait(remaining)
            entry, fork = self._pick(ids)
            if fork:
                n = common_prefix(entry.ctx._ids, entry.ctx.view_of(ids))
                entry = _Entry(entry.ctx.fork_prefix(n))
                self._entries.append(entry)
            entry.busy = True
        try:
            result = entry.ctx.sync(ids, reserve=reserve)
            yield Lease(entry.ctx, result)
        finally:
            with self._free:
                entry.busy = False
                entry.last_used = time.monotonic()
                if len(entry.ctx) == 0 and entry in self._entries:
                    self._entries.remove(entry)
                self._evict()
                self._free.notify_all()

    def _evict(self) -> None:
        """Drop least recently used idle contexts while over the byte budget or the count."""
        idle = sorted((e for e in self._entries if not e.busy), key=lambda e: e.last_used)
        total = sum(e.ctx.nbytes for e in self._entries)
        while idle and (total > self.max_bytes or len(self._entries) > self.max_contexts):
            victim = idle.pop(0)
            total -= victim.ctx.nbytes
            self._entries.remove(victim)

    def clear(self) -> None:
        with self._lock:
            self._entries = [e for e in self._entries if e.busy]
