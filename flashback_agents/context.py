"""CachedContext: a model's token ids and their KV cache, kept in step. The heart of the engine.

Invariant: the cache holds exactly the keys/values of ``token_ids[:cached_tokens]``; at most the last
generated token is *pending* (not yet run: it is run together with whatever comes next, so a turn
never pays an extra forward for it). ``next_token_logits()`` equals a full recompute of
``token_ids`` (to float tolerance) after any sequence of operations.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import kvcache
from .models import LoadedModel

_FORMAT = "flashback-context-v1"


class ContextOverflowError(RuntimeError):
    """The context would exceed its token budget; nothing was changed."""

    def __init__(self, needed: int, limit: int, what: str = "append", compacting: bool = False):
        self.needed, self.limit, self.over = needed, limit, needed - limit
        advice = ("even after evicting every older tool result and evidence block, the system block, "
                  "messages and assistant turns alone are too long. Shorten them or raise max_context_tokens."
                  if compacting else
                  "Shorten the input, roll back or start a new context, or use on_overflow='evict' to drop "
                  "the oldest tool results and evidence automatically.")
        super().__init__(
            f"Context overflow: this {what} needs {needed} tokens but the limit is {limit} "
            f"({needed - limit} too many). Nothing was changed: {advice}"
        )


class ContextLoadError(ValueError):
    """A saved context that cannot be used with this model (other weights, tokenizer or format)."""


@dataclass
class ContextStats:
    """Counters for what the context computed vs reused (cumulative)."""

    tokens_computed: int = 0
    tokens_reused: int = 0
    compactions: int = 0
    tokens_evicted: int = 0
    tokens_recomputed: int = 0  # tail tokens recomputed because of compactions
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decoded_tokens: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SyncResult:
    """What one append/sync did: tokens reused from the cache and tokens newly computed."""

    reused: int
    computed: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class CachedContext:
    """Token ids plus a ``DynamicCache`` covering exactly them; only ever computes new tokens."""

    def __init__(self, lm: LoadedModel, *, max_context_tokens: int | None = None, prefill_chunk: int = 512,
                 on_overflow: str = "error", low_water: float = 0.75):
        from .compaction import ON_OVERFLOW

        if on_overflow not in ON_OVERFLOW:
            raise ValueError(f"on_overflow must be one of {ON_OVERFLOW}, got {on_overflow!r}")
        self.lm = lm
        self.on_overflow = on_overflow
        self.low_water = low_water
        self.last_compaction = None  # the CompactionEvent of the latest sync/append, if any
        self._ids: list[int] = []
        self._cache = kvcache.new_cache(lm.model)
        self._logits: torch.Tensor | None = None  # next-token logits after token_ids, when known
        self.max_context_tokens = min(max_context_tokens or lm.max_positions, lm.max_positions)
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.prefill_chunk = prefill_chunk
        self.stats = ContextStats()
        self.lock = threading.RLock()
        self._layout = None
        self._compactor = None

    # ------------------------------------------------------------------ views
    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def cached_tokens(self) -> int:
        return kvcache.cache_len(self._cache)

    @property
    def nbytes(self) -> int:
        return kvcache.cache_nbytes(self._cache)

    @property
    def cache(self):
        return self._cache

    @property
    def layout(self):
        from .layout import Layout

        if self._layout is None:
            self._layout = Layout(self.lm)
        return self._layout

    @property
    def compactor(self):
        """The context's :class:`~flashback_agents.compaction.Compactor` (remembers evicted blocks)."""
        from .compaction import Compactor

        if self._compactor is None:
            self._compactor = Compactor(self.layout, self.max_context_tokens, self.low_water)
        return self._compactor

    def view_of(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as this context would hold them (blocks it evicted earlier replaced by their stubs)."""
        return self._compactor.apply(ids) if self._compactor is not None else list(ids)

    def text(self) -> str:
        return self.lm.decode(self._ids)

    # -------------------------------------------------------------- compute
    def _check_room(self, total: int, what: str) -> None:
        if total > self.max_context_tokens:
            raise ContextOverflowError(total, self.max_context_tokens, what, self.on_overflow != "error")

    def _validate_ids(self, ids: Sequence[int]) -> list[int]:
        vocab = self.lm.model.get_input_embeddings().weight.shape[0]
        out = []
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int,)) and not (hasattr(t, "__index__")):
                raise TypeError(f"token ids must be integers, got {type(t).__name__}")
            t = int(t)
            if t < 0 or t >= vocab:
                raise ValueError(f"token id {t} is outside the model's vocabulary (0..{vocab - 1})")
            out.append(t)
        return out

    @torch.inference_mode()
    def _run(self, ids: list[int], decode: bool = False) -> torch.Tensor:
        """Run ``ids`` (appended to the cache) in chunks; return the last position's logits.

        On any failure the cache is cropped back, so a failed call changes nothing.
        """
        start = kvcache.cache_len(self._cache)
        t0 = time.perf_counter()
        model = self.lm.model
        device = self.lm.device
        logits = None
        try:
            for i in range(0, len(ids), self.prefill_chunk):
                chunk = torch.tensor([ids[i : i + self.prefill_chunk]], dtype=torch.long, device=device)
                out = model(input_ids=chunk, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[0, -1]
        except BaseException:
            kvcache.crop_to(self._cache, start)
            raise
        dt = time.perf_counter() - t0
        if decode:
            self.stats.decode_seconds += dt
        else:
            self.stats.prefill_seconds += dt
        return logits.float()

    def _truncate(self, n: int) -> None:
        if n < len(self._ids):
            self._ids = self._ids[:n]
            self._logits = None
        if kvcache.cache_len(self._cache) > n:
            kvcache.crop_to(self._cache, n)
            self._logits = None

    def _extend(self, new: list[int]) -> None:
        """Append ids and compute them together with any pending token."""
        self._check_room(len(self._ids) + len(new), "append")
        if not new:
            return
        pending = self._ids[kvcache.cache_len(self._cache):]
        self._logits = self._run(pending + new)
        self._ids.extend(new)
        self.stats.tokens_computed += len(new)

    # ------------------------------------------------------------ public API
    def append(self, text_or_ids: str | Sequence[int]) -> SyncResult:
        """Append text (tokenized without special tokens) or ids; compute only those tokens."""
        with self.lock:
            ids = self.lm.encode(text_or_ids) if isinstance(text_or_ids, str) else self._validate_ids(text_or_ids)
            if self.on_overflow != "error" and len(self._ids) + len(ids) > self.max_context_tokens:
                return self.sync(self._ids + ids)
            self.last_compaction = None
            reused = len(self._ids)
            self._extend(ids)
            self.stats.tokens_reused += reused
            return SyncResult(reused, len(ids))

    def append_evidence(self, text: str, source: str | None = None) -> SyncResult:
        """Append ``<MARK_L> text <MARK_R>``: evidence after what is cached, so nothing is recomputed."""
        return self.append(self.layout.evidence(text, source))

    def sync(self, ids: Sequence[int], reserve: int = 0) -> SyncResult:
        """Make the context hold exactly ``ids``: keep the longest common prefix, compute the rest.

        With ``on_overflow`` "evict" or "shift", blocks evicted earlier are replaced by their stubs,
        and if ``ids`` plus ``reserve`` tokens (room for the reply) exceed the budget, the oldest
        marked blocks are compacted first. ``token_ids`` then differ from ``ids`` accordingly.
        """
        with self.lock:
            ids = self._validate_ids(ids)
            self.last_compaction = None
            if self.on_overflow != "error":
                saved = self.compactor.copy()
                ids, event = self.compactor.compact(ids, reserve=min(reserve, self.max_context_tokens // 4))
                if event is not None:
                    if len(ids) > self.max_context_tokens:
                        self._compactor = saved  # refused: forget the evictions too (nothing changed)
                    self._check_room(len(ids), "sync")
                    self.last_compaction = event
                    self.stats.compactions += 1
                    self.stats.tokens_evicted += event.tokens_evicted
                    if self.on_overflow == "shift":
                        self._shift_to(self.compactor.apply(self._ids))
                    old_view = len(self.compactor.apply(self._ids))  # what was held, in the compacted frame
                    common = common_prefix(self._ids, ids)
                    self._truncate(common)
                    self._extend(ids[common:])
                    self.stats.tokens_reused += common
                    event.tokens_recomputed = max(0, old_view - common) if self.on_overflow == "evict" else 0
                    self.stats.tokens_recomputed += event.tokens_recomputed
                    return SyncResult(common, len(ids) - common)
            self._check_room(len(ids), "sync")
            common = common_prefix(self._ids, ids)
            self._truncate(common)
            self._extend(ids[common:])
            self.stats.tokens_reused += common
            return SyncResult(common, len(ids) - common)

    @torch.inference_mode()
    def _shift_to(self, target: list[int]) -> None:
        """Turn the cached ``self._ids`` into ``target`` (same ids with blocks replaced by stubs) by
        computing only the stubs and rotating the keys after each one (``on_overflow='shift'``)."""
        from .compaction import find_blocks

        self.flush()
        old = self._ids
        if old == target:
            return
        old_blocks = find_blocks(old, self.lm.marker_ids)
        new_blocks = find_blocks(target, self.lm.marker_ids)
        if len(old_blocks) != len(new_blocks):  # not a pure block replacement: recompute instead
            return
        changes = [(o, n) for o, n in zip(old_blocks, new_blocks) if old[o.start:o.end] != target[n.start:n.end]]
        for o, n in reversed(changes):  # last first: earlier indices stay valid
            stub = target[n.start:n.end]

            def compute(stub=stub) -> None:
                self._run(stub)

            kvcache.replace_span_shifted(self.lm.model, self._cache, o.start, o.end, compute, len(stub))
            self.stats.tokens_recomputed += len(stub)
            self.stats.tokens_computed += len(stub)
            self._ids = self._ids[:o.start] + stub + self._ids[o.end:]
        self._logits = None

    def rollback(self, n_tokens: int) -> None:
        """Forget the last ``n_tokens`` tokens (and their cache)."""
        with self.lock:
            if not isinstance(n_tokens, int) or n_tokens < 0:
                raise ValueError(f"rollback needs a non-negative token count, got {n_tokens!r}")
            if n_tokens > len(self._ids):
                raise ValueError(f"cannot roll back {n_tokens} tokens: the context holds {len(self._ids)}")
            self._truncate(len(self._ids) - n_tokens)

    def reset(self) -> None:
        with self.lock:
            self._truncate(0)

    def next_token_logits(self) -> torch.Tensor:
        """Logits for the token after ``token_ids`` (float32, shape [vocab])."""
        with self.lock:
            if not self._ids:
                raise ValueError("the context is empty: append something first")
            if self._logits is None:
                cached = kvcache.cache_len(self._cache)
                if cached == len(self._ids):  # logits forgotten (e.g. after a crop): recompute the last token
                    kvcache.crop_to(self._cache, cached - 1)
                    cached -= 1
                self._logits = self._run(self._ids[cached:], decode=True)
            return self._logits

    def push_generated(self, token_id: int) -> None:
        """Record a sampled token as pending: it is run by the next ``next_token_logits``/append."""
        with self.lock:
            if kvcache.cache_len(self._cache) < len(self._ids) and self._logits is None:
                self.next_token_logits()
            self._check_room(len(self._ids) + 1, "generation")
            self._ids.append(int(token_id))
            self._logits = None
            self.stats.decoded_tokens += 1

    def flush(self) -> None:
        """Run any pending token now (so the cache covers all of ``token_ids``)."""
        with self.lock:
            if self._ids and kvcache.cache_len(self._cache) < len(self._ids):
                self.next_token_logits()

    def fork(self) -> "CachedContext":
        """An independent copy (copies the cache: do it only when two conversations really diverge)."""
        return self.fork_prefix(len(self._ids))

    def fork_prefix(self, n: int) -> "CachedContext":
        """An independent context holding a copy of the first ``n`` tokens of this one."""
        with self.lock:
            n = min(n, len(self._ids))
            other = CachedContext(self.lm, max_context_tokens=self.max_context_tokens,
                                  prefill_chunk=self.prefill_chunk, on_overflow=self.on_overflow,
                                  low_water=self.low_water)
            cached = min(n, kvcache.cache_len(self._cache))
            other._cache = kvcache.copy_prefix(self.lm.model, self._cache, cached)
            other._ids = self._ids[:n]
            if n == len(self._ids) and self._logits is not None:
                other._logits = self._logits.clone()
            other._layout = self._layout
            if self._compactor is not None:
                other._compactor = self._compactor.copy()
            return other

    # ----------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save token ids, KV tensors and the model fingerprint (atomically)."""
        with self.lock:
            self.flush()
            tensors = [(k.contiguous().cpu(), v.contiguous().cpu())
                       for k, v in (kvcache.layer_tensors(self._cache) if self._ids else [])]
            payload = {"format": _FORMAT, "fingerprint": self.lm.fingerprint, "model": self.lm.name,
                       "token_ids": list(self._ids), "kv": tensors,
                       "max_context_tokens": self.max_context_tokens}
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(payload, tmp)
            os.replace(tmp, path)

    @classmethod
    def load(cls, lm: LoadedModel, path: str | os.PathLike) -> "CachedContext":
        """Load a saved context; refuse one made with other weights or another tokenizer."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No saved context at {path}")
        try:
            payload = torch.load(path, map_location=lm.device, weights_only=True)
        except Exception as exc:
            raise ContextLoadError(f"{path} is not a saved flashback-agents context ({exc.__class__.__name__}).") from exc
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ContextLoadError(f"{path} is not a saved flashback-agents context (format {_FORMAT}).")
        if payload["fingerprint"] != lm.fingerprint:
            raise ContextLoadError(
                f"{path} was saved with another model or tokenizer ({payload.get('model')!r}, fingerprint "
                f"{payload['fingerprint']}); this one is {lm.name!r} ({lm.fingerprint}). Rebuild the context "
                "with this model instead.")
        ctx = cls(lm, max_context_tokens=payload.get("max_context_tokens"))
        ids = list(payload["token_ids"])
        if ids:
            kv = [(k.to(lm.dtype), v.to(lm.dtype)) for k, v in payload["kv"]]
            if not kv or kv[0][0].shape[-2] != len(ids):
                raise ContextLoadError(f"{path} is corrupt: {len(ids)} ids but a cache of another length.")
            ctx._cache = kvcache.cache_from_tensors(lm.model, kv)
            ctx._ids = ids
        return ctx
