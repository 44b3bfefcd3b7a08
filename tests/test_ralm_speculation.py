"""Multi-token decoding inside the FlashBack retrieval loop (issue 30): prompt-lookup speculation and
grammar jump-forward give the output of one token per forward, never cross a retrieval point, look up
the evidence too, and each evidence placement (text, evidence, restated tail) is one forward."""

from __future__ import annotations

import random

import pytest

from flashback_agents import CachedContext, GenerationConfig, generate, kvcache, speculation
from flashback_agents.kvcache import cache_len
from flashback_agents.ralm import RetrievalLoop
from flashback_agents.testing import ScriptedRetriever, assert_cache_matches_recompute

OFF = dict(speculate=False, jump_forward=False)
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def Retriever(ctx=None) -> ScriptedRetriever:
    """Fresh documents on every call, worded so that their words repeat (drafts can be copied)."""
    return ScriptedRetriever(ctx, words=WORDS, text=lambda w, n, o: f"{w} note {n}: {w} {o} {w}")


def repetitive_prompt(rng: random.Random, n: int = 40) -> list[int]:
    ids = [rng.randrange(3, 440) for _ in range(n)]
    return ids + ids[: n // 2]


def ralm(lm, prompt, *, stride=8, top_k=2, pattern="append", keep_evidence=False, processors=(), restate=8, **cfg):
    ctx = CachedContext(lm)
    retr = Retriever(ctx)
    loop = RetrievalLoop(ctx, retr, stride=stride, query_tokens=32, top_k=top_k, pattern=pattern,
                         keep_evidence=keep_evidence, restate=restate)
    res = loop.generate(prompt, GenerationConfig(**cfg), [p() for p in processors])
    return ctx, loop, retr, res


def records(res):
    return [(r.step, r.query, r.doc_ids, r.added_ids, r.removed_ids, r.evidence_tokens, r.restated_tokens,
             r.tokens_computed, r.tokens_reused, r.forwards) for r in res.retrievals]


def assert_same_run(a, b):
    """Two runs of the loop (``(ctx, loop, retr, res)``) that did exactly the same thing."""
    (actx, _, aretr, ares), (bctx, _, bretr, bres) = a, b
    assert ares.token_ids == bres.token_ids and ares.text == bres.text
    assert ares.finish_reason == bres.finish_reason and ares.generated_tokens == bres.generated_tokens
    assert actx.token_ids == bctx.token_ids and cache_len(actx.cache) == cache_len(bctx.cache)
    assert records(ares) == records(bres) and aretr.snapshots == bretr.snapshots
    assert ares.placement_forwards == bres.placement_forwards


@pytest.mark.parametrize("pattern,keep", [("append", False), ("append", True), ("prepend", False)])
def test_greedy_speculation_equals_one_token_per_forward(tiny_lm, pattern, keep):
    """Greedy: identical tokens, context, retrievals (queries, what each computed) and cache; the
    random tiny model repeats itself, so drafts are accepted: far fewer forwards than tokens."""
    rng = random.Random(0)
    for trial in range(3):
        prompt = repetitive_prompt(rng, rng.randint(10, 40))
        n = rng.randint(20, 40)
        cfg = dict(max_new_tokens=n, min_new_tokens=n, stride=rng.choice([4, 8, 16]), pattern=pattern,
                   keep_evidence=keep)
        plain = ralm(tiny_lm, prompt, **cfg, **OFF)
        spec = ralm(tiny_lm, prompt, **cfg, speculate=True, draft_tokens=rng.randint(2, 8))
        assert_same_run(spec, plain)
        p, s = plain[3], spec[3]
        # each placement's forward gives the next token's logits: one token without a decoding forward
        # (keep_evidence fills the tiny model's 512-token window before n tokens: finish_reason "context")
        m = p.generated_tokens
        assert p.drafted == 0 and p.decode_forwards == m - sum(1 for r in p.retrievals if r.forwards)
        assert s.accepted > 0 and s.forwards < m and s.forwards_per_token < p.forwards_per_token
        assert s.decode_forwards == p.decode_forwards - s.accepted  # every kept draft saved one forward
        assert_cache_matches_recompute(spec[0])


def test_seeded_sampling_with_rejected_drafts_is_exact(tiny_lm):
    """Seeded sampling with ``speculate=True`` rejects its drafts (the cache is cropped back each time;
    greedy runs in between accept theirs), yet the loop's output, context and retrievals equal one
    token per forward with the same seed."""
    rng = random.Random(1)
    drafted = accepted = 0
    for i in range(6):
        prompt = repetitive_prompt(rng, rng.randint(10, 40))
        sampling = dict(temperature=1.5, top_k=3, seed=i) if i % 2 else {}
        cfg = dict(max_new_tokens=40, min_new_tokens=40, pattern="prepend" if i >= 4 else "append", **sampling)
        plain = ralm(tiny_lm, prompt, **cfg, **OFF)
        spec = ralm(tiny_lm, prompt, **cfg, speculate=True)
        assert_same_run(spec, plain)
        drafted, accepted = drafted + spec[3].drafted, accepted + spec[3].accepted
        assert_cache_matches_recompute(spec[0])
    assert accepted > 0 and drafted > accepted  # both paths exercised


def test_no_step_crosses_a_retrieval_point_and_the_lookup_sees_the_evidence(tiny_lm, monkeypatch):
    """Every decoding step ends at the next retrieval point at the latest (the retriever sees exactly
    ``step`` generated tokens), and every lookup searches the context as it is, evidence included (the
    index keeps what a placement replaced too: drafts are only proposals)."""
    steps, lookups = [], []
    real_step, real_draft = speculation.Decoder.step, speculation.NgramIndex.draft

    def step(self, n_generated, budget):
        toks = real_step(self, n_generated, budget)
        steps.append((n_generated, len(toks)))
        return toks

    def draft(self, k, after=()):
        lookups.append((list(self.ids), list(ctx_box[0].ids)))
        return real_draft(self, k, after)

    monkeypatch.setattr(speculation.Decoder, "step", step)
    monkeypatch.setattr(speculation.NgramIndex, "draft", draft)
    prompt = repetitive_prompt(random.Random(2), 30)
    stride = 8
    ctx = CachedContext(tiny_lm)
    ctx_box = [ctx]
    retr = Retriever(ctx)
    res = RetrievalLoop(ctx, retr, stride=stride, query_tokens=32, top_k=2).generate(
        prompt, GenerationConfig(max_new_tokens=40, min_new_tokens=40, draft_tokens=8))
    assert res.accepted > 0 and steps
    assert [r.step for r in res.retrievals] == [0, 8, 16, 24, 32]
    for start, n in steps:
        assert start % stride + n <= stride  # never past the next multiple of the stride
    marks = set(tiny_lm.marker_ids)
    for rec, snap in zip(res.retrievals[1:], retr.snapshots[1:]):
        assert snap[-1] not in marks and snap.count(tiny_lm.marker_ids[0]) == 2  # the previous evidence
        assert len(snap) == len(prompt) + rec.step + sum(
            r.evidence_tokens + r.restated_tokens for r in res.retrievals if r.step == rec.step - stride)
    assert lookups
    for index, held in lookups:  # the lookup ends where the context ends, and holds its current evidence
        assert index[-3:] == held[-3:]
        block = held[held.index(tiny_lm.marker_ids[0]):]  # from the first evidence block on
        assert any(index[i:i + len(block)] == block for i in range(len(index) - len(block) + 1))
    assert_cache_matches_recompute(ctx)


def test_top_k_zero_equals_generate_with_speculation(tiny_lm):
    prompt = repetitive_prompt(random.Random(3), 30)
    cfg = GenerationConfig(max_new_tokens=30, min_new_tokens=30, speculate=True)
    ctx = CachedContext(tiny_lm)
    res = RetrievalLoop(ctx, None, top_k=0).generate(prompt, cfg)
    ref_ctx = CachedContext(tiny_lm)
    ref_ctx.append(prompt)
    ref = generate(ref_ctx, cfg)
    assert res.token_ids == ref.token_ids and ctx.token_ids == ref_ctx.token_ids
    assert res.decode_forwards == ref.forwards < 29 and res.accepted == ref.accepted > 0


@pytest.mark.parametrize("stop", [["e"], ["ab", "z"]])
def test_stop_strings_inside_a_speculated_step(tiny_lm, stop):
    """Tokens decoded past a stop string in one step are rolled back: the loop keeps what one token per
    forward keeps (and retrieves nothing after the end)."""
    rng = random.Random(4)
    for _ in range(3):
        prompt = repetitive_prompt(rng, 30)
        cfg = dict(max_new_tokens=30, min_new_tokens=30, stop=stop, temperature=1.2, seed=rng.randrange(99))
        assert_same_run(ralm(tiny_lm, prompt, **cfg, speculate=True), ralm(tiny_lm, prompt, **cfg, **OFF))


def test_window_end_mid_stride(tiny_lm):
    prompt = repetitive_prompt(random.Random(5), 20)
    outs = []
    for mode in (OFF, dict(speculate=True)):
        ctx = CachedContext(tiny_lm, max_context_tokens=200)
        retr = Retriever(ctx)
        res = RetrievalLoop(ctx, retr, stride=8, query_tokens=32, top_k=2).generate(
            prompt, GenerationConfig(max_new_tokens=300, min_new_tokens=300, **mode))
        outs.append((ctx, None, retr, res))
    assert_same_run(*outs)
    assert outs[0][3].finish_reason == "context" and len(outs[0][0]) == 200


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_jump_forward_in_the_loop_is_exact(tiny_lm, temperature):
    """A grammar-constrained reply with retrieval: plain, jump-forward and both give the same tokens."""
    pytest.importorskip("xgrammar")
    from flashback_agents.constrained import json_schema_processor

    schema = {"type": "object", "properties": {"level": {"enum": ["INFO", "WARN", "ERROR"]},
                                               "note": {"type": "string", "maxLength": 12}},
              "required": ["level", "note"]}
    forced = 0
    for seed in range(2):
        prompt = tiny_lm.encode("user: search the logs for ERROR " + "and WARN " * seed)
        runs = {name: ralm(tiny_lm, prompt, stride=4, processors=[lambda: json_schema_processor(tiny_lm, schema)],
                           max_new_tokens=80, temperature=temperature, seed=seed, **mode)
                for name, mode in {"plain": OFF, "jump": dict(speculate=False, jump_forward=True),
                                   "both": dict(speculate=True, jump_forward=True)}.items()}
        for name, r in runs.items():
            assert_same_run(r, runs["plain"])
            assert r[3].finish_reason == "stop", name
        assert runs["jump"][3].decode_forwards < runs["plain"][3].decode_forwards
        forced += runs["jump"][3].accepted
    assert forced > 0


@pytest.mark.parametrize("pattern,restate", [("append", 8), ("append", 0), ("prepend", 8)])
def test_each_placement_is_one_forward(tiny_lm, monkeypatch, pattern, restate):
    """The last stride of text, the new evidence, the restated tail and the pending generated token are
    computed in one model call per placement (under ``prefill_chunk`` tokens), and its logits give the
    next token: with speculation off, one forward per generated token in all."""
    calls = []
    real = kvcache.forward

    def forward(model, chunk, cache, **kw):
        calls.append(chunk.shape[1])
        return real(model, chunk, cache, **kw)

    monkeypatch.setattr(kvcache, "forward", forward)
    prompt = repetitive_prompt(random.Random(6), 30)
    ctx, loop, retr, res = ralm(tiny_lm, prompt, pattern=pattern, restate=restate, max_new_tokens=40,
                                min_new_tokens=40, **OFF)
    assert [r.step for r in res.retrievals] == [0, 8, 16, 24, 32]
    assert calls[0] == res.retrievals[0].tokens_computed  # the prompt's prefill, fused with its evidence
    placements = [c for c in calls[1:] if c > 1]
    assert placements == [r.tokens_computed for r in res.retrievals[1:]]
    assert all(r.forwards == 1 for r in res.retrievals)
    assert len(calls) - 1 == res.forwards == 40 - 1  # the first token comes with the prefill
    assert res.placement_forwards == 4 and res.decode_forwards == 35 and res.forwards_per_token < 1
    assert ctx.token_ids == loop._layout_ids() and cache_len(ctx.cache) == len(ctx) - 1  # last token pending
    for r in res.retrievals[1:]:
        assert r.restated_tokens == (restate if pattern == "append" else 0)
    assert_cache_matches_recompute(ctx)


def _wikitext(tmp_path):
    words = ("The quick brown fox jumps over the lazy dog . INFO server started on port 8080 . "
             "ERROR disk full on the main server . ") * 40
    (tmp_path / "valid.txt").write_text(" = Article = \n" + words + "\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text(" = Other = \n" + words + "\n", encoding="utf-8")
    return tmp_path


def test_bench_reports_forwards_per_token_with_and_without_speculation(tiny_lm, tmp_path):
    from flashback_agents.cli.bench import ralm_table
    from flashback_agents.evaluation.ralm_bench import RalmBenchConfig, run_ralm_bench

    cfg = RalmBenchConfig(sizes=(64, 128), new_tokens=16, stride=8, chunk_tokens=32, overlap=4, repeats=1,
                          compare_no_speculation=True)
    out = run_ralm_bench(tiny_lm, config=cfg, data_dir=_wikitext(tmp_path), progress=False)
    assert [r["context_tokens"] for r in out["rows"]] == [64, 128]
    for r in out["rows"]:
        for p in ("append", "prepend"):
            assert r[f"{p}_identical_tokens"] is True  # speculation changes the forwards, not the tokens
            assert r[f"{p}_retrievals"] == r[f"{p}_no_spec_retrievals"] == 2
            assert r[f"{p}_tokens_computed"] == r[f"{p}_no_spec_tokens_computed"]
            assert r[f"{p}_no_spec_drafted"] == 0 and r[f"{p}_no_spec_forwards"] == 16  # 14 decoding + 2 placing
            assert r[f"{p}_forwards"] == r[f"{p}_no_spec_forwards"] - r[f"{p}_accepted"]
            assert r[f"{p}_forwards_per_token"] == r[f"{p}_forwards"] / 16
            assert r[f"{p}_placement_forwards"] == 2
        assert r["append_over_prepend"] > 0 and r["append_over_prepend_no_spec"] > 0
    lines = ralm_table(out["rows"])
    assert len(lines) == 1 + 3 * 2 and "forwards/token" in lines[0] and "drafts kept" in lines[0]
    assert lines[1].split()[:2] == ["64", "spec"] and lines[2].split()[:3] == ["64", "no", "spec"]
    assert "identical tokens" in lines[3] and "x" in lines[1]
    r = out["rows"][0]
    assert f"{r['append_forwards_per_token']:.2f} / {r['prepend_forwards_per_token']:.2f}" in lines[1]
    # the default run reports the speculating rows only
    out = run_ralm_bench(tiny_lm, config=RalmBenchConfig(sizes=(64,), new_tokens=8, stride=8, chunk_tokens=32,
                                                         overlap=4, repeats=1), data_dir=tmp_path, progress=False)
    assert "append_no_spec_tokens_per_s" not in out["rows"][0] and len(ralm_table(out["rows"])) == 2


def test_bench_ralm_cli_lengths(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from flashback_agents.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["bench", "ralm", "--model", "nowhere-model", "--lengths", "64,x"])
    assert res.exit_code == 2 and "--lengths" in res.output  # refused before the model loads
    res = runner.invoke(app, ["bench", "ralm", "--model", str(tiny_model_dir), "--data", str(_wikitext(tmp_path)),
                              "--quick", "--lengths", "64,96", "--json"])
    assert res.exit_code == 0, res.output
    import json

    data = json.loads(res.output[res.output.index("{"):])
    assert [r["context_tokens"] for r in data["rows"]] == [64, 96] and data["config"]["new_tokens"] == 16
    assert all(r["append_forwards_per_token"] > 0 for r in data["rows"])
