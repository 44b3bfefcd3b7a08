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
from typing import Sequence

import torch

from . import kvcache
from .compaction import Compactor, Wrappers, find_blocks
from .contextbase import (ContextConfig, ContextError, ContextFileNotFoundError, ContextLoadError,  # noqa: F401
                          ContextOverflowError, ContextSaveError, ContextState, ContextStats, ContextTypeError,
                          DecodeCounts, SyncResult, check_ids, check_text, common_prefix)
from .contextfile import check_save_path, load_state, write_state
from .errors import FlashBackError
from .layout import Layout
from .models import LoadedModel


class CachedContext:
    """Token ids plus a ``DynamicCache`` covering exactly them; only ever computes new tokens."""

    def __init__(self, lm: LoadedModel, *, config: ContextConfig | None = None, max_context_tokens: int | None = None,
                 prefill_chunk: int = 512, on_overflow: str = "error", low_water: float = 0.75):
        """``config``: the budget settings as one :class:`ContextConfig`; the loose keyword arguments
        still work (one or the other)."""
        config = ContextConfig.of(config, max_context_tokens=max_context_tokens, on_overflow=on_overflow,
                                  low_water=low_water, prefill_chunk=prefill_chunk)
        self.lm = lm
        self.on_overflow = config.on_overflow
        self.low_water = config.low_water
        self.last_compaction = None  # the CompactionEvent of the latest sync/append, if any
        self._ids: list[int] = []
        self._cache = kvcache.new_cache(lm.model)
        self._logits: torch.Tensor | None = None  # next-token logits after token_ids, when known
        self.max_context_tokens = config.budget_for(lm)
        self.prefill_chunk = config.prefill_chunk
        self.stats = ContextStats()
        self.lock = threading.RLock()
        self._layout = None
        self._compactor = None

    # ------------------------------------------------------------------ views
    @property
    def config(self) -> ContextConfig:
        """This context's settings (``max_context_tokens`` as capped at the model's window)."""
        return ContextConfig(self.max_context_tokens, self.on_overflow, self.low_water, self.prefill_chunk)

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def ids(self) -> Sequence[int]:
        """The held token ids, not copied (hot paths: pool matching, logits processors): read only;
        :attr:`token_ids` is a copy to keep."""
        return self._ids

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
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = Layout(self.lm)
        return self._layout

    @property
    def compactor(self):
        """The context's :class:`~flashback_agents.compaction.Compactor` (remembers evicted blocks)."""
        if self._compactor is None:
            self._compactor = Compactor(self.lm, self.max_context_tokens, self.low_water,
                                        wrappers=lambda lm=self.lm: Wrappers.from_layout(Layout(lm)))
        return self._compactor

    def view_of(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as this context would hold them (blocks it evicted earlier replaced by their stubs)."""
        return self._compactor.apply(ids) if self._compactor is not None else list(ids)

    def text(self) -> str:
        return self.lm.decode(self._ids)

    # -------------------------------------------------------------- compute
    def _validate_ids(self, ids: Sequence[int]) -> list[int]:
        return check_ids(ids, self.lm.model.get_input_embeddings().weight.shape[0])

    def _check_room(self, total: int, what: str) -> None:
        if total > self.max_context_tokens:
            raise ContextOverflowError(total, self.max_context_tokens, what, self.on_overflow != "error")

    @torch.inference_mode()
    def _run(self, ids: list[int], decode: bool = False, keep: int = 1) -> torch.Tensor:
        """Run ``ids`` (appended to the cache) in chunks; return the last position's logits
        (``keep`` > 1: the last ``keep`` positions' logits, shape [keep, vocab]).

        On any failure the cache is cropped back, so a failed call changes nothing.
        """
        start = kvcache.cache_len(self._cache)
        t0 = time.perf_counter()
        model = self.lm.model
        device = self.lm.device
        logits = None
        rows = []
        try:
            for i in range(0, len(ids), self.prefill_chunk):
                piece = ids[i : i + self.prefill_chunk]
                chunk = torch.tensor([piece], dtype=torch.long, device=device)
                want = max(1, min(len(piece), i + len(piece) - (len(ids) - keep)))
                out = kvcache.forward(model, chunk, self._cache, logits_to_keep=want)
                logits = out.logits[0, -1]
                if keep > 1 and i + len(piece) > len(ids) - keep:
                    rows.append(out.logits[0, -want:])
                if decode:
                    self.stats.forwards += 1
        except BaseException:
            kvcache.crop_to(self._cache, start)
            raise
        dt = time.perf_counter() - t0
        if decode:
            self.stats.decode_seconds += dt
        else:
            self.stats.prefill_seconds += dt
        if keep > 1:
            return torch.cat(rows)[-keep:].float()
        return logits.float()

    def _truncate(self, n: int) -> None:
        if n < len(self._ids):
            self._ids = self._ids[:n]
            self._logits = None
        if kvcache.cache_len(self._cache) > n:
            kept = kvcache.crop_to(self._cache, n)  # < n: a hybrid model restarted from a state checkpoint
            self.stats.tokens_recomputed += n - kept  # those tokens are now pending: run by the next call
            self._logits = None

    def _extend(self, new: list[int]) -> None:
        """Append ids and compute them together with any pending token."""
        self._check_room(len(self._ids) + len(new), "append")
        if not new:
            return
        pending = self._ids[kvcache.cache_len(self._cache):]
        if kvcache.has_state_layers(self._cache):
            self._logits = self._run_checkpointed(pending + new)
        else:
            self._logits = self._run(pending + new)
        self._ids.extend(new)
        self.stats.tokens_computed += len(new)

    def _run_checkpointed(self, ids: list[int]) -> torch.Tensor:
        """Hybrid models (recurrent/conv state that cannot be cropped): run ``ids`` in pieces that end
        at message ends (an end-of-turn token or ``<MARK_R>``) and take a state checkpoint after each,
        so a later rollback or rewrite restarts from the nearest message boundary, not from token 0."""
        start = kvcache.cache_len(self._cache)
        ends = {*self.lm.eos_token_ids, self.lm.marker_ids[1]}
        cuts = [i + 1 for i, t in enumerate(ids) if t in ends and i + 1 < len(ids)] + [len(ids)]
        try:
            prev = 0
            for cut in cuts:
                logits = self._run(ids[prev:cut])
                kvcache.checkpoint(self._cache)
                prev = cut
        except BaseException:
            kvcache.crop_to(self._cache, start)  # drops the checkpoints taken past ``start`` too
            raise
        return logits

    # ------------------------------------------------------------ public API
    def append(self, text_or_ids: str | Sequence[int]) -> SyncResult:
        """Append text (tokenized without special tokens) or ids; compute only those tokens."""
        with self.lock:
            text = isinstance(text_or_ids, str)
            ids = self.lm.encode(check_text(text_or_ids)) if text else self._validate_ids(text_or_ids)
            if self.on_overflow != "error" and len(self._ids) + len(ids) > self.max_context_tokens:
                return self.sync(self._ids + ids)
            self.last_compaction = None
            reused = len(self._ids)
            self._extend(ids)
            self.stats.tokens_reused += reused
            return SyncResult(reused, len(ids))

    def append_evidence(self, text: str, source: str | None = None) -> SyncResult:
        """Append ``<MARK_L> text <MARK_R>``: evidence after what is cached, so nothing is recomputed."""
        if not isinstance(text, str):
            raise ContextTypeError(f"evidence text must be a str, got {type(text).__name__}")
        for name, value in (("text", text), ("source", source)):
            if value is not None and not isinstance(value, str):
                raise ContextTypeError(f"evidence {name} must be a str, got {type(value).__name__}")
            if value is not None:
                self.lm.encode(check_text(value))  # a clear error for text the tokenizer cannot take
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
                    # shift: 0 once the stubs were spliced in; a change it cannot splice (stubs merged
                    # across tool-call turns) is recomputed like evict, and counted
                    event.tokens_recomputed = max(0, old_view - common)
                    self.stats.tokens_recomputed += event.tokens_recomputed
                    return SyncResult(common, len(ids) - common)
            self._check_room(len(ids), "sync")
            common = common_prefix(self._ids, ids)
            before = self.stats.tokens_recomputed
            self._truncate(common)
            self._extend(ids[common:])
            redo = self.stats.tokens_recomputed - before  # hybrid models: re-run from a state checkpoint
            self.stats.tokens_reused += common - redo
            return SyncResult(common - redo, len(ids) - common + redo)

    @torch.inference_mode()
    def _shift_to(self, target: list[int]) -> None:
        """Turn the cached ``self._ids`` into ``target`` (same ids with blocks replaced by stubs) by
        computing only the stubs and rotating the keys after each one (``on_overflow='shift'``)."""
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
            kvcache.replace_span_shifted(self.lm.model, self._cache, o.start, o.end, stub, self._run)
            self.stats.tokens_recomputed += len(stub)
            self.stats.tokens_computed += len(stub)
            self._ids = self._ids[:o.start] + stub + self._ids[o.end:]
        self._logits = None

    def rollback(self, n_tokens: int) -> None:
        """Forget the last ``n_tokens`` tokens (and their cache)."""
        with self.lock:
            if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
                raise ContextError(f"rollback needs a non-negative token count, got {n_tokens!r}")
            if n_tokens > len(self._ids):
                raise ContextError(f"cannot roll back {n_tokens} tokens: the context holds {len(self._ids)}; "
                                   "pass at most len(ctx).")
            self._truncate(len(self._ids) - n_tokens)

    def reset(self) -> None:
        with self.lock:
            self._truncate(0)

    def use_cache(self, cache) -> None:
        """Start over, empty, on ``cache``: an empty KV-cache object of another kind (e.g. transformers'
        own ``DynamicCache``, which the benchmarks measure against); nothing else changes."""
        with self.lock:
            if kvcache.cache_len(cache) != 0:
                raise ContextError(f"use_cache needs an empty cache; this one holds {kvcache.cache_len(cache)} tokens")
            self._truncate(0)
            self._cache = kvcache.adopt(cache)  # the same layers, in the class that owns crop and checkpoints
            self._logits = None

    def next_token_logits(self) -> torch.Tensor:
        """Logits for the token after ``token_ids`` (float32, shape [vocab])."""
        with self.lock:
            if not self._ids:
                raise ContextError("the context is empty: append something first")
            if self._logits is None:
                cached = kvcache.cache_len(self._cache)
                if cached == len(self._ids):  # logits forgotten (e.g. after a crop): recompute the last token
                    kept = kvcache.crop_to(self._cache, cached - 1)
                    self.stats.tokens_recomputed += cached - 1 - kept
                    cached = kept
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

    @property
    def logits_known(self) -> bool:
        """Whether the next-token logits after ``token_ids`` are at hand (:meth:`next_token_logits` then
        runs no forward: the first token after a prompt)."""
        return self._logits is not None

    def verify_forward(self, drafts: list[int]) -> torch.Tensor:
        """Run the pending token and ``drafts`` in one forward; the cache then covers them all (the
        caller restores the invariant with :meth:`accept_verified`, under the same lock hold).

        Returns logits [len(drafts) + 1, vocab]: row ``i`` is the next-token distribution after
        ``token_ids + drafts[:i]``. Plain attention caches only (see ``speculation.plan``).
        """
        with self.lock:
            if not self._ids:
                raise ContextError("the context is empty: append something first")
            self._check_room(len(self._ids) + len(drafts) + 1, "generation")
            cached = kvcache.cache_len(self._cache)
            if cached == len(self._ids) and self._logits is None:  # logits forgotten: rerun the last token
                cached = kvcache.crop_to(self._cache, cached - 1)
            pending = self._ids[cached:]
            if pending:
                return self._run(pending + list(drafts), decode=True, keep=len(drafts) + 1)
            rows = self._run(list(drafts), decode=True, keep=len(drafts))
            return torch.cat([self._logits.unsqueeze(0), rows.reshape(len(drafts), -1)])

    def accept_verified(self, drafts: list[int], n_ok: int, last: int) -> None:
        """After :meth:`verify_forward`: keep ``drafts[:n_ok]`` (cached), drop the rest of the drafts
        from the cache, and push ``last`` (the token chosen after them) as pending."""
        with self.lock:
            base = len(self._ids)
            kvcache.crop_to(self._cache, base + n_ok)
            self._ids.extend(int(t) for t in drafts[:n_ok])
            self._ids.append(int(last))
            self._logits = None
            self.stats.decoded_tokens += n_ok + 1

    def flush(self) -> None:
        """Run any pending token now (so the cache covers all of ``token_ids``)."""
        with self.lock:
            if self._ids and kvcache.cache_len(self._cache) < len(self._ids):
                self.next_token_logits()

    def fork(self) -> "CachedContext":
        """An independent copy (copies the cache: do it only when two conversations really diverge)."""
        return self.fork_prefix(len(self._ids))

    def fork_prefix(self, n: int) -> "CachedContext":
        """An independent context holding a copy of the first ``n`` tokens of this one (all of them when
        ``n`` is at least its length)."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise ContextTypeError(f"fork_prefix takes a token count (an int >= 0), got {type(n).__name__} {n!r:.40}; "
                                   "pass e.g. fork_prefix(len(ctx)).")
        if n < 0:
            raise ContextError(f"fork_prefix takes a token count >= 0, got {n}: pass the number of leading tokens to "
                               "keep (count from the start, not from the end).")
        with self.lock:
            n = min(n, len(self._ids))
            other = CachedContext(self.lm, config=self.config)
            cached = min(n, kvcache.cache_len(self._cache))
            other._cache = kvcache.copy_prefix(self.lm.model, self._cache, cached)
            other.stats.tokens_recomputed += cached - kvcache.cache_len(other._cache)  # hybrid: from a checkpoint
            other._ids = self._ids[:n]
            if n == len(self._ids) and self._logits is not None:
                other._logits = self._logits.clone()
            other._layout = self._layout
            if self._compactor is not None:
                other._compactor = self._compactor.copy()
            return other

    # ----------------------------------------------------------- state
    def state(self) -> ContextState:
        """What the context holds, as one record: its ids, its cache (live, not a copy: hold :attr:`lock`),
        its settings and its compactor's record of evicted blocks."""
        with self.lock:
            record = self._compactor.record() if self._compactor is not None else None
            return ContextState(list(self._ids), self._cache, self.config, record)

    def install(self, ids: Sequence[int], cache=None) -> None:
        """Hold ``ids`` with ``cache``, the keys and values of a prefix of them (normally all; None: an
        empty cache): the tokens past the cache are recomputed when next used (and counted)."""
        with self.lock:
            cache = cache if cache is not None else kvcache.new_cache(self.lm.model)
            if kvcache.cache_len(cache) > len(ids):
                raise ContextError(f"the cache holds {kvcache.cache_len(cache)} tokens but only {len(ids)} ids were "
                                   "given: pass the ids the cache was computed from")
            self._ids, self._cache, self._logits = [int(t) for t in ids], cache, None
            self.stats.tokens_recomputed += len(self._ids) - kvcache.cache_len(cache)

    @classmethod
    def from_state(cls, lm: LoadedModel, state: ContextState) -> "CachedContext":
        """A context on ``lm`` holding ``state`` (its cache is taken, not copied)."""
        ctx = cls(lm, config=state.config)
        if state.evicted and ctx.on_overflow != "error":
            ctx.compactor.restore(state.evicted)
        ctx.install(state.ids, state.cache)
        return ctx

    # ----------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save token ids, KV tensors, the model fingerprint and every setting that decides what the
        context does next (budget, ``on_overflow``, ``low_water``, ``prefill_chunk``, the blocks it
        evicted), atomically, in the one saved-context format (:mod:`flashback_agents.contextfile`:
        safetensors + JSON metadata, nothing pickled)."""
        target = check_save_path(path)
        with self.lock:
            self.flush()
            # A hybrid model's recurrent state is not saved: its ids are recomputed on load (counted).
            try:
                write_state(self.lm, self.state(), target)
            except FlashBackError:
                raise
            except OSError as exc:
                raise ContextSaveError(f"cannot save the context to {target} ({exc.strerror or exc}); pass a path "
                                       "on a writable file system with room for it (nothing was written there).",
                                       exc) from exc

    @classmethod
    def load(cls, lm: LoadedModel, path: str | os.PathLike) -> "CachedContext":
        """Load a saved context; refuse one made with other weights or another tokenizer.

        Reads format v3 (what :meth:`save` writes) and the older torch files (v1/v2).
        The file is not trusted: v1/v2 are read with ``weights_only=True`` (no code runs) and every key,
        type, dtype, shape, id range and length is checked before anything is built, so a corrupt or
        crafted file raises :class:`ContextLoadError` here instead of failing later inside torch.
        """
        return cls.from_state(lm, load_state(lm, path))
