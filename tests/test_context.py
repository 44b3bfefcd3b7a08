"""CachedContext (flashback_agents/context.py) invariants on a tiny random Llama: cached logits == full
recompute after every operation; save/load, sync, overflow, the growing cache, one validated config."""

from __future__ import annotations

import random

import pytest
import torch

from flashback_agents import (CachedContext, ContextLoadError, ContextOverflowError, ContextPool, GenerationConfig,
                              generate, load_model)
from flashback_agents.kvcache import GrowingLayer
from flashback_agents.testing import assert_cache_matches_recompute

TOL = 1e-4


def rand_ids(lm, n, rng):
    return [rng.randrange(3, 440) for _ in range(n)]


def test_random_operation_sequences_keep_cache_equal_to_recompute(tiny_lm):
    rng = random.Random(0)
    ctx = CachedContext(tiny_lm, prefill_chunk=7)
    ctx.append(rand_ids(tiny_lm, 20, rng))
    assert_cache_matches_recompute(ctx, TOL)
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
            assert_cache_matches_recompute(other, TOL)
        elif op == "generate":
            generate(ctx, GenerationConfig(max_new_tokens=rng.randint(1, 6)))
        elif op == "save":
            pass
        if len(ctx) > 380:
            ctx.rollback(len(ctx) - 100)
        assert_cache_matches_recompute(ctx, TOL)


def test_save_load_roundtrip_and_foreign_file_refused(tiny_lm, tiny_model_dir, tmp_path):
    ctx = CachedContext(tiny_lm)
    ctx.append("hello world, a saved context")
    generate(ctx, GenerationConfig(max_new_tokens=3))  # leaves a pending token: save must flush it
    path = tmp_path / "ctx.pt"
    ctx.save(path)
    loaded = CachedContext.load(tiny_lm, path)
    assert loaded.token_ids == ctx.token_ids
    assert_cache_matches_recompute(loaded, TOL)
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
    assert_cache_matches_recompute(ctx, TOL)


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
    assert_cache_matches_recompute(ctx, TOL)
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
    assert_cache_matches_recompute(ctx, TOL)


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
