"""The attention kernel for cached steps: grouped-query attention without copying the cache.

transformers' ``sdpa`` attention handles grouped-query models (SmolLM2, Llama 3, Qwen, Mistral: fewer
key/value heads than query heads) in two ways: one query token folds the query heads onto the key/value
heads (no copy), but any step of more than one token under a mask -- a prefill on top of a cache, or a
speculative verification of 1 + k draft tokens -- repeats every cached key and value ``groups`` times
first (``repeat_kv``). At 6k cached tokens of SmolLM2 that copy is ~27 MB per layer: a 5-token
verification forward spends ~8x longer in attention than the same forward with the fold below
(``flashback-agents bench decode``), which is what made speculation pay less the longer the context.

``flashback_sdpa`` folds the ``groups`` query heads of each key/value head into the query-length axis
(``[b, kv_heads, groups * q, d]``) and repeats only the mask, which is ``groups * q * kv`` booleans,
so short steps attend over the cache as it is stored. Long steps (> :data:`FOLD_MAX_QUERY` tokens,
where the repeated mask would cost more than it saves: a tool result appended to a long context) are
split where the mask is "every cached token + causal among the new ones", the usual case: the new
tokens attend to the cache with no mask at all (folded, CPU flash kernel) and to themselves causally,
and the two halves are merged by their log-sum-exps, as flash attention merges blocks. At 6k cached
tokens that is ~20 % less attention time for a 531-token prefill than SDPA with the mask; any other
mask uses SDPA's own ``enable_gqa``. The arithmetic is the same attention per head, so logits equal
``sdpa``'s to float rounding (tests/test_attention.py). Anything it does not cover (training with
gradients, dropout, position biases, soft-capping, per-head masks, no mask) goes to transformers'
``sdpa`` unchanged.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "gqa_fold_sdpa"  # no "flash" in it: transformers reads that as a flash-attention kernel
FOLD_MAX_QUERY = 64  # query tokens up to which the fold (and its repeated mask) beats enable_gqa


def flashback_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: ``sdpa`` with the cache never repeated per query head."""
    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q_len, dim = query.shape
    if (groups <= 1 or q_len <= 1 or attention_mask is None or attention_mask.dim() != 4
            or attention_mask.shape[1] != 1 or dropout or torch.is_grad_enabled()
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("output_attentions") or key.shape[1] * groups != heads):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    kv_heads, kv_len = key.shape[1], key.shape[2]
    mask = attention_mask[..., :kv_len]
    if q_len <= FOLD_MAX_QUERY:
        folded = query.reshape(b, kv_heads, groups * q_len, dim)  # head h = kv * groups + g, as repeat_kv
        mask = mask.unsqueeze(2).expand(mask.shape[0], 1, groups, q_len, kv_len)
        mask = mask.reshape(mask.shape[0], 1, groups * q_len, kv_len)
        out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
        out = out.reshape(b, heads, q_len, value.shape[-1])
    elif query.device.type == "cpu" and _is_cache_then_causal(mask, q_len, kv_len):
        out = _split_attention(query, key, value, groups, kv_len - q_len, scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                               enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_PATTERN_SEEN: list[Any] = [None, False]  # one slot: (weakref to the last mask checked, its verdict)


def _is_cache_then_causal(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """Whether a boolean ``[1, 1, q, kv]`` mask lets every new token see the whole cache and the new
    tokens before it, nothing else. Checked once per forward (all layers share the mask object)."""
    if _FLASH_CPU is None or mask.dtype != torch.bool or mask.shape[0] != 1 or kv_len <= q_len:
        return False
    ref, verdict = _PATTERN_SEEN
    if ref is not None and ref() is mask:
        return verdict
    past = kv_len - q_len
    new = mask[0, 0, :, past:]
    verdict = bool(mask[0, 0, :, :past].all()) and bool(
        torch.equal(new, torch.ones(q_len, q_len, dtype=torch.bool, device=mask.device).tril()))
    _PATTERN_SEEN[:] = [weakref.ref(mask), verdict]
    return verdict


def _split_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, groups: int, past: int,
                     scaling: float | None) -> torch.Tensor:
    """Attention of the new tokens over (cache, unmasked) and (themselves, causal), merged exactly."""
    b, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    folded = query.reshape(b, kv_heads, groups * q_len, dim)
    out_c, lse_c = _FLASH_CPU(folded, key[:, :, :past], value[:, :, :past], scale=scaling)[:2]
    new_k = key[:, :, past:].repeat_interleave(groups, 1)
    new_v = value[:, :, past:].repeat_interleave(groups, 1)
    out_n, lse_n = _FLASH_CPU(query, new_k, new_v, is_causal=True, scale=scaling)[:2]
    lse_c = lse_c.reshape(b, heads, q_len, 1).float()
    lse_n = lse_n.reshape(b, heads, q_len, 1).float()
    top = torch.maximum(lse_c, lse_n)
    w_c, w_n = torch.exp(lse_c - top), torch.exp(lse_n - top)
    out = (out_c.reshape(b, heads, q_len, -1).float() * w_c + out_n.float() * w_n) / (w_c + w_n)
    return out.to(query.dtype)


AttentionInterface.register(NAME, flashback_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_flashback_attention(model: Any) -> bool:
    """Switch a model that runs transformers' ``sdpa`` to :func:`flashback_sdpa`; others are left as
    they are (eager, flash-attention, a model that cannot switch). Returns whether it switched."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError):  # pragma: no cover - a model class that refuses custom kernels
        return False
    return getattr(model.config, "_attn_implementation", None) == NAME
