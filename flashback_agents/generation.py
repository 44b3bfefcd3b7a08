"""Decoding on a CachedContext: greedy/sampling, stop strings, EOS, streaming, logits processors.

One loop serves both ``generate`` and ``stream``, so streamed and non-streamed greedy outputs are
identical by construction. Generated tokens stay in the context: the next turn reuses them.
Where exact, a step decodes several tokens in one forward (grammar jump-forward, prompt-lookup
speculation: :mod:`flashback_agents.speculation`); the output is plain decoding's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, get_args

import torch

from . import kvcache, speculation
from .context import CachedContext, DecodeCounts
from .errors import FlashBackError
from .toolformat import holdback  # the stream holdback lives with the call markers; importable from here too

LogitsProcessor = Callable[[torch.LongTensor, torch.FloatTensor], torch.FloatTensor]


class GenerationConfigError(ValueError, FlashBackError):
    """Decoding settings that cannot work (negative or NaN temperature, top_p outside (0, 1], ...)."""


class SettingTypeError(TypeError, FlashBackError):
    """A setting of the wrong type given to a pydantic model (the LangChain / LlamaIndex classes): a
    ``TypeError``, not a ``ValueError``, because pydantic would wrap a ``ValueError`` raised by a
    validator into its own ``ValidationError``; this one reaches the caller as is."""


#: the seeds torch's generator takes (a signed or unsigned 64-bit integer)
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


def check_setting(name: str, value: object, *, integer: bool = False, optional: bool = False,
                  example: object = None) -> object:
    """A number setting as pydantic would take it (a numeric string is converted, as before), or
    :class:`SettingTypeError` saying what to pass: for the integrations' field validators
    (``mode="before"``), so ``temperature="hot"`` is our error, not a bare ``ValidationError``.

    Range checks stay where they were (the field's own constraints, :meth:`GenerationConfig.validate`)."""
    if value is None and optional:
        return value
    kind = "an integer" if integer else "a number"
    if not isinstance(value, bool):
        if isinstance(value, int) or (not integer and isinstance(value, float)):
            return value
        if integer and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip()) if integer else float(value.strip())
            except ValueError:
                pass
    hint = f"{name}={example!r}" if example is not None else f"{name}=<{kind}>"
    raise SettingTypeError(f"{name} must be {kind}{' or None' if optional else ''}, got {type(value).__name__} "
                           f"{value!r:.60}; pass e.g. {hint}.")


#: the integrations' number settings (LangChain ChatFlashBack, LlamaIndex FlashBack: fields and per-call
#: overrides): an example value for the hint of :func:`check_setting`, whose type says integer or number
SETTING_EXAMPLES: dict[str, float | int] = {
    "temperature": 0.7, "top_p": 1.0, "timeout": 30.0, "min_tokens": 0, "draft_tokens": 8, "max_tokens": 256,
    "seed": 0, "max_context_tokens": 4096, "max_cached_bytes": 2 << 30, "kv_store_max_bytes": 2 << 30}


def check_field(name: str, value: object, annotation: Any = None, *, optional: bool = False) -> object:
    """:func:`check_setting` for a setting of :data:`SETTING_EXAMPLES`: integer or number and the example
    from the table; None is accepted when ``optional`` or when the field's ``annotation`` admits it
    (one pydantic ``mode="before"`` validator per integration serves every number field)."""
    example = SETTING_EXAMPLES[name]
    optional = optional or type(None) in get_args(annotation)
    return check_setting(name, value, integer=isinstance(example, int), optional=optional, example=example)


def normalize_stop(stop: object) -> tuple[str, ...]:
    """Stop strings as a tuple: a plain ``str`` is ONE stop string (not one per character).

    Frameworks pass ``stop="END"`` as often as ``stop=["END"]``; iterating a str would stop at "E".
    """
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, (bytes, bytearray)) or not hasattr(stop, "__iter__"):
        raise GenerationConfigError(f"stop must be a string or a list of strings, got {type(stop).__name__}.")
    out = []
    for s in stop:  # type: ignore[union-attr]
        if not isinstance(s, str):
            raise GenerationConfigError(f"stop strings must be str, got {type(s).__name__} ({s!r}); pass "
                                        "stop='END' or stop=['END', ...].")
        if s:
            out.append(s)
    return tuple(out)


@dataclass
class GenerationConfig:
    """How to decode. ``temperature=0`` means greedy."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0  # EOS is masked until this many tokens are generated (benchmarks, fixed-length runs)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_at_eos: bool = True
    #: prompt-lookup speculation (drafts copied from the context, verified in one forward; exact):
    #: None = on for greedy decoding, off when sampling; True also with sampling (still exact: the
    #: seeded sampler draws once per kept token, as plain decoding does). See flashback_agents.speculation.
    speculate: bool | None = None
    draft_tokens: int = 8  # most drafts verified per forward
    ngram: int = 3  # longest suffix (in tokens) looked up in the context to find drafts
    #: grammar jump-forward on constrained replies: the text the grammar forces is run in one forward
    jump_forward: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or self.stop is None:
            self.stop = normalize_stop(self.stop)

    def validate(self) -> None:
        """Raise :class:`GenerationConfigError` (saying what to pass) before any compute."""
        def number(name: str, value: object, integer: bool = False) -> float:
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not math.isfinite(value):  # type: ignore[arg-type]
                kind = "an integer" if integer else "a finite number"
                raise GenerationConfigError(f"{name} must be {kind}, got {value!r}.")
            return value  # type: ignore[return-value]

        if number("max_new_tokens", self.max_new_tokens, True) < 0:
            raise GenerationConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens!r}.")
        if number("min_new_tokens", self.min_new_tokens, True) < 0:
            raise GenerationConfigError(f"min_new_tokens must be >= 0, got {self.min_new_tokens!r}.")
        if number("temperature", self.temperature) < 0:
            raise GenerationConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < number("top_p", self.top_p) <= 1:
            raise GenerationConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}.")
        if number("top_k", self.top_k, True) < 0:
            raise GenerationConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise GenerationConfigError(f"seed must be an integer or None, got {self.seed!r}.")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise GenerationConfigError(f"seed must fit in 64 bits ({SEED_MIN}..{SEED_MAX}), got {self.seed}; pass a "
                                        "smaller seed, e.g. seed % 2**63.")
        if self.speculate is not None and not isinstance(self.speculate, bool):
            raise GenerationConfigError(f"speculate must be True, False or None (on for greedy decoding), got "
                                        f"{self.speculate!r}.")
        if not isinstance(self.jump_forward, bool):
            raise GenerationConfigError(f"jump_forward must be True or False, got {self.jump_forward!r}.")
        if not 1 <= number("draft_tokens", self.draft_tokens, True) <= 64:
            raise GenerationConfigError(f"draft_tokens must be in 1..64 (drafts verified per forward; turn "
                                        f"speculation off with speculate=False), got {self.draft_tokens!r}.")
        if not 1 <= number("ngram", self.ngram, True) <= 16:
            raise GenerationConfigError(f"ngram must be in 1..16 (tokens matched against the context), got "
                                        f"{self.ngram!r}.")
        self.stop = normalize_stop(self.stop)


@dataclass
class GenerationResult(DecodeCounts):  # forwards/drafted/accepted/forced: this generation's
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop string or EOS), "length" (max_new_tokens), "context" (window full)
    seconds: float = 0.0
    stop_string: str | None = None
    #: tokens the budget guard wrote to close a required call / JSON reply the budget would have cut
    #: (flashback_agents.constrained.CloseGuard; 0: the model closed it itself)
    forced_close: int = 0


@dataclass
class Sampler:
    """Turns logits into a token id; owns the RNG so a seed gives repeatable samples."""

    config: GenerationConfig
    _gen: torch.Generator | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.config.seed is not None:
            self._gen = torch.Generator().manual_seed(int(self.config.seed))

    def __call__(self, logits: torch.Tensor) -> int:
        cfg = self.config
        if cfg.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits.float().cpu() / cfg.temperature
        if cfg.top_k:
            kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if cfg.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            cum = torch.cumsum(sp, dim=-1)
            drop = cum - sp > cfg.top_p
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        return int(torch.multinomial(probs, 1, generator=self._gen))


class _Run:
    """One generation: iterate for text deltas; ``result`` is set when iteration ends."""

    def __init__(self, ctx: CachedContext, config: GenerationConfig,
                 processors: Sequence[LogitsProcessor] = (), on_token: Callable[[int], None] | None = None,
                 step_limit: Callable[[int], int] | None = None):
        if not isinstance(config, GenerationConfig):
            raise GenerationConfigError(f"config must be a GenerationConfig, got {type(config).__name__}; build one "
                                        "with GenerationConfig(max_new_tokens=..., ...).")
        config.validate()
        self.ctx, self.cfg, self.processors = ctx, config, list(processors)
        self.on_token = on_token
        #: ``step_limit(tokens so far)``: most tokens the next step may decode, where ``on_token`` changes the
        #: context only after the last of them (the RALM loop: the tokens left before its next retrieval); with
        #: it, multi-token decoding stays on (exact: no step runs past a change)
        self.step_limit = step_limit
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        ctx, cfg = self.ctx, self.cfg
        lm = ctx.lm
        eos = lm.eos_token_ids if cfg.stop_at_eos else set()
        sample = Sampler(cfg)
        stops = list(normalize_stop(cfg.stop))
        gen: list[int] = []
        emitted = 0
        text = ""
        finish, stop_hit = "length", None
        t0 = time.perf_counter()
        st = ctx.stats
        before = st.decode_counts()
        with ctx.lock:
            spec, jump, grammar = speculation.plan(ctx, cfg, self.processors,
                                                   self.on_token if self.step_limit is None else None)
            decoder = speculation.Decoder(ctx, cfg, sample, eos, spec, jump, grammar) if spec or jump else None
        # a reply that must complete is closed before the budget runs out
        guard = budget_guard(self.processors, sorted(eos)) if self.processors and eos else None
        forced_close = 0
        steps = 0
        # The lock is taken per step, never held across a ``yield``: a stream abandoned mid-way (or
        # closed by the garbage collector in another thread) must not leave the context locked.
        while steps < cfg.max_new_tokens:
            with ctx.lock:
                if len(ctx) >= ctx.max_context_tokens:
                    finish = "context"
                    break
                room = ctx.max_context_tokens - len(ctx)
                left = min(cfg.max_new_tokens - steps, room)
                close = guard.plan(gen, left, room) if guard is not None else None
                if close is not None:  # the shortest valid end, as if decoded (the last token: a stop)
                    _push_forced(ctx, close)
                    toks = close
                    forced_close = len(close)
                elif decoder is not None:  # one forward, one or more tokens (exactly plain decoding's)
                    budget = guard.step_budget(left) if guard is not None else left
                    toks = decoder.step(len(gen), budget if self.step_limit is None else
                                        min(budget, max(1, self.step_limit(steps))))
                else:
                    logits = ctx.next_token_logits()
                    if len(gen) < cfg.min_new_tokens and eos:
                        logits = logits.clone()
                        logits[list(eos)] = float("-inf")
                    if self.processors:
                        ids = torch.tensor([ctx.ids], dtype=torch.long)
                        scores = logits.unsqueeze(0)
                        for p in self.processors:
                            scores = p(ids, scores)
                        logits = scores[0]
                    tok = sample(logits)
                    ctx.push_generated(tok)
                    toks = [tok]
            done = False
            for j, tok in enumerate(toks):
                steps += 1
                if self.on_token is not None:
                    self.on_token(tok)
                if tok in eos:  # always the last of ``toks``
                    finish, done = "stop", True
                    break
                gen.append(tok)
                text = lm.decode(gen, skip_special_tokens=True)
                if stops:
                    window = max(0, emitted - max(len(s) for s in stops))
                    hits = [(text.find(s, window), s) for s in stops if text.find(s, window) >= 0]
                    if hits:
                        pos, stop_hit = min(hits)
                        text = text[:pos]
                        finish, done = "stop", True
                        if j + 1 < len(toks):  # tokens decoded past the stop: the context keeps none of them
                            ctx.rollback(len(toks) - j - 1)
                        break
                safe = len(text) - holdback(text, stops)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            if done:
                break
        if len(text) > emitted:
            yield text[emitted:]
        held = ctx.ids
        all_ids = gen + ([held[-1]] if finish == "stop" and stop_hit is None and held and held[-1] in eos else [])
        self.result = GenerationResult(text=text, token_ids=all_ids, finish_reason=finish,
                                       seconds=time.perf_counter() - t0, stop_string=stop_hit,
                                       forced_close=forced_close, **st.since(before).as_dict())


def budget_guard(processors: Sequence[Any], stop_ids: Sequence[int]) -> Any:
    """The budget guard a processor brings, built for ``stop_ids`` (None: no processor brings one).

    A processor whose reply must complete (a required call, a JSON answer) carries ``close_guard``, a
    callable ``close_guard(stop_ids)`` returning an object with ``plan(generated, left, room)`` and
    ``step_budget(left)`` (:class:`flashback_agents.closeguard.CloseGuard`): the behaviour is passed
    in with the processor, so decoding needs no import of the grammar code."""
    makers = [m for m in (getattr(p, "close_guard", None) for p in processors) if callable(m)]
    if len(makers) != 1 or not stop_ids:
        return None
    return makers[0](stop_ids)


def _push_forced(ctx: CachedContext, toks: list[int]) -> None:
    """Push tokens chosen without the model (the guard's close) as generated: one forward for all but
    the last (left pending, as a decoded token is), or one per token on caches that cannot crop."""
    if len(toks) > 1 and not kvcache.has_state_layers(ctx.cache):
        ctx.verify_forward(toks[:-1])
        ctx.accept_verified(toks[:-1], len(toks) - 1, toks[-1])
    else:
        for t in toks:
            ctx.push_generated(t)


Run = _Run  # public name: ``for delta in Run(ctx, config, processors, on_token=...)``


def stream(ctx: CachedContext, config: GenerationConfig | None = None,
           processors: Sequence[LogitsProcessor] = (), on_token: Callable[[int], None] | None = None) -> _Run:
    """Iterate over text deltas; after iteration ``run.result`` holds the :class:`GenerationResult`.

    ``on_token(id)`` is called after each sampled token is pushed to the context (the FlashBack loop
    uses it to append evidence every ``stride`` tokens). A run with ``on_token`` (which may change the
    context between tokens) decodes one token per forward: no speculation, no jump-forward.
    """
    return _Run(ctx, config or GenerationConfig(), processors, on_token)


def generate(ctx: CachedContext, config: GenerationConfig | None = None,
             processors: Sequence[LogitsProcessor] = (),
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Decode on ``ctx`` until EOS, a stop string, ``max_new_tokens`` or the window's end."""
    run = _Run(ctx, config or GenerationConfig(), processors, on_token)
    for _ in run:
        pass
    assert run.result is not None
    return run.result
