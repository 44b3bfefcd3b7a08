"""The FlashBack retrieval loop (arXiv 2405.04065, section 3) and its In-Context RALM prepend baseline.

Every ``stride`` generated tokens the loop queries the retriever with the last ``query_tokens``
tokens of the input + generated text and places the ``top_k`` chunks in the context:

- ``pattern="append"`` (FlashBack): the one RALM layout of :mod:`.ralm_layout`, as the adapter was
  trained: the text so far, then the current chunks as ``<MARK_L> chunk <MARK_R>``, then the last
  ``restate`` tokens of the text again (:data:`.ralm_layout.RESTATE_TOKENS`; 0: the paper's layout
  exactly), then the continuation. At the next retrieval the old evidence is cropped off and only the last stride of
  text plus the new evidence are computed. ``keep_evidence=True`` keeps every block instead
  (``text E1 text E2 ...``; nothing is recomputed, the context grows by ``top_k`` chunks a stride).
- ``pattern="prepend"`` (In-Context RALM): the evidence replaces the previous evidence *before* the
  input, ``[prefix][evidence][prompt + generated so far]``; everything after the first changed token
  is recomputed (``ctx.sync``).

Decoding is :mod:`flashback_agents.generation`'s own loop (same sampling, stop strings and EOS
handling), with retrieval done from its per-token hook, so with ``top_k=0`` the output is exactly
that of ``generate()``. The returned text never contains evidence.

Multi-token decoding (prompt-lookup speculation, grammar jump-forward: :mod:`.speculation`) runs
inside the loop as in ``generate()`` (``GenerationConfig.speculate``; on for greedy decoding): the
loop caps every step at the tokens left before the next retrieval point, so no draft crosses it,
and the lookup searches the whole context, the evidence just placed included (where copying pays).
Greedy output is that of one token per forward. Each placement (the last stride of text, the new
evidence and the restated tail, and the pending generated token) is one ``append``/``sync``: one
model forward below ``prefill_chunk`` tokens; its logits give the next token without another forward.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .context import CachedContext
from .generation import GenerationConfig, LogitsProcessor, Run
from .ralm_layout import RESTATE_TOKENS, evidence_ids, query_text, restated_ids
from .retrieval.base import Document, RetrievalError, Retriever

PATTERNS = ("append", "prepend")


@dataclass
class RetrievalRecord:
    """One retrieval: when, with what query, what came back, and what placing it cost.

    ``tokens_computed`` counts every token the model ran to place the evidence (for append: the
    evidence plus the pending generated token; for prepend: everything after the first changed
    token); ``tokens_reused`` is the cache kept.
    """

    step: int
    query: str
    doc_ids: list[str]
    added_ids: list[str] = field(default_factory=list)
    removed_ids: list[str] = field(default_factory=list)
    evidence_tokens: int = 0
    restated_tokens: int = 0  # the text's last tokens placed again after the evidence (ralm_layout)
    tokens_computed: int = 0
    tokens_reused: int = 0
    forwards: int = 0  # model forwards that placed it (one per ``prefill_chunk`` tokens computed)
    retrieval_seconds: float = 0.0
    compute_seconds: float = 0.0


@dataclass
class RalmResult:
    """Generated text (never evidence), its ids, and the per-retrieval accounting."""

    text: str
    token_ids: list[int]
    finish_reason: str
    retrievals: list[RetrievalRecord]
    pattern: str = "append"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    context_tokens: int = 0
    prefill_seconds: float = 0.0  # the prompt (and evidence retrieved for it)
    generate_seconds: float = 0.0  # decoding, retrievals and evidence placement
    evidence: list[Document] = field(default_factory=list)
    decode_forwards: int = 0  # forwards that decoded tokens (fewer than tokens with speculation)
    placement_forwards: int = 0  # forwards that placed evidence after the prompt's prefill
    drafted: int = 0  # draft tokens verified (prompt lookup + jump-forward)
    accepted: int = 0  # drafts kept

    @property
    def forwards(self) -> int:
        """Every model forward after the prompt's prefill: decoding plus evidence placement."""
        return self.decode_forwards + self.placement_forwards

    @property
    def forwards_per_token(self) -> float:
        return self.forwards / self.generated_tokens if self.generated_tokens else 0.0

    @property
    def tokens_computed(self) -> int:
        return sum(r.tokens_computed for r in self.retrievals)

    @property
    def retrieval_seconds(self) -> float:
        return sum(r.retrieval_seconds for r in self.retrievals)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["evidence"] = [e.as_dict() for e in self.evidence]
        d.update(tokens_computed=self.tokens_computed, retrieval_seconds=self.retrieval_seconds,
                 tokens_per_second=self.tokens_per_second, forwards=self.forwards,
                 forwards_per_token=self.forwards_per_token)
        return d


@dataclass
class _Seg:
    """A run of context ids: input/generated text, or one evidence block (``doc`` set)."""

    ids: list[int]
    doc: Document | None = None
    restated: bool = False  # the text's last tokens again, after the evidence (not part of the text)

    @property
    def is_text(self) -> bool:
        return self.doc is None and not self.restated


def _without_doc(segs: list[_Seg], doc_id: str) -> list[_Seg]:
    """``segs`` without one evidence block; with no evidence left, no restated tail either."""
    segs = [s for s in segs if s.doc is None or s.doc.id != doc_id]
    return segs if any(s.doc is not None for s in segs) else [s for s in segs if not s.restated]


class RetrievalLoop:
    """Generate on a :class:`CachedContext`, retrieving every ``stride`` tokens (see module doc)."""

    def __init__(self, context: CachedContext, retriever: Retriever | None, stride: int = 16,
                 query_tokens: int = 32, top_k: int = 2, pattern: str = "append", keep_evidence: bool = False,
                 retrieve_at_start: bool = True, label_sources: bool = False, restate: int = RESTATE_TOKENS):
        if pattern not in PATTERNS:
            raise RetrievalError(f"pattern must be one of {PATTERNS}, got {pattern!r}.")
        for name, value, low in (("stride", stride, 1), ("query_tokens", query_tokens, 1), ("top_k", top_k, 0),
                                 ("restate", restate, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise RetrievalError(f"{name} must be an integer >= {low}, got {value!r}.")
        if retriever is None and top_k > 0:
            raise RetrievalError("A retriever is needed when top_k > 0.")
        if retriever is not None and not callable(getattr(retriever, "retrieve", None)):
            raise RetrievalError(f"{type(retriever).__name__} has no retrieve(query, k) method.")
        self.ctx, self.retriever = context, retriever
        self.stride, self.query_tokens, self.top_k = stride, query_tokens, top_k
        self.pattern, self.keep_evidence = pattern, keep_evidence
        self.retrieve_at_start, self.label_sources = retrieve_at_start, label_sources
        self.restate = restate  # used by the replace-the-evidence append layout only

    # ------------------------------------------------------------------------------ helpers
    def _evidence_ids(self, doc: Document) -> list[int]:
        """One chunk's block in the one RALM layout (:func:`.ralm_layout.evidence_ids`); with
        ``label_sources`` its text starts with ``[source:lines]`` (for citations)."""
        label = doc.label() if self.label_sources else None
        return evidence_ids(self.ctx.layout, [f"[{label}] {doc.text}" if label else doc.text])

    def _layout_ids(self) -> list[int]:
        """The id sequence the context must hold for the current segments and pattern."""
        if self.pattern == "prepend":
            ev = [t for s in self._segs if s.doc is not None for t in s.ids]
            text = [t for s in self._segs if s.doc is None for t in s.ids]
            return self._prefix + ev + text
        return self._prefix + [t for s in self._segs for t in s.ids]

    def _query(self) -> str:
        stream = [t for s in self._segs if s.is_text for t in s.ids]  # the text so far, no evidence
        return query_text(self.ctx.lm, stream, len(stream), self.query_tokens, skip=self.ctx.lm.marker_ids)

    def _present(self) -> dict[str, _Seg]:
        return {s.doc.id: s for s in self._segs if s.doc is not None}

    def _plan(self, docs: list[Document]) -> tuple[list[_Seg], list[str], list[str]]:
        """New segment list after a retrieval, with the doc ids added and removed."""
        present = self._present()
        wanted: list[Document] = []
        for d in docs:
            if d.id not in {w.id for w in wanted}:
                wanted.append(d)
        if self.pattern == "append" and not self.keep_evidence:
            # The paper's layout: text so far, then only the current evidence (in rank order), then the
            # continuation. Old evidence goes; the pending text and the new evidence are computed.
            text = [s for s in self._segs if s.is_text]
            segs = text + [_Seg(self._evidence_ids(d), d) for d in wanted]
            if wanted and self.restate:  # the one layout's restated tail (ralm_layout.placed_ids)
                stream = self._prefix + [t for s in text for t in s.ids]
                segs.append(_Seg(restated_ids(stream, len(stream), self.restate), restated=True))
            return segs, [d.id for d in wanted], list(present)
        replace = self.pattern == "prepend"
        keep_ids = {d.id for d in wanted}
        segs = [s for s in self._segs if s.doc is None or not replace or s.doc.id in keep_ids]
        removed = [i for i in present if replace and i not in keep_ids]
        added = [d.id for d in wanted if d.id not in present]
        new = [_Seg(self._evidence_ids(d), d) for d in wanted if d.id not in present]
        if self.pattern == "prepend":
            segs = [s for s in segs if s.doc is not None] + new + [s for s in segs if s.doc is None]
        else:
            segs = segs + new
        return segs, added, removed

    def _retrieve(self, step: int) -> RetrievalRecord:
        ctx = self.ctx
        query = self._query()
        t0 = time.perf_counter()
        docs = self.retriever.retrieve(query, self.top_k) if query else []
        rsec = time.perf_counter() - t0
        rec = RetrievalRecord(step=step, query=query, doc_ids=[d.id for d in docs], retrieval_seconds=rsec)
        if not docs:  # nothing found: the context stays as it is (old evidence is not dropped for nothing)
            rec.tokens_reused = ctx.cached_tokens
            return rec
        old_segs = self._segs
        segs, added, removed = self._plan(docs)
        # Keep within the window: drop the lowest-ranked new chunks that do not fit.
        while added:
            self._segs = segs
            if len(self._layout_ids()) <= ctx.max_context_tokens:
                break
            segs = _without_doc(segs, added.pop())
        self._segs = segs
        ids = self._layout_ids()
        if len(ids) > ctx.max_context_tokens:  # even without new chunks (nothing to add): keep the old layout
            self._segs, added, removed = old_segs, [], []
            ids = self._layout_ids()
        rec.added_ids, rec.removed_ids = added, removed
        rec.evidence_tokens = sum(len(s.ids) for s in self._segs if s.doc is not None and s.doc.id in added)
        rec.restated_tokens = sum(len(s.ids) for s in self._segs if s.restated) if added else 0
        for s in self._segs:
            if s.doc is not None and s.doc.id in added:
                self._evidence.append(s.doc)
        kept_before = ctx.cached_tokens
        t1 = time.perf_counter()
        if self.pattern == "append" and not removed:
            new_ids = ids[len(ctx):]
            res = ctx.append(new_ids) if new_ids else None
            reused = kept_before
        else:
            res = ctx.sync(ids)
            reused = min(res.reused, kept_before)
        rec.tokens_computed = ctx.cached_tokens - reused if res is not None else 0
        rec.tokens_reused = reused
        rec.forwards = self._forwards(rec.tokens_computed)
        rec.compute_seconds = time.perf_counter() - t1
        return rec

    # -------------------------------------------------------------------------------- public
    def generate(self, prompt_or_ids: str | Sequence[int], config: GenerationConfig | None = None,
                 processors: Sequence[LogitsProcessor] = (), *, input_start: int | None = None,
                 answer_prefix: Sequence[int] = ()) -> RalmResult:
        """Append the prompt (text is tokenized raw; pass ids for a chat rendering) and decode.

        ``answer_prefix`` ids go after the evidence retrieved for the prompt (for a chat model: the
        assistant generation prompt, so the documents sit after the question, outside the answer).
        An empty prompt continues from what the context holds; ``input_start`` then says where the
        input begins (what prepend places evidence before; default: the whole context).
        """
        config = config or GenerationConfig()
        config.validate()
        ctx, lm = self.ctx, self.ctx.lm
        ids = lm.encode(prompt_or_ids) if isinstance(prompt_or_ids, str) else [int(t) for t in prompt_or_ids]
        with ctx.lock:
            if ids:
                start = len(ctx)
            else:
                if len(ctx) == 0:
                    raise RetrievalError("Empty prompt and an empty context: nothing to generate from.")
                start = 0 if input_start is None else input_start
                if not 0 <= start < len(ctx):
                    raise RetrievalError(f"input_start must be in 0..{len(ctx) - 1}, got {start}.")
            answer_prefix = [int(t) for t in answer_prefix]
            total = start + len(ids) + len(answer_prefix) + (len(ctx) - start if not ids else 0)
            if total >= ctx.max_context_tokens:
                raise RetrievalError(
                    f"The prompt needs {total} tokens of context but the model window is {ctx.max_context_tokens}: "
                    "nothing is left for evidence or generation. Shorten the prompt.")
            held = ctx.token_ids
            self._prefix = held[:start]
            self._segs = [_Seg(list(ids) if ids else held[start:])]
            self._evidence: list[Document] = []
            records: list[RetrievalRecord] = []
            eos = lm.eos_token_ids if config.stop_at_eos else set()
            retrieving = self.top_k > 0 and self.retriever is not None
            t0 = time.perf_counter()
            prefill_seconds = 0.0
            if ids:  # prefill the prompt, fused with the evidence retrieved for it
                if retrieving and self.retrieve_at_start:
                    # Place the prompt in our bookkeeping only; one compute covers prompt + evidence.
                    kept = ctx.cached_tokens
                    rec = self._retrieve_without_compute(step=0)
                    self._segs.append(_Seg(list(answer_prefix)))
                    ctx.append(self._layout_ids()[start:])
                    rec.tokens_computed = ctx.cached_tokens - kept
                    rec.tokens_reused = kept
                    rec.forwards = self._forwards(rec.tokens_computed)
                    rec.compute_seconds = time.perf_counter() - t0 - rec.retrieval_seconds
                    records.append(rec)
                else:
                    self._segs[0].ids += answer_prefix
                    ctx.append(ids + answer_prefix)
                prefill_seconds = time.perf_counter() - t0

            state = {"n": 0}
            stops = [s for s in config.stop if s]
            gen: list[int] = []

            def on_token(tok: int) -> None:
                state["n"] += 1
                last = self._segs[-1]
                if last.is_text:
                    last.ids.append(tok)
                else:
                    self._segs.append(_Seg([tok]))
                if tok in eos:
                    return
                gen.append(tok)
                n = state["n"]
                if not retrieving or n % self.stride or n >= config.max_new_tokens:
                    return
                if stops and any(s in lm.decode(gen, skip_special_tokens=True) for s in stops):
                    return  # the run stops on this token: no retrieval after the end
                if len(ctx) >= ctx.max_context_tokens:
                    return
                records.append(self._retrieve(step=n))

            t1 = time.perf_counter()
            prefilled = len(records)  # placed with the prompt's prefill (not decoding's cost)
            if not ids and retrieving and self.retrieve_at_start:
                records.append(self._retrieve(step=0))
            if not ids and answer_prefix:
                self._segs.append(_Seg([])) if not self._segs[-1].is_text else None
                self._segs[-1].ids += answer_prefix
                ctx.append(answer_prefix)
            # Every step ends at the next retrieval point at the latest: drafts never cross it (no
            # retrieval: ``on_token`` only records tokens, so steps are as long as in ``generate()``).
            def limit(steps: int) -> int:
                return self.stride - steps % self.stride if retrieving else config.max_new_tokens

            run = Run(ctx, config, processors, on_token=on_token, step_limit=limit)
            for _ in run:
                pass
            gen_seconds = time.perf_counter() - t1
            result = run.result
            assert result is not None
            return RalmResult(text=result.text, token_ids=list(result.token_ids), finish_reason=result.finish_reason,
                              retrievals=records, pattern=self.pattern, prompt_tokens=(len(ids) or len(held) - start) + len(answer_prefix),
                              generated_tokens=state["n"], context_tokens=len(ctx), prefill_seconds=prefill_seconds,
                              generate_seconds=gen_seconds, evidence=list(self._evidence),
                              decode_forwards=result.forwards,
                              placement_forwards=sum(r.forwards for r in records[prefilled:]),
                              drafted=result.drafted, accepted=result.accepted)

    def _forwards(self, computed: int) -> int:
        """Model forwards that computing ``computed`` tokens in one call ran (``prefill_chunk`` at a time)."""
        return -(-computed // self.ctx.prefill_chunk)

    def _retrieve_without_compute(self, step: int) -> RetrievalRecord:
        """First retrieval for a new prompt: plan the segments; the caller computes them in one go."""
        query = self._query()
        t0 = time.perf_counter()
        docs = self.retriever.retrieve(query, self.top_k) if query else []
        rec = RetrievalRecord(step=step, query=query, doc_ids=[d.id for d in docs],
                              retrieval_seconds=time.perf_counter() - t0)
        segs, added, _ = self._plan(docs)
        while added:
            self._segs = segs
            if len(self._layout_ids()) <= self.ctx.max_context_tokens - 1:
                break
            segs = _without_doc(segs, added.pop())
        self._segs = segs
        rec.added_ids = added
        rec.evidence_tokens = sum(len(s.ids) for s in segs if s.doc is not None)
        rec.restated_tokens = sum(len(s.ids) for s in segs if s.restated)
        self._evidence += [s.doc for s in segs if s.doc is not None]
        return rec
