"""Perplexity evaluation, its retrieval: the documents retrieved once per stride (:class:`Retrievals`),
shared by every setting, and the evidence each layout places for them (prepend or append)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..layout import Layout
from ..ralm_layout import evidence_ids, placed_ids, query_text
from .ppl_config import PerplexityError, PplConfig
from .ppl_data import chunk_starts
from .ppl_scoring import EvidenceFn


@dataclass
class Retrievals:
    """The documents retrieved for each stride (with the largest top-k), shared by every setting."""

    docs: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    queries: int = 0
    empty: int = 0
    seconds: float = 0.0

    @classmethod
    def run(cls, lm: Any, retriever: Any, blocks: Sequence[Sequence[int]], cfg: PplConfig,
            progress: bool = False) -> "Retrievals":
        out = cls()
        k = max(cfg.top_ks)
        t0 = time.perf_counter()
        total = sum(len(chunk_starts(b, cfg.stride)) for b in blocks)
        with tqdm(total=total, desc="retrieve", unit="query", disable=not progress, leave=False) as bar:
            for b, block in enumerate(blocks):
                for i in chunk_starts(block, cfg.stride):
                    query = query_text(lm, block, i, cfg.query_tokens)
                    docs = [d.text for d in retriever.retrieve(query, k)] if query else []
                    out.docs[(b, i)] = docs
                    out.queries += 1
                    out.empty += int(not docs)
                    bar.update(1)
        out.seconds = time.perf_counter() - t0
        return out

    def prepend_fn(self, lm: Any, k: int) -> EvidenceFn:
        """In-Context RALM: the plain document texts (rank order), each followed by a newline."""
        memo: dict[str, list[int]] = {}

        def fn(b: int, i: int) -> list[int]:
            ids: list[int] = []
            for text in self.docs.get((b, i), [])[:k]:
                if text not in memo:
                    memo[text] = lm.encode(text + "\n")
                ids += memo[text]
            return ids
        return fn

    def append_fn(self, lm: Any, k: int, blocks: Sequence[Sequence[int]] = (), restate: int = 0,
                  markers: bool = True) -> EvidenceFn:
        """FlashBack: what the one RALM layout places at a point (:func:`..ralm_layout.placed_ids`):
        the evidence block, then the last ``restate`` tokens of ``blocks[b]`` before the point.
        ``markers=False``: the documents as plain text (:meth:`prepend_fn`'s) in that position."""
        if restate and not blocks:
            raise PerplexityError("append_fn: restating text tokens needs the blocks.")
        if markers:
            layout = Layout(lm)
            evidence: EvidenceFn = lambda b, i: evidence_ids(layout, self.docs.get((b, i), [])[:k])  # noqa: E731
        else:
            evidence = self.prepend_fn(lm, k)
        return lambda b, i: placed_ids(evidence(b, i), blocks[b] if restate else (), i, restate)
