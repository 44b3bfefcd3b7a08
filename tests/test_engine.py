"""Engine invariants on a tiny random Llama: cached logits == full recompute after every operation."""

from __future__ import annotations

import random

import pytest
import torch

from flashback_agents import (CachedContext, ContextLoadError, ContextOverflowError, ContextPool, GenerationConfig,
                              Layout, LayoutError, Message, ModelLoadError, ToolCall, generate, load_model, stream)
from flashback_agents.kvcache import GrowingLayer
from flashback_agents.testing import assert_cache_matches_recompute

TOL = 1e-4


def assert_consistent(ctx):
    assert_cache_matches_recompute(ctx, TOL)


def rand_ids(lm, n, rng):
    return [rng.randrange(3, 440) for _ in range(n)]


def test_markers_added_as_special_tokens_with_mean_rows(tiny_lm):
    left, right = tiny_lm.marker_ids
    tok = tiny_lm.tokenizer
    assert tok.convert_ids_to_tokens([left, right]) == ["<MARK_L>", "<MARK_R>"]
    assert tiny_lm.encode("<MARK_L>x<MARK_R>")[0] == left  # one token each, never split
    emb = tiny_lm.model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    mean = emb[:left].mean(0)
    assert torch.allclose(emb[left], mean, atol=1e-6) and torch.allclose(emb[right], mean, atol=1e-6)


def test_random_operation_sequences_keep_cache_equal_to_recompute(tiny_lm):
    rng = random.Random(0)
    ctx = CachedContext(tiny_lm, prefill_chunk=7)
    ctx.append(rand_ids(tiny_lm, 20, rng))
    assert_consistent(ctx)
    for step in range(25):
        op = rng.choice(["append", "evidence", "sync", "rollback", "fork", "generate", "save"])
        if op == "append":
            ctx.append(rand_ids(tiny_lm, rng.randint(1, 30), rng))
        elif op == "evidence":
            ctx.append_evidence("disk full on node 7", source="log.txt")
        elif op == "sync":
            keep = rng.randint(0, len(ctx))
            ctx.sync(ctx.token_ids[:keep] + rand_ids(tiny_lm, rng.randint(0, 20), rng) or [5])
        elif op == "rollback" and len(ctx) > 2:
            ctx.rollback(rng.randint(1, len(ctx) - 1))
        elif op == "fork":
            other = ctx.fork()
            other.append(rand_ids(tiny_lm, 5, rng))
            assert_consistent(other)
        elif op == "generate":
            generate(ctx, GenerationConfig(max_new_tokens=rng.randint(1, 6)))
        elif op == "save":
            pass
        if len(ctx) > 380:
            ctx.rollback(len(ctx) - 100)
        assert_consistent(ctx)


def test_save_load_roundtrip_and_foreign_file_refused(tiny_lm, tiny_model_dir, tmp_path):
    ctx = CachedContext(tiny_lm)
    ctx.append("hello world, a saved context")
    generate(ctx, GenerationConfig(max_new_tokens=3))  # leaves a pending token: save must flush it
    path = tmp_path / "ctx.pt"
    ctx.save(path)
    loaded = CachedContext.load(tiny_lm, path)
    assert loaded.token_ids == ctx.token_ids
    assert_consistent(loaded)
    assert torch.allclose(loaded.next_token_logits(), ctx.next_token_logits(), atol=TOL)

    other = load_model(str(tiny_model_dir))
    with torch.no_grad():
        other.model.get_input_embeddings().weight[0] += 1.0
    other._fingerprint = None
    with pytest.raises(ContextLoadError, match="another model or tokenizer"):
        CachedContext.load(other, path)
    (tmp_path / "junk.pt").write_bytes(b"not a context")
    with pytest.raises(ContextLoadError, match="not a saved flashback-agents context"):
        CachedContext.load(tiny_lm, tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="No saved context"):
        CachedContext.load(tiny_lm, tmp_path / "missing.pt")


def test_sync_computes_exactly_the_new_suffix(tiny_lm):
    rng = random.Random(1)
    ctx = CachedContext(tiny_lm)
    base = rand_ids(tiny_lm, 50, rng)
    r = ctx.sync(base)
    assert (r.reused, r.computed) == (0, 50)
    new = base[:30] + rand_ids(tiny_lm, 17, rng)
    before = ctx.stats.tokens_computed
    r = ctx.sync(new)
    common = next(i for i in range(50) if i >= len(new) or new[i] != base[i])
    assert (r.reused, r.computed) == (common, len(new) - common)
    assert ctx.stats.tokens_computed - before == len(new) - common
    assert_consistent(ctx)


def test_overflow_is_refused_and_loses_nothing(tiny_lm):
    ctx = CachedContext(tiny_lm, max_context_tokens=100)
    ctx.append(list(range(10, 90)))
    before = ctx.token_ids
    logits = ctx.next_token_logits().clone()
    with pytest.raises(ContextOverflowError, match=r"needs 110 tokens but the limit is 100 \(10 too many\)"):
        ctx.append(list(range(10, 40)))
    with pytest.raises(ContextOverflowError):
        ctx.sync(before + [5] * 30)
    assert ctx.token_ids == before
    assert torch.equal(ctx.next_token_logits(), logits)
    assert_consistent(ctx)
    # generation stops at the window instead of failing
    res = generate(ctx, GenerationConfig(max_new_tokens=50, stop_at_eos=False))
    assert res.finish_reason == "context" and len(ctx) == 100


def test_bad_token_ids_are_clear_errors(tiny_lm):
    ctx = CachedContext(tiny_lm)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        ctx.append([10, 10_000_000])
    with pytest.raises(TypeError, match="token ids must be integers"):
        ctx.append([1.5])
    with pytest.raises(ValueError, match="cannot roll back 3 tokens"):
        ctx.rollback(3)
    with pytest.raises(ValueError, match="context is empty"):
        ctx.next_token_logits()
    assert len(ctx) == 0


def test_growing_cache_writes_in_place(tiny_lm):
    ctx = CachedContext(tiny_lm)
    ctx.append(list(range(10, 20)))
    layer = ctx.cache.layers[0]
    assert isinstance(layer, GrowingLayer)
    ptr = layer._kbuf.data_ptr()
    for t in range(30):
        ctx.append([20 + t])
    assert layer._kbuf.data_ptr() == ptr  # no reallocation below capacity: no per-token copy
    assert_consistent(ctx)


def test_generation_greedy_stream_equals_generate_and_stays_in_context(tiny_lm):
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    a = CachedContext(tiny_lm)
    a.append("the quick brown fox")
    res = generate(a, cfg)
    b = CachedContext(tiny_lm)
    b.append("the quick brown fox")
    run = stream(b, cfg)
    text = "".join(run)
    assert text == res.text and run.result.token_ids == res.token_ids
    assert a.token_ids[-12:] == res.token_ids and len(a) == len(tiny_lm.encode("the quick brown fox")) + 12


def test_stop_strings_are_cut_and_sampling_is_seeded(tiny_lm):
    ctx = CachedContext(tiny_lm)
    ctx.append("hello")
    probe = generate(ctx.fork(), GenerationConfig(max_new_tokens=8, stop_at_eos=False))
    if len(probe.text) >= 3:
        stop = probe.text[1:3]
        res = generate(ctx.fork(), GenerationConfig(max_new_tokens=8, stop=[stop], stop_at_eos=False))
        assert res.finish_reason == "stop" and res.stop_string == stop
        assert res.text == probe.text[: probe.text.find(stop)]
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=3, stop_at_eos=False)
    assert generate(ctx.fork(), cfg).token_ids == generate(ctx.fork(), cfg).token_ids
    with pytest.raises(ValueError, match="top_p"):
        generate(ctx, GenerationConfig(top_p=0))


def test_layout_is_prefix_stable_and_marks_tool_results(tiny_lm):
    lay = Layout(tiny_lm)
    tools = [{"type": "function", "function": {"name": "grep", "description": "search",
                                                 "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    msgs = [Message("system", "You analyse logs."), Message("user", "How many errors?", documents=["doc one"]),
            Message("assistant", "", tool_calls=[ToolCall("grep", {"q": "ERROR"}, "c1")]),
            Message("tool", "3 lines", tool_call_id="c1", name="grep"), Message("assistant", "There are 3."),
            Message("user", "Thanks")]
    prev: list[int] = []
    for n in range(1, len(msgs) + 1):
        ids = lay.render(msgs[:n], tools=tools, add_generation_prompt=False)
        assert ids[: len(prev)] == prev
        prev = ids
    left, right = tiny_lm.marker_ids
    assert prev.count(left) == 2 and prev.count(right) == 2  # the document and the tool result
    assert lay.render(msgs, tools=tools) == lay.render(msgs, tools=tools)  # deterministic
    # prepend moves evidence before the question
    pre = lay.render(msgs[:2], pattern="prepend", add_generation_prompt=False)
    q = tiny_lm.encode("How many errors?")
    pos_q = next(i for i in range(len(pre)) if pre[i:i + len(q)] == q)
    assert pre.index(left) < pos_q


def test_layout_reuses_generated_ids_for_replies(tiny_lm):
    lay = Layout(tiny_lm)
    ctx = CachedContext(tiny_lm)
    msgs = [Message("user", "hi")]
    ctx.sync(lay.render(msgs))
    res = generate(ctx, GenerationConfig(max_new_tokens=6, stop_at_eos=False))
    reply = Message("assistant", res.text)
    lay.remember_reply(reply, res.token_ids)
    nxt = lay.render(msgs + [reply, Message("user", "more")])
    r = ctx.sync(nxt)
    assert r.reused == len(ctx.token_ids) - r.computed
    assert nxt[: len(lay.render(msgs)) + 6] == ctx.token_ids[: len(lay.render(msgs)) + 6]


def test_layout_errors(tiny_lm):
    lay = Layout(tiny_lm)
    with pytest.raises(LayoutError, match="unknown role 'robot'"):
        lay.render([Message("robot", "x")])
    with pytest.raises(LayoutError, match="no earlier assistant message made a call"):
        lay.render([Message("user", "x"), Message("tool", "r", tool_call_id="zz")])
    with pytest.raises(LayoutError, match="only the first message"):
        lay.render([Message("user", "x"), Message("system", "y")])


def test_pool_picks_longest_prefix_locks_and_evicts(tiny_lm):
    pool = ContextPool(tiny_lm, max_contexts=3)
    a = list(range(10, 160))
    b = list(range(200, 240))
    with pool.acquire(a) as lease:
        assert lease.sync.computed == 150
        ctx_a = lease.ctx
    with pool.acquire(b) as lease:
        assert lease.ctx is not ctx_a and lease.sync.computed == 40
    with pool.acquire(a + [7, 8]) as lease:
        assert lease.ctx is ctx_a and (lease.sync.reused, lease.sync.computed) == (150, 2)
        # a context in use is never handed out twice
        with pool.acquire(a + [7, 8, 9]) as inner:
            assert inner.ctx is not ctx_a
    # divergence far back forks the shared prefix instead of destroying the long context
    with pool.acquire(a[:10] + [400] * 80) as lease:
        assert lease.ctx is not ctx_a and lease.sync.reused == 10
    assert len(pool) <= 3
    tiny = ContextPool(tiny_lm, max_bytes=1)
    with tiny.acquire(a):
        pass
    assert len(tiny) == 1  # over the byte budget, but the newest conversation is kept (PoolBudgetWarning)


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="Unknown model spec 'no-such-model'"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelLoadError, match="Model path not found"):
        load_model(str(tmp_path / "nothing" / "here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a Hugging Face model directory"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="server address"):
        load_model("http://127.0.0.1:8080/v1")


def test_context_config_is_one_validated_setting(tiny_lm):
    from flashback_agents import ContextConfig, ContextError

    cfg = ContextConfig(max_context_tokens=400, on_overflow="evict", low_water=0.6, prefill_chunk=7)
    ctx = CachedContext(tiny_lm, config=cfg)
    loose = CachedContext(tiny_lm, max_context_tokens=400, on_overflow="evict", low_water=0.6, prefill_chunk=7)
    assert ctx.config == loose.config == cfg == ctx.fork().config
    for bad in ({"on_overflow": "drop"}, {"low_water": 0}, {"max_context_tokens": 0}, {"prefill_chunk": True}):
        with pytest.raises(ContextError):
            ContextConfig(**bad)
    with pytest.raises(ContextError, match="not both"):
        CachedContext(tiny_lm, config=cfg, on_overflow="shift")
    pool = ContextPool(tiny_lm, config=cfg)
    assert (pool.max_context_tokens, pool.on_overflow, pool.low_water) == (400, "evict", 0.6)
    with pool.acquire(tiny_lm.encode("hello there")) as lease:
        assert lease.ctx.config == cfg


def test_resolve_spec_is_the_one_spec_resolver(tmp_path, tiny_model_dir):
    from flashback_agents.export_gguf import base_gguf_for
    from flashback_agents.models import DEFAULT_MODEL, default_gguf_path, resolve_spec
    from flashback_agents.llamacpp import resolve_gguf

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_spec(" smollm2 ").kind == "default" and resolve_spec("default").name == DEFAULT_MODEL
    assert resolve_spec("default").gguf == default_gguf_path() == resolve_gguf("default") == base_gguf_for(None)
    r = resolve_spec(str(gguf))
    assert (r.kind, r.name, r.gguf) == ("gguf", "m", gguf) and r.tokenizer_source() == (str(tmp_path), {"gguf_file": "m.gguf"})
    assert resolve_gguf(str(gguf)) == gguf == base_gguf_for(str(gguf))
    r = resolve_spec(str(tiny_model_dir))
    assert (r.kind, r.directory, r.source()) == ("dir", tiny_model_dir, str(tiny_model_dir))
    assert resolve_spec("org/model").kind == "hub" and resolve_spec("http://h:1/v1").kind == "server"
    for bad in ("", "no-such-model", str(tmp_path / "x.gguf"), str(tmp_path / "nothing" / "here")):
        with pytest.raises(ModelLoadError):
            resolve_spec(bad)
    with pytest.raises(ModelLoadError, match="is not one"):
        base_gguf_for(str(tiny_model_dir))


def test_hub_id_without_network_says_how_to_get_it_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="download it on a machine that has one"):
        load_model("someone/not-a-cached-model")


def test_not_a_causal_lm_is_refused(tmp_path):
    from transformers import DistilBertConfig

    DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=16).save_pretrained(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(str(tmp_path))


@pytest.mark.model
def test_default_model_loads_offline_and_answers(default_lm):
    lay = Layout(default_lm)
    ctx = CachedContext(default_lm)
    ctx.sync(lay.render([Message("user", "What is the capital of France? Answer in one word.")]))
    res = generate(ctx, GenerationConfig(max_new_tokens=20))
    assert "Paris" in res.text
    assert res.finish_reason == "stop"
    assert default_lm.max_positions == 8192


def test_repeated_identical_reply_keeps_its_own_ids(tiny_lm):
    """The same reply text generated twice with different ids: each re-renders to its own ids."""
    lay = Layout(tiny_lm)
    msgs = [Message("user", "go")]
    p1 = lay.render(msgs)
    first = tiny_lm.encode("quick brown fox")
    lay.remember_reply(Message("assistant", "quick brown fox"), first + [2], prompt_ids=p1)
    msgs2 = msgs + [Message("assistant", "quick brown fox"), Message("user", "again")]
    p2 = lay.render(msgs2)
    t = "quick brown fox"
    second = next(ids for ids in (tiny_lm.encode(t[:i]) + tiny_lm.encode(t[i:]) for i in range(1, len(t)))
                  if ids != first)
    assert second != first and tiny_lm.decode(second) == "quick brown fox"  # other ids, same text
    lay.remember_reply(Message("assistant", "quick brown fox"), second + [2], prompt_ids=p2)
    full = lay.render(msgs2 + [Message("assistant", "quick brown fox")], add_generation_prompt=False)
    assert full[: len(p1) + len(first)] == p1 + first  # the first reply still renders to its own ids
    assert full[len(p2): len(p2) + len(second)] == second
