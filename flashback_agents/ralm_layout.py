"""The one RALM layout: *text so far*, then the *current evidence* (marked), then the *continuation*.

FlashBack (arXiv 2405.04065, and the authors' ``data_prepare.py`` / ``run.py``) trains, evaluates and
runs a single layout. At a retrieval point ``i`` (every ``stride`` tokens) the last ``query_tokens``
tokens of the clean text query the retriever, and the model reads::

    text[:i]  <MARK_L> d_1 <MARK_R> .. <MARK_L> d_k <MARK_R>  text[i - r : i]  text[i : i + stride]

``text[i - r : i]`` is our one addition to the paper's layout: the last ``r`` tokens of the text
(:data:`RESTATE_TOKENS`, default 8) are *restated* after the evidence, unscored. Measured with
``flashback-agents eval ppl`` (per-offset NLL), nearly all the loss appended evidence costs sits on
the first one or two tokens after ``<MARK_R>``: the model must predict the next word of a text it
last saw a whole document ago (perplexity ~600 at offset 0 with the shipped adapter vs ~25 without
evidence). Restating the tail puts the text's own last words right before the continuation; it costs
``r`` tokens per retrieval (against 130-260 of evidence) and keeps the layout append-only. The
restated ids are part of what :func:`placed_ids` returns, so every user of the layout carries them.

Evidence of earlier retrieval points is *not* kept: at the next point the cache is cropped back to
the end of ``text[:i]`` and only the last stride plus the new evidence are computed. This module is
the only place that lays those ids out; the training samples (:mod:`.training.samples`), the
perplexity evaluation (:mod:`.evaluation.perplexity`) and the inference loop (:mod:`.ralm`) all call
it, and ``tests/test_ralm_layout.py`` checks that the three give identical ids for the same text and
the same retrievals. Keeping every evidence block (``keep_evidence=True``) is an explicit option of
the inference loop, laid out by :func:`accumulated_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence


RESTATE_TOKENS = 8  # text tokens restated after the evidence (chosen on a validation log: docs/benchmarks.md, 5)


class _Marks(Protocol):
    """What the layout needs from a model: the marker ids and an encoder (``Layout`` has both)."""

    def marked(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class RalmLayoutConfig:
    """The retrieval schedule (paper defaults): retrieve every ``stride`` tokens with the last
    ``query_tokens`` tokens and place the ``top_k`` best chunks."""

    stride: int = 16
    query_tokens: int = 32
    top_k: int = 2
    restate: int = RESTATE_TOKENS  # 0: the paper's layout exactly

    def check(self) -> None:
        for name in ("stride", "query_tokens", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RalmLayoutConfig.{name} must be an integer >= 1, got {value!r}.")
        check_restate(self.restate)


def check_restate(restate: Any) -> None:
    if not isinstance(restate, int) or isinstance(restate, bool) or restate < 0:
        raise ValueError(f"restate must be an integer >= 0 (text tokens restated after the evidence), got {restate!r}.")


def evidence_ids(layout: _Marks, texts: Sequence[str]) -> list[int]:
    """``<MARK_L> d_1 <MARK_R> .. <MARK_L> d_k <MARK_R>``, in rank order, nothing between blocks."""
    ids: list[int] = []
    for text in texts:
        ids += layout.marked(text)
    return ids


def placed_ids(evidence: Sequence[int], text_ids: Sequence[int], i: int, restate: int = RESTATE_TOKENS) -> list[int]:
    """What goes between ``text[:i]`` and the continuation at point ``i``: the evidence block, then the
    last ``restate`` text tokens again. No evidence: nothing (no retrieval hit, nothing placed)."""
    return list(evidence) + restated_ids(text_ids, i, restate) if evidence else []


def restated_ids(text_ids: Sequence[int], i: int, restate: int = RESTATE_TOKENS) -> list[int]:
    """The last ``restate`` text tokens before point ``i`` (restated after the evidence)."""
    return list(text_ids[max(0, i - restate):i]) if restate > 0 else []


def retrieval_points(n_tokens: int, stride: int, start: int | None = None) -> list[int]:
    """Text positions where a retrieval happens: every ``stride`` tokens, never at the end."""
    first = stride if start is None else start
    return list(range(first, n_tokens, stride))


def query_ids(text_ids: Sequence[int], i: int, query_tokens: int) -> list[int]:
    """The ids that form the query at point ``i``: the last ``query_tokens`` of the clean text."""
    return list(text_ids[max(0, i - query_tokens):i])


def query_text(lm: Any, text_ids: Sequence[int], i: int, query_tokens: int, skip: Sequence[int] = ()) -> str:
    """The query string at point ``i`` (decoded, marker/special ids dropped, stripped)."""
    drop = set(skip)
    ids = [t for t in query_ids(text_ids, i, query_tokens) if t not in drop]
    return lm.decode(ids, skip_special_tokens=True).strip()


def step_ids(text_ids: Sequence[int], i: int, evidence: Sequence[int], continuation: int) -> list[int]:
    """``text[:i] + evidence + text[i : i + continuation]``: what the model reads at point ``i``."""
    return list(text_ids[:i]) + list(evidence) + list(text_ids[i:i + continuation])


def accumulated_ids(text_ids: Sequence[int], points: Sequence[int], evidence: Sequence[Sequence[int]]) -> list[int]:
    """The keep-everything option: ``text[:p1] E1 text[p1:p2] E2 ...`` (evidence is never dropped)."""
    ids: list[int] = []
    last = 0
    for p, ev in zip(points, evidence):
        ids += list(text_ids[last:p]) + list(ev)
        last = p
    return ids + list(text_ids[last:])


__all__ = ["RESTATE_TOKENS", "RalmLayoutConfig", "accumulated_ids", "check_restate", "evidence_ids", "placed_ids",
           "query_ids", "query_text", "restated_ids", "retrieval_points", "step_ids"]
