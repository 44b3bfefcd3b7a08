"""CachedContext: a model's token ids and their KV cache, kept in step. The heart of the engine.

Invariant: the cache holds exactly the keys/values of ``token_ids[:cached_tokens]``; at most the last
generated token is *pending* (not yet run: it is run together with whatever comes next, so a turn
never pays an extra forward for it). ``next_token_logits()`` equals a full recompute of
``token_ids`` (to float tolerance) after any sequence of operations.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from . import kvcache
from .errors import FlashBackError
from .models import LoadedModel

_FORMAT = "flashback-context-v2"
_FORMATS = ("flashback-context-v1", _FORMAT)  # v1: no on_overflow / low_water / prefill_chunk / evictions


class ContextOverflowError(RuntimeError, FlashBackError):
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


class ContextError(ValueError, FlashBackError):
    """A call a context cannot honour (bad token ids, bad counts, bad settings); nothing was changed."""


class _ContextTypeError(ContextError, TypeError):
    """A :class:`ContextError` for a value of the wrong type (also a ``TypeError``)."""


class ContextLoadError(ContextError):
    """A saved context that cannot be used with this model (other weights, tokenizer or format, or a
    file that is corrupt or was not written by :meth:`CachedContext.save`)."""


class _ContextFileNotFound(ContextLoadError, FileNotFoundError):
    """No file at the path given to :meth:`CachedContext.load` (also a ``FileNotFoundError``)."""


class _ContextSaveError(ContextError, OSError):
    """:meth:`CachedContext.save` could not write its file (also an ``OSError``, with the ``errno`` of the
    failure: ``EFBIG``, ``ENOSPC``, ``EACCES``, ...)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.errno = getattr(cause, "errno", None)
        self.filename = getattr(cause, "filename", None)

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] ..." form
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ContextConfig:
    """How a context keeps its budget: ``max_context_tokens`` (None: the model's window), what to do
    past it (``on_overflow``: "error", "evict" or "shift"), the fraction compaction shrinks to
    (``low_water``) and the prefill chunk size. Checked once, here (:class:`ContextError`);
    :meth:`budget_for` adds the checks that depend on the model."""

    max_context_tokens: int | None = None
    on_overflow: str = "error"
    low_water: float = 0.75
    prefill_chunk: int = 512

    def __post_init__(self) -> None:
        from .compaction import ON_OVERFLOW

        on_overflow, low_water, budget = self.on_overflow, self.low_water, self.max_context_tokens
        if on_overflow not in ON_OVERFLOW:
            raise ContextError(f"on_overflow must be one of {ON_OVERFLOW}, got {on_overflow!r}")
        if isinstance(low_water, bool) or not isinstance(low_water, (int, float)) or not 0 < low_water <= 1:
            raise ContextError(f"low_water must be a fraction in (0, 1] of the budget, got {low_water!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ContextError(f"max_context_tokens must be a positive integer or None, got {budget!r}")
        if isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1:
            raise ContextError(f"prefill_chunk must be an integer >= 1, got {self.prefill_chunk!r}")

    @classmethod
    def of(cls, config: "ContextConfig | None" = None, **loose: Any) -> "ContextConfig":
        """``config``, or one built from loose keyword arguments (the older way to pass the settings).

        Loose arguments that differ from their defaults conflict with ``config``: pass one or the other."""
        if config is None:
            return cls(**loose)
        if not isinstance(config, ContextConfig):
            raise _ContextTypeError(f"config must be a ContextConfig, got {type(config).__name__}")
        defaults = {f.name: f.default for f in fields(cls)}
        given = [k for k, v in loose.items() if not (type(v) is type(defaults[k]) and v == defaults[k])]
        if given:
            raise ContextError(f"pass either config= or {', '.join(given)}, not both")
        return config

    def budget_for(self, lm: Any) -> int:
        """The token budget on ``lm`` (``max_context_tokens`` capped at its window), once the settings are
        known to work with it (``shift`` needs rotary embeddings; compaction needs room for stubs)."""
        budget = min(self.max_context_tokens or lm.max_positions, lm.max_positions)
        if self.on_overflow == "shift" and kvcache.shift_unsupported_reason(lm.model):
            raise ContextError(f"on_overflow='shift' does not work with this model: "
                               f"{kvcache.shift_unsupported_reason(lm.model)}. Use on_overflow='evict' "
                               "(recomputes the tail after an evicted block) or 'error'.")
        if self.on_overflow != "error" and budget < 16:
            raise ContextError(f"on_overflow={self.on_overflow!r} needs max_context_tokens >= 16 (room for stubs), "
                               f"got {budget}; raise it or use on_overflow='error'.")
        return budget


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
    forwards: int = 0  # model forwards run while decoding (one per token, fewer with speculation)
    drafted: int = 0  # draft tokens verified (prompt lookup + grammar jump-forward; see speculation.py)
    accepted: int = 0  # drafts kept (they equalled the token plain decoding chose)
    forced: int = 0  # accepted drafts that came from grammar jump-forward

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
            self._compactor = Compactor(self.lm, self.max_context_tokens, self.low_water)
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
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise _ContextTypeError(f"token ids must be a sequence of integers, got {type(ids).__name__}; "
                                    "pass text as a str to append() or encode it with lm.encode first.")
        vocab = self.lm.model.get_input_embeddings().weight.shape[0]
        out = []
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int,)) and not (hasattr(t, "__index__")):
                raise _ContextTypeError(f"token ids must be integers, got {type(t).__name__}")
            t = int(t)
            if t < 0 or t >= vocab:
                raise ContextError(f"token id {t} is outside the model's vocabulary (0..{vocab - 1}); "
                                   "encode text with this model's tokenizer (lm.encode).")
            out.append(t)
        return out

    def _encode(self, text: str) -> list[int]:
        """Tokenize ``text``; text the tokenizer cannot take (a lone surrogate) is our error, not its."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ContextError(f"the text contains a character that is not valid Unicode ({exc.reason} at "
                               f"position {exc.start}: {text[exc.start:exc.end]!r}); decode the input with "
                               "errors='replace' or remove the lone surrogate.") from exc
        return self.lm.encode(text)

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
            ids = self._encode(text_or_ids) if isinstance(text_or_ids, str) else self._validate_ids(text_or_ids)
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
            raise _ContextTypeError(f"evidence text must be a str, got {type(text).__name__}")
        for name, value in (("text", text), ("source", source)):
            if value is not None and not isinstance(value, str):
                raise _ContextTypeError(f"evidence {name} must be a str, got {type(value).__name__}")
            if value is not None:
                self._encode(value)  # a clear error for text the tokenizer cannot take
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
            self._cache = cache
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

    def _verify_forward(self, drafts: list[int]) -> torch.Tensor:
        """Run the pending token and ``drafts`` in one forward; the cache then covers them all (the
        caller restores the invariant with :meth:`_accept_verified`, under the same lock hold).

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

    def _accept_verified(self, drafts: list[int], n_ok: int, last: int) -> None:
        """After :meth:`_verify_forward`: keep ``drafts[:n_ok]`` (cached), drop the rest of the drafts
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
            raise _ContextTypeError(f"fork_prefix takes a token count (an int >= 0), got {type(n).__name__} {n!r:.40}; "
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

    # ----------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save token ids, KV tensors, the model fingerprint and every setting that decides what the
        context does next (budget, ``on_overflow``, ``low_water``, ``prefill_chunk``, the blocks it
        evicted), atomically, in the format of the disk KV store (:mod:`flashback_agents.kvstore`:
        safetensors + JSON metadata, nothing pickled)."""
        from .kvstore import write_context

        if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise _ContextTypeError(f"save takes a file path, got {type(path).__name__} {path!r:.60}; pass e.g. "
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
        with self.lock:
            self.flush()
            # A hybrid model's recurrent state is not saved: its ids are recomputed on load (counted).
            try:
                write_context(self, target)
            except FlashBackError:
                raise
            except OSError as exc:
                raise _ContextSaveError(f"cannot save the context to {target} ({exc.strerror or exc}); pass a path "
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
        from .kvstore import is_v3_file, read_context

        path = Path(path)
        if not path.is_file():
            raise _ContextFileNotFound(f"No saved context at {path}: pass the path CachedContext.save wrote.")
        if is_v3_file(path):
            try:
                return read_context(lm, path)
            except FileNotFoundError:
                raise _ContextFileNotFound(f"No saved context at {path}: pass the path CachedContext.save "
                                           "wrote.") from None
        try:  # format v1/v2 (torch zip, read with weights_only=True): still loaded
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ContextLoadError(f"{path} is not a saved flashback-agents context ({exc.__class__.__name__}); "
                                   "pass a file written by CachedContext.save, or rebuild the context.") from exc
        return cls._from_payload(lm, payload, path)

    @classmethod
    def _from_payload(cls, lm: LoadedModel, payload: object, path: Path) -> "CachedContext":
        def bad(what: str) -> ContextLoadError:
            return ContextLoadError(f"{path} is corrupt or not a saved context: {what}. Rebuild the context "
                                    "(or save it again) with CachedContext.save.")

        if not isinstance(payload, dict) or payload.get("format") not in _FORMATS:
            raise ContextLoadError(f"{path} is not a saved flashback-agents context (format {_FORMAT}); pass a "
                                   "file written by CachedContext.save.")
        v2 = payload["format"] == _FORMAT
        required = ("fingerprint", "token_ids", "kv", "max_context_tokens") + (
            ("on_overflow", "low_water", "prefill_chunk", "evicted", "checksum") if v2 else ())
        missing = [k for k in required if k not in payload]
        if missing:
            raise bad(f"missing {missing}")
        if not isinstance(payload["fingerprint"], str):
            raise bad("the model fingerprint is not a string")
        if payload["fingerprint"] != lm.fingerprint:
            raise ContextLoadError(
                f"{path} was saved with another model or tokenizer ({payload.get('model')!r}, fingerprint "
                f"{payload['fingerprint']}); this one is {lm.name!r} ({lm.fingerprint}). Rebuild the context "
                "with this model instead.")
        ids = payload["token_ids"]
        if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
            raise bad("token_ids is not a list of integers")
        vocab = lm.model.get_input_embeddings().weight.shape[0]
        if any(t < 0 or t >= vocab for t in ids):
            raise bad(f"token ids outside this model's vocabulary (0..{vocab - 1})")
        budget = payload["max_context_tokens"]
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise bad(f"max_context_tokens is {budget!r}")
        held = min(budget or lm.max_positions, lm.max_positions)
        if len(ids) > held:
            raise bad(f"it holds {len(ids)} tokens but its budget (max_context_tokens, capped at the model's "
                      f"window) is {held}")
        settings = {"on_overflow": payload.get("on_overflow", "error"), "low_water": payload.get("low_water", 0.75),
                    "prefill_chunk": payload.get("prefill_chunk", 512)}
        try:
            ctx = cls(lm, max_context_tokens=budget, **settings)
            if settings["on_overflow"] != "error":
                ctx.compactor  # noqa: B018 - builds it now, so a bad budget/low_water raises here
        except (ContextError, ValueError) as exc:
            raise bad(f"settings {settings} with max_context_tokens={budget!r} ({exc})") from exc
        evicted = payload.get("evicted")
        if evicted is not None:
            stubs = evicted.get("stubs") if isinstance(evicted, dict) else None
            keys = evicted.get("stub_keys") if isinstance(evicted, dict) else None
            if not isinstance(stubs, dict) or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise bad("the record of evicted blocks is malformed")
            for k, stub in stubs.items():
                if not isinstance(k, str) or not isinstance(stub, list) or any(
                        isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in stub):
                    raise bad("an evicted block's stub is not a list of valid token ids")
            if settings["on_overflow"] == "error":
                raise bad("it records evicted blocks but on_overflow is 'error'")
            ctx.compactor._stubs = {k: list(v) for k, v in stubs.items()}
            ctx.compactor._stub_keys = set(keys)
        kv = payload["kv"]
        if not ids:
            _verify_checksum(payload, bad)
            return ctx
        if isinstance(kv, (list, tuple)) and not kv and not kvcache.is_plain(ctx._cache):
            _verify_checksum(payload, bad)  # a hybrid model: ids only, recomputed when next used
            ctx._ids = list(ids)
            ctx.stats.tokens_recomputed += len(ids)
            return ctx
        n_layers = len(kvcache.new_cache(lm.model).layers)
        if not isinstance(kv, (list, tuple)) or len(kv) != n_layers:
            raise bad(f"the cache has {len(kv) if isinstance(kv, (list, tuple)) else 'no'} layers, this model {n_layers}")
        heads, head_dim = _kv_shape(lm)
        tensors = []
        for i, pair in enumerate(kv):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, torch.Tensor) for t in pair):
                raise bad(f"layer {i} is not a (keys, values) pair of tensors")
            for name, t in zip(("keys", "values"), pair):
                if not t.is_floating_point():
                    raise bad(f"layer {i} {name} have dtype {t.dtype}, not a floating point type")
                if t.dim() != 4 or t.shape[0] != 1 or t.shape[2] != len(ids):
                    raise bad(f"layer {i} {name} have shape {tuple(t.shape)}; expected [1, heads, {len(ids)}, head_dim] "
                              f"({len(ids)} ids)")
                if (heads is not None and t.shape[1] != heads) or (head_dim is not None and t.shape[3] != head_dim):
                    raise bad(f"layer {i} {name} have shape {tuple(t.shape)}; this model needs "
                              f"[1, {heads}, {len(ids)}, {head_dim}]")
                if not bool(torch.isfinite(t).all()):
                    raise bad(f"layer {i} {name} hold NaN or infinite values")
            tensors.append((pair[0].to(lm.device, lm.dtype), pair[1].to(lm.device, lm.dtype)))
        _verify_checksum(payload, bad)
        ctx._cache = kvcache.cache_from_tensors(lm.model, tensors)
        ctx._ids = list(ids)
        return ctx


def _checksum(payload: dict) -> str:
    """SHA-256 over every field and tensor byte of a saved context: a file altered after ``save``
    (a flipped byte in a key tensor loads as valid floats) is refused instead of silently diverging."""
    h = hashlib.sha256()
    meta = {k: payload[k] for k in sorted(payload) if k not in ("kv", "checksum")}
    h.update(json.dumps(meta, sort_keys=True, default=repr).encode())
    for pair in payload["kv"]:
        for t in pair:
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _verify_checksum(payload: dict, bad) -> None:
    if "checksum" not in payload:  # format v1 had none
        return
    if not isinstance(payload["checksum"], str) or payload["checksum"] != _checksum(payload):
        raise bad("its checksum does not match its contents (the file was altered or damaged after it was saved)")


def _kv_shape(lm: LoadedModel) -> tuple[int | None, int | None]:
    """(kv heads, head size) the model's cache layers have, from its config (None where it does not say)."""
    cfg = lm.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is None and getattr(cfg, "hidden_size", None) and getattr(cfg, "num_attention_heads", None):
        head_dim = cfg.hidden_size // cfg.num_attention_heads
    return (int(heads) if heads else None), (int(head_dim) if head_dim else None)
