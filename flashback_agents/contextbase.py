"""What a context is made of, below :class:`~flashback_agents.context.CachedContext` and the saved-context
file format: its settings (:class:`ContextConfig`), its state as one record (:class:`ContextState`), its
counters (:class:`ContextStats`, :class:`DecodeCounts`, :class:`SyncResult`) and its errors. No compute."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

from . import kvcache
from .compaction import ON_OVERFLOW
from .errors import FlashBackError


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


class ContextTypeError(ContextError, TypeError):
    """A :class:`ContextError` for a value of the wrong type (also a ``TypeError``)."""


class ContextLoadError(ContextError):
    """A saved context that cannot be used with this model (other weights, tokenizer or format, or a
    file that is corrupt or was not written by :meth:`CachedContext.save`)."""


class ContextFileNotFoundError(ContextLoadError, FileNotFoundError):
    """No file at the path given to :meth:`CachedContext.load` (also a ``FileNotFoundError``)."""


class ContextSaveError(ContextError, OSError):
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
            raise ContextTypeError(f"config must be a ContextConfig, got {type(config).__name__}")
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


@dataclass(kw_only=True)
class DecodeCounts:
    """What multi-token decoding did (see :mod:`flashback_agents.speculation`): the one declaration of these
    counters, shared by :class:`ContextStats` (cumulative), ``GenerationResult`` (one generation) and
    ``ChatUsage`` (one call)."""

    forwards: int = 0  # model forwards run while decoding (one per token, fewer with speculation)
    drafted: int = 0  # draft tokens verified (prompt lookup + grammar jump-forward)
    accepted: int = 0  # drafts kept (they equalled the token plain decoding chose)
    forced: int = 0  # accepted drafts that came from grammar jump-forward

    def decode_counts(self) -> "DecodeCounts":
        """These four counters alone, as a new record (a snapshot)."""
        return DecodeCounts(**{f.name: getattr(self, f.name) for f in fields(DecodeCounts)})

    def since(self, before: "DecodeCounts") -> "DecodeCounts":
        """The counts added since the snapshot ``before``."""
        return DecodeCounts(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(DecodeCounts)})

    def as_dict(self) -> dict:
        """Every field of the record (a subclass's too), as a plain dict."""
        return asdict(self)


@dataclass
class ContextStats(DecodeCounts):
    """Counters for what the context computed vs reused (cumulative), and the decoding counters."""

    tokens_computed: int = 0
    tokens_reused: int = 0
    compactions: int = 0
    tokens_evicted: int = 0
    tokens_recomputed: int = 0  # tail tokens recomputed because of compactions
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decoded_tokens: int = 0


@dataclass(frozen=True)
class SyncResult:
    """What one append/sync did: tokens reused from the cache and tokens newly computed."""

    reused: int
    computed: int


@dataclass
class ContextState:
    """Everything a context holds, as one record: what :mod:`flashback_agents.contextfile` writes and reads,
    and what :meth:`CachedContext.state` / :meth:`CachedContext.from_state` give and take.

    ``cache`` holds the keys and values of ``ids[:cached]`` (normally all of them; from
    :meth:`CachedContext.state` it is the live cache, not a copy: hold the context's lock); None when only
    the ids are kept (a hybrid model's saved context): they are recomputed when next used. ``evicted`` is
    the compactor's record of the blocks it replaced by stubs (:meth:`Compactor.record`), or None."""

    ids: list[int]
    cache: Any
    config: ContextConfig
    evicted: dict | None = None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def check_ids(ids: Sequence[int], vocab: int) -> list[int]:
    """``ids`` as a list of ints in ``0..vocab-1``, or :class:`ContextError` saying what is wrong."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ContextTypeError(f"token ids must be a sequence of integers, got {type(ids).__name__}; "
                               "pass text as a str to append() or encode it with lm.encode first.")
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int,)) and not (hasattr(t, "__index__")):
            raise ContextTypeError(f"token ids must be integers, got {type(t).__name__}")
        t = int(t)
        if t < 0 or t >= vocab:
            raise ContextError(f"token id {t} is outside the model's vocabulary (0..{vocab - 1}); "
                               "encode text with this model's tokenizer (lm.encode).")
        out.append(t)
    return out


def invalid_unicode(text: str) -> str | None:
    """What makes ``text`` untokenizable (a lone surrogate), worded for an error message; None if nothing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"contains a character that is not valid Unicode ({exc.reason} at position {exc.start}: "
                f"{text[exc.start:exc.end]!r}); decode the input with errors='replace' or remove the lone surrogate.")
    return None


def check_text(text: str) -> str:
    """``text``, once known to be text a tokenizer can take (a lone surrogate is our error, not its)."""
    problem = invalid_unicode(text)
    if problem is not None:
        raise ContextError(f"the text {problem}")
    return text
