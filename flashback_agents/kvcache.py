"""The free functions the engine calls on a KV cache (create, length, crop, copy a prefix, size, rebuild:
thin delegates to :class:`~flashback_agents.flashcache.FlashBackCache`, which accept any ``DynamicCache``),
:func:`forward`, the one model call with a cache (``cache=`` or ``past_key_values=`` by version), and the
RoPE shift that moves cached keys to new positions (``on_overflow='shift'``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from .flashcache import (MAX_STATE_CHECKPOINTS, FlashBackCache, GrowingLayer, StateCheckpoint,  # noqa: F401
                         is_state_layer)

_CACHE_KWARG: dict[type, str] = {}


def cache_kwarg(model: Any) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (older). Read from the forward signature once per model class; a wrapper
    (a PEFT model) is looked through to the model it wraps."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = type(target)
    name = _CACHE_KWARG.get(kind)
    if name is None:
        params = inspect.signature(target.forward).parameters
        name = _CACHE_KWARG[kind] = "cache" if "cache" in params else "past_key_values"
    return name


def forward(model: Any, input_ids: torch.Tensor, cache: Any, **kw: Any) -> Any:
    """The one model call with a KV cache: ``model(input_ids=..., <cache kwarg>=cache, use_cache=True, **kw)``."""
    kw.setdefault("use_cache", True)
    kw[cache_kwarg(model)] = cache
    return model(input_ids=input_ids, **kw)


def new_cache(model: Any, growing: bool = True) -> FlashBackCache:
    """An empty cache for ``model``; full-attention layers grow by doubling when ``growing`` (see
    :class:`~flashback_agents.flashcache.FlashBackCache` for sliding-window and hybrid layers)."""
    return FlashBackCache(config=model.config, growing=growing)


def adopt(cache: DynamicCache) -> FlashBackCache:
    """``cache`` as a :class:`FlashBackCache` (itself, or one over its layers)."""
    return FlashBackCache.adopt(cache)


def has_state_layers(cache: DynamicCache) -> bool:
    """True when some layer keeps a recurrent/conv state that cannot be cropped to an earlier length."""
    return any(is_state_layer(layer) for layer in cache.layers)


def is_plain(cache: DynamicCache) -> bool:
    """Every layer holds per-token keys/values (croppable, copyable and savable as tensors)."""
    return not has_state_layers(cache)


def checkpoint(cache: DynamicCache) -> StateCheckpoint | None:
    """:meth:`FlashBackCache.checkpoint` (kept by a FlashBackCache only)."""
    return adopt(cache).checkpoint()


def _checkpoints(cache: DynamicCache) -> list[StateCheckpoint]:
    return adopt(cache).checkpoints


def checkpoint_nbytes(cache: DynamicCache) -> int:
    """Memory held by the state checkpoints of a hybrid model's cache."""
    return adopt(cache).checkpoint_nbytes()


def cache_len(cache: DynamicCache) -> int:
    return cache.get_seq_length() if cache.layers else 0


def crop_to(cache: DynamicCache, n: int) -> int:
    """Keep the first ``n`` tokens; returns the length kept (:meth:`FlashBackCache.crop_to`)."""
    return adopt(cache).crop_to(n)


def layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The live (key, value) tensors of each layer, shape [batch, heads, tokens, head_dim]."""
    return adopt(cache).layer_tensors()


def cache_from_tensors(model: Any, tensors: list[tuple[torch.Tensor, torch.Tensor]],
                       copy: bool = True) -> FlashBackCache:
    """Rebuild a cache from per-layer (key, value) tensors (:meth:`FlashBackCache.from_tensors`)."""
    return FlashBackCache.from_tensors(model.config, tensors, copy)


def copy_prefix(model: Any, cache: DynamicCache, n: int) -> FlashBackCache:
    """A new cache holding a copy of the first ``n`` tokens (:meth:`FlashBackCache.copy_prefix`)."""
    return adopt(cache).copy_prefix(n, model.config)


def cache_nbytes(cache: DynamicCache) -> int:
    """Memory held by the cache, counting reserved (not yet used) capacity."""
    return adopt(cache).nbytes()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotary_embedding(model: Any) -> Any:
    """The model's rotary embedding module, or None for models without RoPE (GPT-2, OPT: learned
    absolute positions). Found on the base model whatever its attribute name (``model``, ``gpt_neox``...)."""
    for owner in (getattr(model, "base_model", None), getattr(model, "model", None), model):
        rotary = getattr(owner, "rotary_emb", None) if owner is not None else None
        if rotary is not None:
            return rotary
    return None


def shift_unsupported_reason(model: Any) -> str | None:
    """Why ``on_overflow='shift'`` cannot work on ``model`` (None when it can): it rotates cached keys
    to new positions, which needs rotary positions in every layer and a per-token key/value cache."""
    if rotary_embedding(model) is None:
        return (f"{type(model).__name__} has no rotary position embedding (its positions are learned absolute "
                "embeddings or none), so cached keys cannot be moved to new positions")
    if has_state_layers(new_cache(model)):
        return (f"{type(model).__name__} has recurrent/conv layers whose state cannot be edited in the middle")
    return None


def rope_shift_keys(model: Any, keys: torch.Tensor, delta: int, layer_idx: int = 0) -> torch.Tensor:
    """Move RoPE-rotated keys by ``delta`` positions: R(delta) R(p) k = R(p + delta) k.

    Exact for the first layer (its keys depend only on each token's embedding); deeper layers keep
    the attention they computed over the removed tokens: that drift is what ``shift`` trades for speed.
    Partial rotary (GPT-NeoX, Phi-2: only the first dims rotate) rotates only those dims; per-layer-type
    RoPE (Gemma 3: another base on sliding layers) uses the type of layer ``layer_idx``.
    """
    rotary = rotary_embedding(model)
    if rotary is None:
        raise NotImplementedError(f"{type(model).__name__} has no rotary embedding: on_overflow='shift' needs RoPE")
    pos = torch.tensor([[abs(delta)]], device=keys.device)
    scale_attr = "attention_scaling"
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        types = getattr(cfg, "layer_types", None) or []
        layer_type = types[layer_idx] if layer_idx < len(types) else "full_attention"
        cos, sin = rotary(keys, pos, layer_type)
        scale_attr = f"{layer_type}_attention_scaling"
    else:
        cos, sin = rotary(keys, pos)
    scale = float(getattr(rotary, scale_attr, 1.0) or 1.0)
    cos = (cos / scale).to(keys.dtype)[:, None]  # [1, 1, 1, D_rot]
    sin = (sin / scale).to(keys.dtype)[:, None]
    sign = 1.0 if delta > 0 else -1.0
    rot = cos.shape[-1]
    if rot < keys.shape[-1]:
        k_rot, k_pass = keys[..., :rot], keys[..., rot:]
        return torch.cat((k_rot * cos + sign * _rotate_half(k_rot) * sin, k_pass), dim=-1)
    return keys * cos + sign * _rotate_half(keys) * sin


def replace_span_shifted(model: Any, cache: DynamicCache, start: int, end: int,
                         ids: list[int], run: Any) -> None:
    """Replace cached tokens [start, end) by ``ids`` without recomputing what follows.

    ``run(ids)`` is the caller's forward: it runs ``ids`` appended to ``cache`` (here at ``start``); the
    keys of the tokens after ``end`` are rotated back by the removed length and re-appended as they were.
    """
    tail = [(k[..., end:, :].clone(), v[..., end:, :].clone()) for k, v in layer_tensors(cache)]
    crop_to(cache, start)
    run(list(ids))
    delta = len(ids) - (end - start)
    for i, (layer, (k, v)) in enumerate(zip(cache.layers, tail)):
        if k.shape[-2]:
            layer.update(rope_shift_keys(model, k, delta, i) if delta else k, v)
