"""Exact multi-token decoding (flashback_agents.speculation): prompt-lookup speculation and grammar
jump-forward give token-for-token the output of plain decoding, and the cache equals a recompute
after every rejected draft."""

from __future__ import annotations

import random

import pytest

from flashback_agents import CachedContext, GenerationConfig, generate, stream
from flashback_agents.generation import GenerationConfigError
from flashback_agents.evaluation.agent_bench import TOOLS as AGENT_BENCH_TOOLS
from flashback_agents.kvcache import cache_len
from flashback_agents.speculation import NgramIndex, plan
from flashback_agents.testing import assert_cache_matches_recompute, full_logits

TOL = 1e-4
TOOLS = AGENT_BENCH_TOOLS  # the tools of `bench agent --tool-calls`
OFF = dict(speculate=False, jump_forward=False)
MODES = {"plain": OFF, "speculate": dict(speculate=True, jump_forward=False),
         "jump": dict(speculate=False, jump_forward=True), "both": dict(speculate=True, jump_forward=True)}


def assert_consistent(ctx):
    assert_cache_matches_recompute(ctx, TOL)


def repetitive_prompt(rng, n=40):
    """Random ids with a repeated span: the random model's greedy output often loops, so prompt
    lookup finds drafts and some are accepted, some rejected."""
    ids = [rng.randrange(3, 440) for _ in range(n)]
    return ids + ids[: n // 2]


def run(lm, prompt, processors=(), **cfg):
    ctx = CachedContext(lm)
    ctx.append(prompt)
    result = generate(ctx, GenerationConfig(**cfg), [p() for p in processors])
    return ctx, result


@pytest.mark.parametrize("seed", range(6))
def test_greedy_speculation_equals_plain_and_cache_equals_recompute(tiny_lm, seed):
    rng = random.Random(seed)
    prompt = repetitive_prompt(rng, rng.randint(8, 60))
    cfg = dict(max_new_tokens=rng.randint(1, 50), min_new_tokens=rng.randint(0, 10), draft_tokens=rng.randint(1, 8),
               ngram=rng.randint(1, 4))
    plain_ctx, plain = run(tiny_lm, prompt, **cfg, **OFF)
    spec_ctx, spec = run(tiny_lm, prompt, **cfg, speculate=True)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert spec.finish_reason == plain.finish_reason
    assert spec_ctx.token_ids == plain_ctx.token_ids
    assert plain.drafted == 0 and plain.forwards == max(0, len(plain_ctx) - len(prompt) - 1)
    assert spec.forwards <= plain.forwards
    assert_consistent(spec_ctx)


def test_speculation_accepts_and_rejects_drafts_yet_stays_exact(tiny_lm):
    """Some drafts are kept (fewer forwards), some rejected (cache rolled back): output unchanged.

    The random tiny model repeats its last token under greedy decoding (drafts always right); seeded
    sampling with ``speculate=True`` rejects many drafts, and must still equal plain seeded sampling."""
    rng = random.Random(1)
    drafted = accepted = 0
    for i in range(8):
        prompt = repetitive_prompt(rng, rng.randint(10, 50))
        sampling = dict(temperature=1.5, top_k=3, seed=i) if i % 2 else {}
        plain_ctx, plain = run(tiny_lm, prompt, max_new_tokens=40, min_new_tokens=40, **sampling, **OFF)
        ctx, spec = run(tiny_lm, prompt, max_new_tokens=40, min_new_tokens=40, **sampling, speculate=True)
        assert spec.token_ids == plain.token_ids
        assert ctx.token_ids == plain_ctx.token_ids
        assert_consistent(ctx)
        drafted, accepted = drafted + spec.drafted, accepted + spec.accepted
        assert spec.forwards == plain.forwards - spec.accepted  # every kept draft saved exactly one forward
        assert ctx.stats.drafted == spec.drafted and ctx.stats.accepted == spec.accepted
    assert accepted > 0 and drafted > accepted  # both paths exercised


def test_rejected_drafts_roll_the_cache_back_exactly(tiny_lm):
    rng = random.Random(2)
    ctx = CachedContext(tiny_lm, prefill_chunk=3)  # drafts span several chunks
    ctx.append([rng.randrange(3, 440) for _ in range(30)])
    for trial in range(12):
        if trial % 3 == 0:
            ctx.push_generated(rng.randrange(3, 440))  # a pending token runs with the drafts
        drafts = [rng.randrange(3, 440) for _ in range(rng.randint(1, 8))]
        before = ctx.token_ids
        rows = ctx.verify_forward(drafts)
        assert rows.shape[0] == len(drafts) + 1
        for i in range(len(drafts) + 1):  # row i: the logits after before + drafts[:i]
            assert (rows[i] - full_logits(tiny_lm, before + drafts[:i])).abs().max() < TOL
        n_ok = rng.randint(0, len(drafts))
        last = rng.randrange(3, 440)
        ctx.accept_verified(drafts, n_ok, last)
        assert ctx.token_ids == before + drafts[:n_ok] + [last]
        assert cache_len(ctx.cache) == len(ctx) - 1  # the chosen token is pending
        assert (ctx.next_token_logits() - full_logits(tiny_lm, ctx.token_ids)).abs().max() < TOL
    assert_consistent(ctx)


@pytest.mark.parametrize("stop", [["e"], ["ab", "z"], ["<"]])
def test_stream_equals_generate_with_stop_strings(tiny_lm, stop):
    """Tokens decoded past a stop string in one batch are rolled back: the context keeps exactly what
    plain decoding keeps; streamed text == generated text == plain text."""
    rng = random.Random(3)
    for _ in range(4):
        prompt = repetitive_prompt(rng, 30)
        cfg = dict(max_new_tokens=30, min_new_tokens=30, stop=stop)
        plain_ctx, plain = run(tiny_lm, prompt, **cfg, **OFF)
        ctx = CachedContext(tiny_lm)
        ctx.append(prompt)
        it = stream(ctx, GenerationConfig(**cfg, speculate=True))
        streamed = "".join(it)
        assert streamed == it.result.text == plain.text
        assert it.result.token_ids == plain.token_ids and it.result.stop_string == plain.stop_string
        assert ctx.token_ids == plain_ctx.token_ids
        assert_consistent(ctx)


def test_max_new_tokens_and_window_are_never_exceeded(tiny_lm):
    rng = random.Random(4)
    prompt = repetitive_prompt(rng, 40)
    for n in (1, 2, 3, 7):
        _, plain = run(tiny_lm, prompt, max_new_tokens=n, min_new_tokens=n, **OFF)
        _, spec = run(tiny_lm, prompt, max_new_tokens=n, min_new_tokens=n, speculate=True, draft_tokens=8)
        assert spec.token_ids == plain.token_ids and len(spec.token_ids) == n
    for budget in (len(prompt) + 1, len(prompt) + 5):  # the window ends mid-draft
        outs = []
        for mode in (OFF, dict(speculate=True)):
            ctx = CachedContext(tiny_lm, max_context_tokens=budget)
            ctx.append(prompt)
            outs.append((generate(ctx, GenerationConfig(max_new_tokens=50, min_new_tokens=50, **mode)), ctx))
        (a, actx), (b, bctx) = outs
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason == "context"
        assert len(bctx) == budget and bctx.token_ids == actx.token_ids


def _grammar(lm, kind="tool"):
    from flashback_agents.constrained import json_schema_processor, tool_call_processor

    if kind == "tool":
        return lambda: tool_call_processor(lm, TOOLS)
    schema = {"type": "object", "properties": {"level": {"enum": ["INFO", "WARN", "ERROR"]},
                                               "note": {"type": "string", "maxLength": 6}},
              "required": ["level", "note"]}
    return lambda: json_schema_processor(lm, schema)


@pytest.mark.parametrize("kind", ["tool", "json"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_constrained_plain_jump_forward_and_speculation_are_identical(tiny_lm, kind, temperature):
    """Greedy and seeded sampling: every mode gives the same tokens (drafts are verified, the sampler
    draws once per kept token as plain decoding does); the reply parses; jump-forward forces tokens."""
    pytest.importorskip("xgrammar")
    import json

    from flashback_agents.chat import parse_tool_calls

    forced = 0
    for seed in range(3):
        prompt = tiny_lm.encode("user: search the logs for ERROR " + "and WARN " * seed)
        outs = {}
        for name, mode in MODES.items():
            ctx, r = run(tiny_lm, prompt, [_grammar(tiny_lm, kind)], max_new_tokens=120, temperature=temperature,
                         seed=seed, **mode)
            assert_consistent(ctx)
            outs[name] = r
        for name, r in outs.items():
            assert r.token_ids == outs["plain"].token_ids, name
            assert r.finish_reason == "stop"
        assert outs["plain"].forced == 0 and outs["speculate"].forced == 0
        assert outs["jump"].forwards < outs["plain"].forwards
        forced += outs["jump"].forced
        text = outs["plain"].text
        if kind == "tool":
            _, calls = parse_tool_calls(tiny_lm.decode(outs["plain"].token_ids, skip_special_tokens=True), {"search_logs", "count_by_level"})
            assert len(calls) == 1
        else:
            assert json.loads(text)["level"] in ("INFO", "WARN", "ERROR")
    assert forced > 0


def test_lazy_call_grammar_under_auto_is_identical(tiny_lm):
    """tool_choice="auto": free text until the call tag opens (xgrammar triggered tag), driven directly."""
    pytest.importorskip("xgrammar")
    from flashback_agents.constrained import tool_call_processor

    rng = random.Random(8)
    for i in range(3):
        prompt = repetitive_prompt(rng, 30)
        sampling = dict(temperature=1.2, seed=i) if i == 2 else {}
        outs = [run(tiny_lm, prompt, [lambda: tool_call_processor(tiny_lm, TOOLS, auto=True)], max_new_tokens=30,
                    **sampling, **mode) for mode in MODES.values()]
        for ctx, r in outs:
            assert r.token_ids == outs[0][1].token_ids
            assert_consistent(ctx)


def test_jump_forward_tokenization_mismatch_is_a_rejected_draft(tiny_lm):
    """Canonical output is plain decoding's: where the tokenizer's encoding of a forced string differs
    from the tokens the model picks (token boundaries), the draft is rejected, the model's token kept."""
    pytest.importorskip("xgrammar")
    prompt = tiny_lm.encode("user: count the levels")
    _, plain = run(tiny_lm, prompt, [_grammar(tiny_lm)], max_new_tokens=120, **OFF)
    _, jump = run(tiny_lm, prompt, [_grammar(tiny_lm)], max_new_tokens=120, speculate=False, jump_forward=True)
    assert jump.token_ids == plain.token_ids
    assert jump.forced == jump.accepted > 0
    # the random tiny model picks other token boundaries than its tokenizer: drafts are rejected, yet
    # the tokens (and so the parsed call) equal plain decoding's
    assert jump.drafted > jump.accepted


def test_when_multi_token_decoding_is_off(tiny_lm):
    ctx = CachedContext(tiny_lm)
    ctx.append([5, 6, 7])
    greedy, sampled = GenerationConfig(), GenerationConfig(temperature=0.7)
    assert plan(ctx, greedy, [], None)[:2] == (True, False)  # no grammar: nothing to jump over
    assert plan(ctx, sampled, [], None)[:2] == (False, False)  # sampling: no lookup drafts by default
    assert plan(ctx, GenerationConfig(temperature=0.7, speculate=True), [], None)[:2] == (True, False)
    assert plan(ctx, greedy, [], lambda t: None)[:2] == (False, False)  # on_token may change the context
    assert plan(ctx, GenerationConfig(stop_at_eos=False), [], None)[:2] == (False, False)
    assert plan(ctx, greedy, [lambda ids, s: s], None)[:2] == (False, False)  # arbitrary processors


def test_on_token_and_user_processors_decode_one_token_per_forward(tiny_lm):
    rng = random.Random(5)
    prompt = repetitive_prompt(rng, 30)
    seen = []
    ctx, r = run(tiny_lm, prompt, max_new_tokens=20, min_new_tokens=20)
    ctx2 = CachedContext(tiny_lm)
    ctx2.append(prompt)
    r2 = generate(ctx2, GenerationConfig(max_new_tokens=20, min_new_tokens=20), on_token=seen.append)
    assert r2.token_ids == r.token_ids == seen and r2.drafted == 0 and r2.forwards == 19
    calls = []

    def proc(ids, scores):
        calls.append(len(ids[0]))
        return scores
    ctx3 = CachedContext(tiny_lm)
    ctx3.append(prompt)
    r3 = generate(ctx3, GenerationConfig(max_new_tokens=20, min_new_tokens=20), [proc])
    assert r3.token_ids == r.token_ids and r3.drafted == 0 and calls == list(range(len(prompt), len(prompt) + 20))


def test_hybrid_caches_do_not_speculate(tmp_path):
    from flashback_agents import load_model
    from flashback_agents.testing import build_tiny_arch_dir

    lm = load_model(str(build_tiny_arch_dir(tmp_path / "lfm2", "lfm2")), device="cpu")
    ctx = CachedContext(lm)
    ctx.append([5, 6, 7, 5, 6, 7, 5, 6])
    assert plan(ctx, GenerationConfig(), [], None)[:2] == (False, False)
    r = generate(ctx, GenerationConfig(max_new_tokens=8, min_new_tokens=8))
    assert r.drafted == 0 and len(r.token_ids) == 8


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "qwen3"])
def test_other_architectures_speculate_exactly(tmp_path, arch):
    from flashback_agents import load_model
    from flashback_agents.testing import build_tiny_arch_dir

    lm = load_model(str(build_tiny_arch_dir(tmp_path / arch, arch)), device="cpu")
    rng = random.Random(6)
    for _ in range(3):
        prompt = repetitive_prompt(rng, 30)
        _, plain = run(lm, prompt, max_new_tokens=30, min_new_tokens=30, **OFF)
        ctx, spec = run(lm, prompt, max_new_tokens=30, min_new_tokens=30, speculate=True)
        assert spec.token_ids == plain.token_ids
        assert_consistent(ctx)


def test_ngram_index_drafts_the_latest_continuation():
    idx = NgramIndex([1, 2, 3, 4, 9, 1, 2, 3, 5, 6], ngram=3)
    idx.extend([7, 1, 2, 3])
    assert idx.draft(4) == [5, 6, 7, 1]  # the latest earlier "1 2 3" was followed by 5 6 ...
    idx.extend([8])
    assert idx.draft(3) == []  # "8" never occurred before
    idx = NgramIndex([4, 5, 6, 4], ngram=2)
    assert idx.draft(2) == [5, 6]  # falls back to a 1-token match
    idx = NgramIndex([3, 7, 8, 7, 8], ngram=2)
    assert idx.draft(5) == [7, 8, 7, 8, 7]  # a loop: the match overlaps the end and copies itself


@pytest.mark.parametrize("field,value", [("speculate", "yes"), ("draft_tokens", 0), ("draft_tokens", 65),
                                         ("ngram", 0), ("jump_forward", None), ("draft_tokens", 2.5)])
def test_bad_settings_are_refused_with_advice(field, value):
    with pytest.raises(GenerationConfigError, match=field):
        GenerationConfig(**{field: value}).validate()


@pytest.mark.model
def test_default_model_agent_run_is_identical_with_speculation(default_lm):
    """A whole ChatEngine agent run (required tool calls whose arguments echo the tool results, then a
    free-text answer) gives the same token ids with speculation + jump-forward as without, with far
    fewer forwards per generated token on the constrained calls."""
    pytest.importorskip("xgrammar")
    from flashback_agents.engines import local_engine
    from flashback_agents.layout import Message

    def agent(mode):
        engine = local_engine(default_lm)
        msgs = [Message("system", "You are a log analysis agent. Use the tools, then answer briefly."),
                Message("user", "Which component reports the most errors? Search for ERROR first.")]
        out, forwards, tokens = [], 0, 0
        try:
            for step in range(4):
                cfg = GenerationConfig(max_new_tokens=48, **mode)
                reply = engine.chat(msgs, tools=TOOLS, tool_choice="required" if step < 3 else None, config=cfg)
                out.append(reply.token_ids)
                if step < 3:
                    forwards, tokens = forwards + reply.usage.forwards, tokens + reply.usage.output_tokens
                    call = reply.tool_calls[0]
                    msgs += [Message("assistant", reply.text, tool_calls=reply.tool_calls),
                             Message("tool", f"12:0{step} ERROR disk-monitor: /dev/sda{step} is 9{step}% full\n"
                                     f"12:0{step} WARN scheduler: job {step} retried", tool_call_id=call.id,
                                     name=call.name)]
        finally:
            engine.close()
        return out, forwards / tokens

    plain, plain_fpt = agent(OFF)
    fast, fast_fpt = agent({})  # the defaults: speculation and jump-forward on (greedy)
    assert fast == plain
    assert plain_fpt > 0.9 and fast_fpt <= 0.6, (plain_fpt, fast_fpt)


def test_integrations_pass_the_settings_and_report_the_counters(tiny_model_dir):
    pytest.importorskip("xgrammar")
    from langchain_core.messages import HumanMessage

    from langchain_flashback import ChatFlashBack

    chat = ChatFlashBack(model=str(tiny_model_dir), speculate=False, draft_tokens=4, jump_forward=False)
    cfg = chat._config(None, {})
    assert (cfg.speculate, cfg.draft_tokens, cfg.jump_forward) == (False, 4, False)
    assert chat._config(None, {"speculate": True, "jump_forward": True}).jump_forward is True
    msgs = [HumanMessage("find x")]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}, "required": ["q"]}}}]
    fast = ChatFlashBack(model=str(tiny_model_dir), max_tokens=60).bind_tools(tools, tool_choice="required")
    plain = chat.bind_tools(tools, tool_choice="required")
    a, b = fast.invoke(msgs), plain.invoke(msgs)
    assert a.tool_calls and [c["args"] for c in a.tool_calls] == [c["args"] for c in b.tool_calls]
    assert a.response_metadata["forced_tokens"] > 0 and b.response_metadata["forced_tokens"] == 0
    assert a.response_metadata["decode_forwards"] < b.response_metadata["decode_forwards"]
    assert b.response_metadata["draft_tokens"] == 0

    llama_index = pytest.importorskip("llama_index.llms.flashback")
    from llama_index.core.llms import ChatMessage

    llm = llama_index.FlashBack(model=str(tiny_model_dir), speculate=True, draft_tokens=3, jump_forward=False,
                                max_tokens=12, min_tokens=12)
    cfg = llm._config({"draft_tokens": 5})
    assert (cfg.speculate, cfg.draft_tokens, cfg.jump_forward) == (True, 5, False)
    usage = llm.chat([ChatMessage(role="user", content="hello hello hello")]).raw["usage"]
    assert {"decode_forwards", "draft_tokens", "draft_tokens_accepted", "forced_tokens"} <= set(usage)
    assert usage["decode_forwards"] + usage["draft_tokens_accepted"] == usage["completion_tokens"] - 1


def test_looked_up_drafts_per_forward_adapt_to_what_is_kept(tiny_lm, monkeypatch):
    """Drafts verified per forward follow assisted generation's schedule: two more after a forward that
    kept all of them, one fewer after one that did not, within 1..draft_tokens; the output stays exact."""
    seen: list[tuple[int, int]] = []  # (drafts verified, drafts kept) per forward
    accept = CachedContext.accept_verified

    def spy(self, drafts, n_ok, last):
        seen.append((len(drafts), n_ok))
        return accept(self, drafts, n_ok, last)

    monkeypatch.setattr(CachedContext, "accept_verified", spy)
    rng = random.Random(3)
    prompt = repetitive_prompt(rng, 40)
    sampling = dict(max_new_tokens=60, min_new_tokens=60, temperature=1.5, top_k=3, seed=1)
    _, spec = run(tiny_lm, prompt, **sampling, speculate=True, jump_forward=False, draft_tokens=8)
    monkeypatch.setattr(CachedContext, "accept_verified", accept)
    _, plain = run(tiny_lm, prompt, **sampling, **OFF)
    assert spec.token_ids == plain.token_ids
    cap = 8
    for n, kept in seen:
        assert 1 <= n <= cap
        cap = min(8, cap + 2) if kept == n else max(1, cap - 1)
    assert any(kept < n for n, kept in seen) and any(kept == n for n, kept in seen)
    assert min(n for n, _ in seen) < 8  # rejections lowered the cap
