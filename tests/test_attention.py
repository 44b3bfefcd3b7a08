"""flashback_sdpa (attention.py): same logits as transformers' sdpa on every step shape a cached
context runs, without repeating the cache per query head."""

from __future__ import annotations

import pytest
import torch

from flashback_agents import kvcache
from flashback_agents.attention import FOLD_MAX_QUERY, NAME, flashback_sdpa, use_flashback_attention


def _steps_logits(model, ids, cuts):
    """Logits of ``ids`` fed to one cache in pieces ending at ``cuts``."""
    cache = kvcache.new_cache(model)
    out, start = [], 0
    with torch.inference_mode():
        for end in cuts:
            res = kvcache.forward(model, torch.tensor([ids[start:end]]), cache)
            out.append(res.logits[0])
            start = end
    return torch.cat(out)


def test_default_loading_switches_grouped_models(tiny_lm):
    assert tiny_lm.model.config._attn_implementation == NAME


@pytest.mark.parametrize("cuts", [[40, 41, 42, 47, 60], [10, 10 + FOLD_MAX_QUERY + 30, 200], [150, 155, 156]])
def test_logits_equal_sdpa_for_prefills_and_verifications(tiny_lm, cuts):
    model = tiny_lm.model
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # the grouped case
    ids = torch.randint(3, 400, (cuts[-1],), generator=torch.Generator().manual_seed(0)).tolist()
    ours = _steps_logits(model, ids, cuts)
    model.set_attn_implementation("sdpa")
    try:
        ref = _steps_logits(model, ids, cuts)
        whole = _steps_logits(model, ids, [cuts[-1]])
    finally:
        assert use_flashback_attention(model)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    assert torch.allclose(ours, whole, atol=1e-4), (ours - whole).abs().max()


@pytest.mark.parametrize("q_len", [2, 7, FOLD_MAX_QUERY, FOLD_MAX_QUERY + 1, 3 * FOLD_MAX_QUERY])
@pytest.mark.parametrize("padded", [False, True])
def test_kernel_equals_repeated_cache_attention(q_len, padded):
    g = torch.Generator().manual_seed(q_len)
    b, kv_heads, groups, dim, past = (2 if padded else 1), 3, 3, 16, 37
    kv = past + q_len
    q = torch.randn(b, kv_heads * groups, q_len, dim, generator=g)
    k = torch.randn(b, kv_heads, kv, dim, generator=g)
    v = torch.randn(b, kv_heads, kv, dim, generator=g)
    mask = (torch.arange(q_len)[:, None] + past >= torch.arange(kv)[None, :]).expand(b, 1, q_len, kv).clone()
    if padded:
        mask[1, 0, :, :5] = False  # left padding in the second row: not the cache-then-causal pattern

    class Module:
        num_key_value_groups = groups

    with torch.no_grad():
        out, _ = flashback_sdpa(Module(), q, k, v, mask, scaling=0.25)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask, scale=0.25)
    assert out.shape == (b, q_len, kv_heads * groups, dim)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5), (out - ref.transpose(1, 2)).abs().max()


def test_training_with_gradients_uses_transformers_sdpa(tiny_lm):
    """With gradients on, the kernel defers to transformers (same function, same backward)."""
    calls = []
    import flashback_agents.attention as attention

    orig = attention.sdpa_attention_forward
    attention.sdpa_attention_forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        ids = torch.tensor([[5, 6, 7, 8]])
        mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
        tiny_lm.model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    finally:
        attention.sdpa_attention_forward = orig
        tiny_lm.model.zero_grad(set_to_none=True)
    assert calls


def test_long_steps_split_at_the_cache_when_the_mask_allows(monkeypatch):
    """A long step over a cache with the plain mask takes the split path; any other mask does not."""
    import flashback_agents.attention as attention

    used = []
    real = attention._split_attention
    monkeypatch.setattr(attention, "_split_attention", lambda *a: used.append(1) or real(*a))

    class Module:
        num_key_value_groups = 2

    q_len, past = FOLD_MAX_QUERY + 10, 50
    q, k, v = torch.randn(1, 4, q_len, 8), torch.randn(1, 2, past + q_len, 8), torch.randn(1, 2, past + q_len, 8)
    mask = (torch.arange(q_len)[:, None] + past >= torch.arange(past + q_len)[None, :]).view(1, 1, q_len, -1)
    with torch.no_grad():
        flashback_sdpa(Module(), q, k, v, mask)
        assert used == [1]
        window = mask.clone()
        window[..., :3] = False  # a sliding window hides the oldest tokens
        out, _ = flashback_sdpa(Module(), q, k, v, window)
    assert used == [1]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=window)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)
