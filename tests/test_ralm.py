"""The FlashBack retrieval loop: exact compute accounting for append vs prepend, dedup, removal, errors."""

from __future__ import annotations

import pytest

from flashback_agents import CachedContext, GenerationConfig, generate
from flashback_agents.evaluation.ralm_bench import RalmBenchConfig, run_ralm_bench
from flashback_agents.ralm import RetrievalLoop
from flashback_agents.ralm_layout import RESTATE_TOKENS
from flashback_agents.retrieval import RetrievalError
from flashback_agents.testing import ScriptedRetriever, assert_cache_matches_recompute

PROMPT = "The quick brown fox jumps over the lazy dog. INFO server started on port 8080"


CFG = GenerationConfig(max_new_tokens=40, stop_at_eos=False)


def test_top_k_zero_equals_plain_generate(tiny_lm):
    ctx = CachedContext(tiny_lm)
    res = RetrievalLoop(ctx, ScriptedRetriever(), top_k=0).generate(PROMPT, CFG)
    ref_ctx = CachedContext(tiny_lm)
    ref_ctx.append(PROMPT)
    ref = generate(ref_ctx, CFG)
    assert res.token_ids == ref.token_ids and res.text == ref.text and res.retrievals == []
    assert ctx.token_ids == ref_ctx.token_ids
    # a stop string and EOS behave as in generate() too
    cfg = GenerationConfig(max_new_tokens=30, stop=[ref.text[5:8]] if len(ref.text) > 8 else ())
    a = RetrievalLoop(CachedContext(tiny_lm), None, top_k=0).generate(PROMPT, cfg)
    c = CachedContext(tiny_lm)
    c.append(PROMPT)
    b = generate(c, cfg)
    assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)


def test_append_computes_only_evidence_and_new_tokens(tiny_lm):
    ctx = CachedContext(tiny_lm)
    retr = ScriptedRetriever(ctx)
    loop = RetrievalLoop(ctx, retr, stride=8, query_tokens=64, top_k=2, pattern="append", keep_evidence=True)
    res = loop.generate(PROMPT, CFG)
    prompt_len = len(tiny_lm.encode(PROMPT))
    assert [r.step for r in res.retrievals] == [0, 8, 16, 24, 32]
    first = res.retrievals[0]  # fused with the prompt's prefill
    assert first.tokens_computed == prompt_len + first.evidence_tokens and first.tokens_reused == 0
    evidence_so_far = first.evidence_tokens
    for rec, snap in zip(res.retrievals[1:], retr.snapshots[1:]):
        assert len(rec.added_ids) == 2 and rec.evidence_tokens > 0
        # the evidence plus the one pending generated token; everything before is reused
        assert rec.tokens_computed == rec.evidence_tokens + 1
        assert rec.tokens_reused == len(snap) - 1 == prompt_len + evidence_so_far + rec.step - 1
        evidence_so_far += rec.evidence_tokens
    assert len(ctx) == prompt_len + evidence_so_far + 40
    assert ctx.token_ids == loop._layout_ids()
    assert "ZEBRAEVIDENCE" not in res.text and tiny_lm.marker_ids[0] not in res.token_ids
    assert len(res.token_ids) == 40 and "ZEBRAEVIDENCE" in ctx.text()
    # queries are the last query_tokens of prompt + generated text, never evidence
    assert all("ZEBRAEVIDENCE" not in q for q in retr.queries)
    assert_cache_matches_recompute(ctx)


def test_prepend_recomputes_everything_after_the_evidence(tiny_lm):
    ctx = CachedContext(tiny_lm)
    retr = ScriptedRetriever(ctx)
    loop = RetrievalLoop(ctx, retr, stride=8, query_tokens=64, top_k=2, pattern="prepend", label_sources=False)
    res = loop.generate(PROMPT, CFG)
    prompt_len = len(tiny_lm.encode(PROMPT))
    left = tiny_lm.marker_ids[0]
    for rec, snap in zip(res.retrievals[1:], retr.snapshots[1:]):
        assert snap[0] == left  # [evidence][prompt + generated]
        new_len = rec.evidence_tokens + prompt_len + rec.step
        # only the shared <MARK_L> survives; the new evidence, the prompt and all generated tokens are recomputed
        assert rec.tokens_reused == 1
        assert rec.tokens_computed == new_len - 1 >= prompt_len + rec.step
        assert len(rec.removed_ids) == 2 and len(rec.added_ids) == 2
    final = loop._layout_ids()
    assert ctx.token_ids == final and final[0] == left
    assert final[-(prompt_len + 40):][:prompt_len] == tiny_lm.encode(PROMPT)
    assert "ZEBRAEVIDENCE" not in res.text
    assert_cache_matches_recompute(ctx)
    # on the same text and settings, append computes far less per retrieval
    actx = CachedContext(tiny_lm)
    app = RetrievalLoop(actx, ScriptedRetriever(actx), stride=8, query_tokens=64, top_k=2,
                        label_sources=False).generate(PROMPT, CFG)
    assert sum(r.tokens_computed for r in app.retrievals[1:]) < sum(r.tokens_computed for r in res.retrievals[1:])


def test_same_chunk_is_not_appended_twice(tiny_lm):
    ctx = CachedContext(tiny_lm)
    res = RetrievalLoop(ctx, ScriptedRetriever(same=True), stride=8, query_tokens=64, top_k=1,
                        keep_evidence=True).generate(PROMPT, CFG)
    assert res.retrievals[0].added_ids == ["doc0"]
    for rec in res.retrievals[1:]:
        assert rec.doc_ids == ["doc0"] and rec.added_ids == [] and rec.tokens_computed == 0
    assert ctx.text().count("ZEBRAEVIDENCE") == 1


def test_default_layout_moves_a_re_retrieved_chunk_after_the_new_text(tiny_lm):
    """The paper's layout (the default): the evidence always sits right before the current stride,
    even when the same chunk comes back, so each retrieval computes the stride + the evidence."""
    ctx = CachedContext(tiny_lm)
    res = RetrievalLoop(ctx, ScriptedRetriever(same=True), stride=8, query_tokens=64, top_k=1).generate(PROMPT, CFG)
    assert ctx.text().count("ZEBRAEVIDENCE") == 1
    for prev, rec in zip(res.retrievals, res.retrievals[1:]):
        assert rec.removed_ids == ["doc0"] == rec.added_ids
        assert rec.tokens_computed == (rec.step - prev.step) + rec.evidence_tokens + rec.restated_tokens
        assert rec.restated_tokens == RESTATE_TOKENS  # the text's last tokens, again after the evidence
    assert_cache_matches_recompute(ctx)
    # restate=0 is the paper's layout exactly: the stride + the evidence, nothing else
    ctx0 = CachedContext(tiny_lm)
    res0 = RetrievalLoop(ctx0, ScriptedRetriever(same=True), stride=8, query_tokens=64, top_k=1,
                         restate=0).generate(PROMPT, CFG)
    for prev, rec in zip(res0.retrievals, res0.retrievals[1:]):
        assert rec.restated_tokens == 0 and rec.tokens_computed == (rec.step - prev.step) + rec.evidence_tokens
    assert_cache_matches_recompute(ctx0)


def test_keep_evidence_false_removes_old_evidence_and_pays_the_recompute(tiny_lm):
    ctx = CachedContext(tiny_lm)
    retr = ScriptedRetriever(ctx)
    loop = RetrievalLoop(ctx, retr, stride=8, query_tokens=64, top_k=1, keep_evidence=False)
    res = loop.generate(PROMPT, CFG)
    prompt_len = len(tiny_lm.encode(PROMPT))
    for prev, rec in zip(res.retrievals, res.retrievals[1:]):
        assert rec.removed_ids == prev.added_ids and rec.added_ids
        # the old evidence sat after the prompt and the tokens generated before it was retrieved:
        # everything from there on (the generated tokens that followed it) is recomputed
        assert rec.tokens_reused == prompt_len + prev.step
        placed = rec.evidence_tokens + rec.restated_tokens
        assert rec.tokens_computed == (prompt_len + rec.step + placed) - rec.tokens_reused
        assert rec.tokens_computed == (rec.step - prev.step) + placed
    assert ctx.text().count("ZEBRAEVIDENCE") == 1 and ctx.token_ids == loop._layout_ids()
    assert_cache_matches_recompute(ctx)


def test_continuing_from_a_filled_context_and_prefix_is_kept(tiny_lm):
    ctx = CachedContext(tiny_lm)
    ctx.append(PROMPT)
    n = len(ctx)
    retr = ScriptedRetriever(ctx)
    res = RetrievalLoop(ctx, retr, stride=8, top_k=1, pattern="prepend").generate([], CFG, input_start=4)
    assert res.retrievals[0].step == 0 and res.retrievals[0].tokens_reused == 4
    assert res.retrievals[0].tokens_computed == n - 4 + res.retrievals[0].evidence_tokens
    assert ctx.token_ids[:4] == tiny_lm.encode(PROMPT)[:4]


def test_bad_arguments_and_overlong_prompt(tiny_lm):
    ctx = CachedContext(tiny_lm)
    with pytest.raises(RetrievalError, match="pattern"):
        RetrievalLoop(ctx, ScriptedRetriever(), pattern="middle")
    with pytest.raises(RetrievalError, match="stride"):
        RetrievalLoop(ctx, ScriptedRetriever(), stride=0)
    with pytest.raises(RetrievalError, match="restate must be an integer >= 0"):
        RetrievalLoop(ctx, ScriptedRetriever(), restate=-1)
    with pytest.raises(RetrievalError, match="retriever is needed"):
        RetrievalLoop(ctx, None, top_k=2)
    long_prompt = list(tiny_lm.encode("ERROR disk full " * 200))[:600]
    with pytest.raises(RetrievalError, match="window is 512"):
        RetrievalLoop(ctx, ScriptedRetriever()).generate(long_prompt, CFG)
    assert len(ctx) == 0  # nothing was computed
    res = RetrievalLoop(ctx, ScriptedRetriever(), stride=8).generate(PROMPT, GenerationConfig(max_new_tokens=8))
    assert res.generated_tokens <= 8


def test_evidence_that_does_not_fit_is_skipped(tiny_lm):
    ctx = CachedContext(tiny_lm, max_context_tokens=60)
    prompt = tiny_lm.encode(PROMPT)
    res = RetrievalLoop(ctx, ScriptedRetriever(ctx), stride=4, top_k=2).generate(prompt, GenerationConfig(
        max_new_tokens=60, stop_at_eos=False))
    assert len(ctx) <= 60 and res.finish_reason in ("context", "length")


def test_bench_runs_on_the_tiny_model(tiny_lm, tmp_path):
    words = ("The quick brown fox jumps over the lazy dog . INFO server started on port 8080 . "
             "ERROR disk full on the main server . ") * 40
    (tmp_path / "valid.txt").write_text(" = Article = \n" + words + "\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text(" = Other = \n" + words + "\n", encoding="utf-8")
    out = run_ralm_bench(tiny_lm, config=RalmBenchConfig(sizes=(64, 128), new_tokens=16, stride=8, chunk_tokens=32,
                                                         overlap=4), data_dir=tmp_path, progress=False)
    assert [r["context_tokens"] for r in out["rows"]] == [64, 128]
    for r in out["rows"]:
        assert r["append_retrievals"] == r["prepend_retrievals"] == 2
        assert r["append_tokens_per_s"] > 0 and r["prepend_tokens_per_s"] > 0
        assert r["prepend_tokens_computed"] > r["append_tokens_computed"]
    assert set(out["ratios"]) == {"64", "128"}
    with pytest.raises(RetrievalError, match="WikiText-2 not found"):
        run_ralm_bench(tiny_lm, data_dir=tmp_path / "nowhere", progress=False)


@pytest.mark.model
def test_default_model_retrieves_and_keeps_greedy_output(default_lm, tmp_path):
    from flashback_agents.layout import Message
    from flashback_agents.retrieval.bm25 import BM25Retriever

    docs = ["The Zorblat festival is held every March in the town of Quellin.",
            "Lobsters are blue until cooked.", "Python lists are mutable sequences."]
    retr = BM25Retriever.from_texts(docs, ids=["zorblat", "lobster", "python"])
    ctx = CachedContext(default_lm)
    ids = ctx.layout.render([Message("user", "When is the Zorblat festival held?")], add_generation_prompt=False)
    # one retrieval, for the question (the un-adapted model restarts its sentence after evidence placed
    # mid-answer, which is what the adapter is for; docs/benchmarks.md section 5)
    res = RetrievalLoop(ctx, retr, stride=64, top_k=1).generate(ids, GenerationConfig(max_new_tokens=24),
                                                                answer_prefix=ctx.layout.generation_prompt())
    # the paper's layout: one evidence block, after the question (and after the text generated before
    # the latest retrieval), never inside it
    assert ctx.token_ids[:len(ids)] == ids and ctx.token_ids.count(default_lm.marker_ids[0]) == 1
    assert res.retrievals[0].doc_ids == ["zorblat"]
    assert not set(default_lm.marker_ids) & set(res.token_ids)  # the returned text is generated, never evidence
    assert "Quellin" in res.text  # only the evidence names the town: the model read it
    assert_cache_matches_recompute(ctx)
    ids = ctx.layout.render([Message("user", "When is the Zorblat festival held?")])
    plain_ctx = CachedContext(default_lm)
    plain_ctx.append(ids)
    loop_ctx = CachedContext(default_lm)
    a = RetrievalLoop(loop_ctx, retr, top_k=0).generate(ids, GenerationConfig(max_new_tokens=16))
    assert a.token_ids == generate(plain_ctx, GenerationConfig(max_new_tokens=16)).token_ids


def test_answer_prefix_goes_after_the_question_evidence(tiny_lm):
    prompt, prefix = tiny_lm.encode(PROMPT), tiny_lm.encode("<|im_start|>assistant\n")
    for pattern in ("append", "prepend"):
        ctx = CachedContext(tiny_lm)
        loop = RetrievalLoop(ctx, ScriptedRetriever(), stride=8, query_tokens=64, top_k=1, pattern=pattern)
        res = loop.generate(prompt, GenerationConfig(max_new_tokens=4, stop_at_eos=False), answer_prefix=prefix)
        ids = ctx.token_ids
        ev = res.retrievals[0].evidence_tokens + res.retrievals[0].restated_tokens
        if pattern == "append":  # [prompt][evidence][the prompt's last tokens again][answer prefix][generated]
            assert ids[:len(prompt)] == prompt and ids[len(prompt)] == tiny_lm.marker_ids[0]
            assert res.retrievals[0].restated_tokens == RESTATE_TOKENS
            assert ids[len(prompt) + ev - RESTATE_TOKENS:len(prompt) + ev] == prompt[-RESTATE_TOKENS:]
            assert ids[len(prompt) + ev:len(prompt) + ev + len(prefix)] == prefix
        else:  # [evidence][prompt][answer prefix][generated]
            assert ids[ev:ev + len(prompt) + len(prefix)] == prompt + prefix
        assert res.retrievals[0].tokens_computed == len(prompt) + ev + len(prefix)
