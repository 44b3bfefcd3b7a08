"""One RALM layout: training samples, ``eval ppl`` and ``RetrievalLoop`` read identical token ids.

For the same text and the same retrievals, the three must lay out ``text[:i] evidence text[i:i+s]``
identically; packing several points into one sequence must give exactly the unpacked loss; and a
training text must never retrieve its own article.
"""

from __future__ import annotations

import pytest
import torch

from flashback_agents import CachedContext, GenerationConfig, Layout
from flashback_agents.evaluation import ppl_scoring
from flashback_agents.ralm import RetrievalLoop
from flashback_agents.ralm_layout import RESTATE_TOKENS, accumulated_ids, evidence_ids, placed_ids, step_ids
from flashback_agents.retrieval import Document
from flashback_agents.training.ralm_corpus import chunk_retriever, split_articles
from flashback_agents.training.samples import (IGNORE, RalmSampleConfig, collate, packed_ralm_sample,
                                               ralm_point_sample, ralm_samples, ralm_text_samples)

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


class RecordingRetriever:
    """Distinct documents per call; remembers query -> documents and snapshots the context ids."""

    def __init__(self, ctx=None):
        self.ctx, self.by_query, self.snapshots = ctx, {}, []

    def retrieve(self, query: str, k: int = 2) -> list[Document]:
        if self.ctx is not None:
            self.snapshots.append(self.ctx.token_ids)
        if query in self.by_query:  # a repeated query (repetitive text) gets the same documents: replayable
            return list(self.by_query[query])[:k]
        n = len(self.by_query)
        docs = [Document(text=f"{WORDS[(n + j) % len(WORDS)]} evidence {n}.{j}", id=f"d{n}.{j}") for j in range(k)]
        self.by_query[query] = docs
        return docs


class ReplayRetriever:
    """Answers a query exactly as the recording did (nothing for a query never seen)."""

    def __init__(self, by_query):
        self.by_query = by_query

    def retrieve(self, query: str, k: int = 2) -> list[Document]:
        return list(self.by_query.get(query, []))[:k]


def test_training_evaluation_and_inference_lay_out_identical_ids(tiny_lm, monkeypatch):
    lm, stride, q, k = tiny_lm, 8, 16, 2
    layout = Layout(lm)
    prompt = lm.encode("The quick brown fox jumps over the lazy dog. INFO server started on port 8080 " * 2)[:16]
    # inference: the loop retrieves at the prompt's end and every `stride` generated tokens
    ctx = CachedContext(lm)
    rec = RecordingRetriever(ctx)
    res = RetrievalLoop(ctx, rec, stride=stride, query_tokens=q, top_k=k).generate(
        prompt, GenerationConfig(max_new_tokens=4 * stride, stop_at_eos=False))
    text = prompt + res.token_ids
    points = [len(prompt) + r.step for r in res.retrievals]
    assert points == [16, 24, 32, 40]
    # what is placed at a point: the evidence, then the text's last RESTATE_TOKENS tokens again
    evidence = {p: placed_ids(evidence_ids(layout, [d.text for d in rec.by_query[r.query]]), text, p)
                for p, r in zip(points, res.retrievals)}
    assert all(evidence[p][-RESTATE_TOKENS:] == text[p - RESTATE_TOKENS:p] for p in points)

    # training: one plain sample per point, same retrievals
    cfg = RalmSampleConfig(stride=stride, query_tokens=q, top_k=k, window=len(text), branches=0, vary_top_k=False)
    train = {}
    for s in ralm_text_samples(layout, text, ReplayRetriever(rec.by_query), cfg):
        first = next(j for j, t in enumerate(s.labels) if t != IGNORE)
        p = next(p for p in points if first == p + len(evidence[p]))
        train[p] = s
    assert sorted(train) == points

    # what the loop held when it retrieved at the next point == the training sample at this point
    for p, nxt in zip(points, rec.snapshots[1:]):
        expected = step_ids(text, p, evidence[p], stride)
        assert train[p].input_ids == expected
        assert nxt == expected
        assert train[p].labels == [IGNORE] * (p + len(evidence[p])) + text[p:p + stride]
    last = points[-1]
    assert ctx.token_ids == step_ids(text, last, evidence[last], len(text) - last)

    # evaluation: the ids score_append feeds after the cached text, and the tokens it scores
    fed: list[list[int]] = []
    real_forward = ppl_scoring._forward

    def spy(lm_, ids, cache, keep):
        fed.append(list(ids))
        return real_forward(lm_, ids, cache, keep)

    monkeypatch.setattr(ppl_scoring, "_forward", spy)
    block = text[:points[-1] + stride]
    ev_fn = lambda b, i: evidence.get(i, [])  # noqa: E731
    ppl_scoring.score_append(lm, [block], stride, ev_fn)
    for p in points:
        ids = train[p].input_ids
        assert ids[p:-1] in fed, f"eval fed something else at point {p}"


def test_packed_loss_equals_unpacked_loss(tiny_lm):
    lm = tiny_lm
    layout = Layout(lm)
    text = lm.encode("The quick brown fox jumps over the lazy dog. ERROR disk full on node 7. " * 8)[:100]
    branches = [(16, layout.marked("ERROR disk full")),
                (48, layout.marked("INFO server") + layout.marked("python code")),
                (80, layout.marked("tools"))]
    packed = packed_ralm_sample(text, branches, 16)
    assert packed.n_trained == sum(ralm_point_sample(text, i, ev, 16).n_trained for i, ev in branches) == 48
    with torch.no_grad():
        got = lm.model(**collate([packed], 0), use_cache=False).loss.item()
        total, n = 0.0, 0
        for i, ev in branches:
            s = ralm_point_sample(text, i, ev, 16)
            total += lm.model(**collate([s], 0), use_cache=False).loss.item() * s.n_trained
            n += s.n_trained
        # a batch mixing a packed and a plain sample (padding) gives the token-weighted mean too
        plain = ralm_point_sample(text, 16, branches[0][1], 16)
        mixed = lm.model(**collate([packed, plain], 0), use_cache=False).loss.item()
    assert got == pytest.approx(total / n, abs=1e-5)
    first = lm.model(**collate([plain], 0), use_cache=False).loss.item()
    assert mixed == pytest.approx((got * 48 + first * 16) / 64, abs=1e-5)


def test_a_text_never_retrieves_its_own_article(tiny_lm):
    lm = tiny_lm
    corpus = (" = Alpha = \n alpha server started on port 8080 alpha disk full alpha \n" * 1
              + " = = Section = = \n alpha again alpha port 8080 \n"
              + " = Bravo = \n bravo fox jumps over the lazy dog bravo \n"
              + " = Charlie = \n charlie alpha server port 8080 started charlie \n")
    articles = split_articles(corpus, "wiki")
    assert [a for a, _ in articles] == ["wiki#Alpha", "wiki#Bravo", "wiki#Charlie"]
    assert "= = Section = =" in articles[0][1]
    retriever = chunk_retriever(lm.tokenizer, articles, chunk_tokens=12, overlap=0)
    cfg = RalmSampleConfig(stride=4, query_tokens=8, top_k=2, window=64, branches=0, vary_top_k=False)
    left, right = lm.marker_ids

    def evidence_texts(samples):
        out = []
        for s in samples:
            ids = s.input_ids
            for a in [j for j, t in enumerate(ids) if t == left]:
                out.append(lm.decode(ids[a + 1:ids.index(right, a)]).strip())
        return out

    samples, _ = ralm_samples(lm, articles[:1], retriever, cfg)
    seen = evidence_texts(samples)
    assert seen and all(t in articles[1][1] + articles[2][1] and t not in articles[0][1] for t in seen)
    # with the exclusion off, the same text does retrieve its own article (so the test can fail)
    own, _ = ralm_samples(lm, articles[:1], retriever, cfg, exclude_own_source=False)
    assert any(t in articles[0][1] for t in evidence_texts(own))


def test_accumulated_layout_keeps_every_block():
    text = list(range(10))
    assert accumulated_ids(text, [2, 6], [[100], [200, 201]]) == [0, 1, 100, 2, 3, 4, 5, 200, 201, 6, 7, 8, 9]
    assert step_ids(text, 4, [100], 3) == [0, 1, 2, 3, 100, 4, 5, 6]
