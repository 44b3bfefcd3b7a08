"""Exact multi-token decoding: grammar jump-forward and prompt-lookup speculation.

On a CPU a forward over k tokens costs about as much as one over a single token, so every token that
is computed in a batch instead of its own step is nearly free. Two sources of *draft* tokens:

- **jump-forward** (constrained replies): the string the grammar forces next
  (``GrammarMatcher.find_jump_forward_string``: ``<tool_call>{"name": "``, the rest of a tool name,
  ``", "arguments": {"``, required keys, closing braces), tokenized by the model's tokenizer;
- **prompt lookup** (n-gram speculation, as in vLLM / llama.cpp): the last ``ngram`` tokens are
  looked up in the context (tool results, user turns, evidence) and the tokens that followed their
  latest earlier occurrence are proposed.

Drafts are never trusted. One forward runs ``[pending token] + drafts`` on the cached context and
returns the logits at every position; then, position by position, the token is chosen exactly as
plain decoding would choose it (EOS mask for ``min_new_tokens``, grammar bitmask, argmax or the
seeded sampler) and kept; the walk stops at the first chosen token that differs from its draft (that
token is still kept: it was computed from correct logits). The cache is then cropped back past the
rejected drafts (:meth:`CachedContext.accept_verified`). So the output is *token-for-token the output
of plain decoding* (greedy, and also seeded sampling: the sampler draws once per kept token, in the
same order), up to float rounding of a batched vs a one-token forward (a near-tie could flip).

Canonical output: plain decoding's. A forced string whose tokenizer encoding differs from the tokens
the model picks (token boundaries: ``"`` + ``search`` vs ``"search``) is simply a rejected draft: the
model's token is kept, the grammar matcher follows the kept tokens, nothing is re-tokenized.

How many looked-up drafts a forward verifies adapts to how many were kept (the schedule of
transformers' assisted generation): two more after a forward that kept all of its drafts, one fewer
after one that did not, between 1 and ``draft_tokens``. Prose copies a retrieved passage in runs and
then leaves it; verifying 8 drafts per forward where one in five is kept costs more than it saves on a
long context. Jump-forward drafts (forced by the grammar) are never capped.

When multi-token decoding is off (see :func:`plan`), generation runs today's one-token loop unchanged.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import kvcache
from .contextbase import common_prefix


def grammar_of(processor: Any) -> Any | None:
    """The compiled grammar of an unused single-grammar xgrammar HF logits processor, else None."""
    try:
        from xgrammar.contrib.hf import LogitsProcessor
    except ImportError:  # pragma: no cover - xgrammar missing: no grammar processors either
        return None
    if isinstance(processor, LogitsProcessor) and len(processor.compiled_grammars) == 1 and not processor.matchers:
        return processor.compiled_grammars[0]
    return None


def plan(ctx: Any, config: Any, processors: Sequence[Any], on_token: Any) -> tuple[bool, bool, Any]:
    """(speculate, jump_forward, compiled grammar or None) for one generation.

    Multi-token decoding is used only where it is exact and cheap: no ``on_token`` callback (it may
    change the context between tokens), ``stop_at_eos`` (a grammar that terminated ends the run), no
    logits processors other than one xgrammar grammar (arbitrary processors may be stateful), and a
    plain attention cache (hybrid recurrent/conv caches cannot be cropped back token by token).
    ``speculate=None`` means on for greedy decoding only.
    """
    speculate = config.speculate if config.speculate is not None else config.temperature == 0
    jump = bool(config.jump_forward)
    grammar = None
    if len(processors) == 1:
        grammar = grammar_of(processors[0])
    if on_token is not None or not config.stop_at_eos or (processors and grammar is None) \
            or kvcache.has_state_layers(ctx.cache):
        return False, False, None
    if grammar is None:
        jump = False
    if speculate and config.draft_tokens < 1:
        speculate = False
    return bool(speculate), jump, grammar


class Grammar:
    """Drives one ``xgrammar.GrammarMatcher`` directly (in place of xgrammar's HF processor, which
    accepts the previous token at each call and so cannot look at several positions)."""

    def __init__(self, compiled: Any):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [vocab] with the tokens the grammar forbids at the current state set to -inf."""
        if not self.matcher.is_terminated():
            self.matcher.fill_next_token_bitmask(self.bitmask, 0)
        scores = logits.unsqueeze(0).to("cpu")
        self._xgr.apply_token_bitmask_inplace(scores, self.bitmask)
        return scores[0]

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated() and not self.matcher.accept_token(int(token)):
            raise RuntimeError(f"the grammar rejected token {token} (every token was masked)")

    def forced_string(self) -> str:
        if self.matcher.is_terminated():
            return ""
        return self.matcher.find_jump_forward_string()

    def valid_prefix(self, drafts: list[int], never: frozenset[int] = frozenset()) -> list[int]:
        """The longest prefix of ``drafts`` the grammar accepts (the matcher is left unchanged).

        ``never``: ids no grammar accepts (special tokens other than the stops, e.g. the evidence markers a
        draft copies from the context): the draft ends there without asking the matcher, which would
        refuse them with a warning on stderr."""
        n = 0
        for t in drafts:
            if int(t) in never or self.matcher.is_terminated() or not self.matcher.accept_token(int(t)):
                break
            n += 1
        if n:
            self.matcher.rollback(n)
        return drafts[:n]


class NgramIndex:
    """Prompt-lookup drafting: where did the last ``n`` tokens occur before, and what followed?

    For every length ``1..ngram`` it maps each n-gram to the end of its latest occurrence that has a
    continuation; :meth:`draft` tries the longest suffix first (at least ``min_ngram`` tokens).
    """

    def __init__(self, ids: Sequence[int], ngram: int = 3, min_ngram: int = 1):
        self.ngram, self.min_ngram = ngram, min_ngram
        self.ids: list[int] = []
        self.maps: list[dict[tuple, int]] = [dict() for _ in range(ngram + 1)]
        self.extend(ids)

    def extend(self, ids: Sequence[int]) -> None:
        for t in ids:
            e = len(self.ids)  # the n-grams ending here now have a continuation: ``t``
            for n in range(self.min_ngram, self.ngram + 1):
                if e >= n:
                    self.maps[n][tuple(self.ids[e - n:e])] = e
            self.ids.append(int(t))

    def draft(self, k: int, after: Sequence[int] = ()) -> list[int]:
        """Up to ``k`` tokens to follow the indexed ids (then ``after``, tokens not indexed: drafts
        already proposed by jump-forward)."""
        ids = self.ids + list(after) if after else self.ids
        for n in range(min(self.ngram, len(ids)), self.min_ngram - 1, -1):
            e = self.maps[n].get(tuple(ids[len(ids) - n:]))
            if e is not None:  # copy what followed; a match close to the end copies its own copy (loops)
                out: list[int] = []
                for j in range(k):
                    out.append(ids[e + j] if e + j < len(ids) else out[e + j - len(ids)])
                return out
        return []


class Decoder:
    """Chooses tokens for :class:`~flashback_agents.generation._Run` a batch at a time."""

    def __init__(self, ctx: Any, config: Any, sample: Any, eos: set[int], speculate: bool, jump: bool,
                 grammar: Any | None):
        self.ctx, self.cfg, self.sample, self.eos = ctx, config, sample, eos
        self.speculate, self.jump = speculate, jump
        self.grammar = Grammar(grammar) if grammar is not None else None
        tok = ctx.lm.tokenizer
        #: special ids (markers included) that a grammar never accepts: drafts stop before them
        self.never = frozenset({int(i) for i in (getattr(tok, "all_special_ids", None) or [])}
                               | {int(i) for i in getattr(ctx.lm, "marker_ids", ()) or ()}) - frozenset(eos)
        self.index = NgramIndex(ctx.ids, config.ngram) if speculate else None
        #: looked-up drafts verified per forward now (adapted after each forward, 1..draft_tokens)
        self.draft_cap = int(config.draft_tokens)
        self._seen = list(ctx.ids)  # the context as the index last saw it (on_token may change it between steps)
        self.stats = ctx.stats  # forwards are counted by the context; drafted/accepted/forced here

    def _choose(self, logits: torch.Tensor, n_generated: int) -> int:
        if n_generated < self.cfg.min_new_tokens and self.eos:
            logits = logits.clone()
            logits[list(self.eos)] = float("-inf")
        if self.grammar is not None:
            logits = self.grammar.mask(logits)
        tok = self.sample(logits)
        if self.grammar is not None:
            self.grammar.accept(tok)
        return tok

    def _drafts(self, limit: int) -> tuple[list[int], int]:
        """(drafts, how many of them come from jump-forward)."""
        if limit <= 0:
            return [], 0
        if self.jump and self.grammar is not None:
            forced = self.grammar.forced_string()
            if forced:
                toks = self.grammar.valid_prefix(self.ctx.lm.encode(forced)[:limit], self.never)
                if toks:
                    n_forced = len(toks)
                    if self.speculate and len(toks) < limit:  # what follows the forced text, looked up
                        more = self.index.draft(min(limit - len(toks), self.draft_cap), after=toks)
                        more = more[:next((i for i, t in enumerate(more) if t in self.eos), len(more))]
                        toks = self.grammar.valid_prefix(toks + more, self.never) if more else toks
                    return toks, n_forced
        if self.speculate:
            drafts = self.index.draft(min(limit, self.draft_cap))
            if drafts and self.eos:
                cut = next((i for i, t in enumerate(drafts) if t in self.eos), None)
                drafts = drafts[:cut] if cut is not None else drafts
            if drafts and self.grammar is not None:
                drafts = self.grammar.valid_prefix(drafts, self.never)
            return drafts, 0
        return [], 0

    def step(self, n_generated: int, budget: int) -> list[int]:
        """Choose 1..``budget`` tokens (pushed to the context, the last one pending), as plain decoding would.

        ``n_generated``: tokens generated so far (EOS excluded; for ``min_new_tokens``). ``budget``:
        most tokens this step may produce (max_new_tokens and the context window left).
        """
        ctx = self.ctx
        if self.index is not None and self._seen != ctx.ids:  # changed between steps (RALM evidence placed):
            # index what changed (what it replaced stays indexed: drafts are proposals, all verified)
            self.index.extend(ctx.ids[max(0, common_prefix(self._seen, ctx.ids) - self.cfg.ngram):])
        room = ctx.max_context_tokens - len(ctx) - 1  # drafts need positions; the last kept token pends
        # Logits already known (the first token after a prompt): that token costs no forward; draft after it.
        drafts, n_forced = self._drafts(min(budget - 1, room, 64)) if not ctx.logits_known else ([], 0)
        if not drafts:
            tok = self._choose(ctx.next_token_logits(), n_generated)
            ctx.push_generated(tok)
            if self.index is not None:
                self.index.extend([tok])
                self._seen = list(ctx.ids)
            return [tok]
        rows = ctx.verify_forward(drafts)  # [len(drafts) + 1, vocab]: logits after each input
        self.stats.drafted += len(drafts)
        kept: list[int] = []
        for i in range(len(drafts) + 1):
            tok = self._choose(rows[i], n_generated + len(kept))
            kept.append(tok)
            if i == len(drafts) or tok != drafts[i] or tok in self.eos:
                break
        n_ok = len(kept) - 1  # drafts confirmed (the last kept token is new, or the bonus one)
        if len(drafts) > n_forced:  # looked-up drafts were verified: adapt how many the next forward takes
            full = self.cfg.draft_tokens
            self.draft_cap = min(full, self.draft_cap + 2) if n_ok == len(drafts) else max(1, self.draft_cap - 1)
        self.stats.accepted += n_ok
        self.stats.forced += min(n_ok, n_forced)
        ctx.accept_verified(drafts, n_ok, kept[-1])
        if self.index is not None:
            self.index.extend(kept)
            self._seen = list(ctx.ids)
        return kept
