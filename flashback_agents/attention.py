"""A lean attention for decoding on CPU: grouped-query matmuls on the cached keys, no copies.

transformers' SDPA path handles a grouped-query model's single decode token either by repeating
the key/value heads (a copy of the whole cache per layer and token) or through the CPU flash
kernel, whose fixed cost dominates at one query token. For a few query tokens this function
computes attention with two batched matmuls over the key/value heads as they are cached (query
heads of one group stacked), which reads the cache once. Longer queries (prefill) go to SDPA.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "fb_grouped_sdpa"
SMALL_QUERY = 8


def flashback_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bsz, heads, q_len, dim = query.shape
    if q_len > SMALL_QUERY or dropout or query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    q = query.reshape(bsz, kv_heads, groups * q_len, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)) * scale  # [b, kv, g*q, t]
    if attention_mask is not None:
        t = scores.shape[-1]
        mask = attention_mask[..., -t:]
        scores = scores.view(bsz, kv_heads, groups, q_len, t)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask[:, :, None] if mask.dim() == 4 else ~mask, float("-inf"))
        else:
            scores = scores + (mask[:, :, None] if mask.dim() == 4 else mask)
        scores = scores.view(bsz, kv_heads, groups * q_len, t)
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value).view(bsz, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


def install(model: Any) -> bool:
    """Use the lean attention for ``model`` if it runs SDPA on CPU (returns whether it did)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    if next(model.parameters()).device.type != "cpu":
        return False
    AttentionInterface.register(NAME, flashback_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except Exception:  # an architecture that refuses custom attention keeps SDPA
        return False
    return True
