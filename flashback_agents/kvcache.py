"""All direct KV-cache manipulation in one place: create, crop, copy a prefix, size, save, rebuild,
and :func:`forward`, the one model call with a cache (``cache=`` or ``past_key_values=`` by version).

``GrowingLayer`` replaces transformers' ``DynamicLayer`` for full-attention layers: it keeps keys and
values in a buffer that grows by doubling and writes new tokens in place, instead of concatenating
(copying) the whole cache on every forward. That copy costs ~14 ms per decoded token at 4k tokens of
SmolLM2 context on a 2-core CPU, as much as the model's own compute.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

try:  # transformers >= 5.2x: recurrent / short-conv layers of hybrid models (Qwen3-Next, LFM2, Bamba, ...)
    from transformers.cache_utils import LinearAttentionCacheLayerMixin
except ImportError:  # pragma: no cover - older transformers have no such layers
    class LinearAttentionCacheLayerMixin:  # type: ignore[no-redef]
        pass

_MIN_CAPACITY = 256
MAX_STATE_CHECKPOINTS = 8  # per cache, newest kept: rollbacks and rewrites go back to recent messages


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose storage grows by doubling; ``keys``/``values`` are views of the live part."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._len = 0

    def _reserve(self, need: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        cap = 0 if self._kbuf is None else self._kbuf.shape[-2]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, _MIN_CAPACITY)
        kshape = list(like_k.shape)
        vshape = list(like_v.shape)
        kshape[-2] = vshape[-2] = new_cap
        kbuf = like_k.new_empty(kshape)
        vbuf = like_v.new_empty(vshape)
        if self._len:
            kbuf[..., : self._len, :] = self._kbuf[..., : self._len, :]
            vbuf[..., : self._len, :] = self._vbuf[..., : self._len, :]
        self._kbuf, self._vbuf = kbuf, vbuf

    def _set_len(self, n: int) -> None:
        self._len = n
        self.keys = self._kbuf[..., :n, :]
        self.values = self._vbuf[..., :n, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(self._len + n, key_states, value_states)
        self._kbuf[..., self._len : self._len + n, :] = key_states
        self._vbuf[..., self._len : self._len + n, :] = value_states
        self._set_len(self._len + n)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count (tokens to remove)")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._set_len(max(0, self._len + tokens_to_remove))

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        self._len = 0
        super().reset()

    def nbytes(self) -> int:
        if not self.is_initialized or self._kbuf is None:
            return 0
        return self._kbuf.numel() * self._kbuf.element_size() + self._vbuf.numel() * self._vbuf.element_size()


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


def new_cache(model: Any, growing: bool = True) -> DynamicCache:
    """An empty cache for ``model``; full-attention layers grow by doubling when ``growing``.

    Sliding-window layers (Mistral, Gemma 2/3, ...) get a full-length layer too: transformers'
    ``DynamicSlidingWindowLayer`` keeps only the last window of keys, so once past the window it can
    never be cropped back (a rollback or a rewritten last message would give wrong logits). The
    attention mask still applies the window (it is built from the config, not from the cache), so
    logits are unchanged; the cost is memory: those layers hold every token, like full layers.
    Recurrent / conv layers of hybrid models are kept as they are (see :func:`checkpoint`).
    """
    cache = DynamicCache(config=model.config)
    if growing:
        cache.layers = [GrowingLayer() if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                        for layer in cache.layers]
    elif any(type(layer) is DynamicSlidingWindowLayer for layer in cache.layers):
        cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
    cache.flashback_checkpoints = []  # type: ignore[attr-defined]  # StateCheckpoints, oldest first
    return cache


def _is_state_layer(layer: Any) -> bool:
    return isinstance(layer, LinearAttentionCacheLayerMixin)


def has_state_layers(cache: DynamicCache) -> bool:
    """True when some layer keeps a recurrent/conv state that cannot be cropped to an earlier length."""
    return any(_is_state_layer(layer) for layer in cache.layers)


def is_plain(cache: DynamicCache) -> bool:
    """Every layer holds per-token keys/values (croppable, copyable and savable as tensors)."""
    return not has_state_layers(cache)


class StateCheckpoint:
    """The recurrent/conv state of every state layer after the first ``length`` tokens (a copy)."""

    def __init__(self, length: int, states: dict[int, dict[str, Any]]):
        self.length = length
        self.states = states

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.states.values()
                   for kind in ("conv_states", "recurrent_states") for t in st[kind].values()
                   if isinstance(t, torch.Tensor))


def _snapshot_layer(layer: Any) -> dict[str, Any]:
    clone = {i: (t.clone() if isinstance(t, torch.Tensor) else t) for i, t in layer.conv_states.items()}
    rec = {i: (t.clone() if isinstance(t, torch.Tensor) else t) for i, t in layer.recurrent_states.items()}
    return {"conv_states": clone, "recurrent_states": rec,
            "flags": {k: dict(getattr(layer, k)) for k in ("is_conv_states_initialized",
                                                           "is_recurrent_states_initialized",
                                                           "has_previous_state", "conv_kernel_size")}}


def _restore_layer(layer: Any, state: dict[str, Any] | None) -> None:
    """Put a state layer back as in ``state`` (None: as before any token)."""
    if state is None:  # forget the state; the next forward initialises it again, as on a new cache
        for i in range(layer.number_of_states):
            layer.conv_states[i] = layer.recurrent_states[i] = None
            layer.is_conv_states_initialized[i] = layer.is_recurrent_states_initialized[i] = False
            layer.has_previous_state[i] = False
        return
    for kind in ("conv_states", "recurrent_states"):
        for i, t in state[kind].items():
            getattr(layer, kind)[i] = t.clone() if isinstance(t, torch.Tensor) else t
    for k, v in state["flags"].items():
        setattr(layer, k, dict(v))


def checkpoint(cache: DynamicCache) -> StateCheckpoint | None:
    """Remember the state layers' state at the cache's current length (hybrid models only; a no-op
    for plain caches). Called at message boundaries, so a rollback, a rewrite of the last message or a
    fork restarts from the nearest one instead of from token 0. Memory: :func:`checkpoint_nbytes`."""
    if not has_state_layers(cache):
        return None
    n = cache_len(cache)
    cps = _checkpoints(cache)
    if n == 0:
        return None
    while cps and cps[-1].length >= n:
        cps.pop()
    cp = StateCheckpoint(n, {i: _snapshot_layer(layer) for i, layer in enumerate(cache.layers) if _is_state_layer(layer)})
    cps.append(cp)
    del cps[:-MAX_STATE_CHECKPOINTS]
    return cp


def _checkpoints(cache: DynamicCache) -> list[StateCheckpoint]:
    if not hasattr(cache, "flashback_checkpoints"):
        cache.flashback_checkpoints = []  # type: ignore[attr-defined]
    return cache.flashback_checkpoints  # type: ignore[attr-defined]


def checkpoint_nbytes(cache: DynamicCache) -> int:
    """Memory held by the state checkpoints of a hybrid model's cache."""
    return sum(cp.nbytes() for cp in _checkpoints(cache))


def cache_len(cache: DynamicCache) -> int:
    return cache.get_seq_length() if cache.layers else 0


def crop_to(cache: DynamicCache, n: int) -> int:
    """Keep the first ``n`` tokens (transformers 5 only accepts negative crops: wrap it here).

    Returns the length actually kept: ``n`` for plain caches; for hybrid models (recurrent or conv
    state that cannot be cropped) the length of the nearest state checkpoint at or before ``n`` (0
    if none): the caller must recompute the tokens between that and ``n``.
    """
    extra = cache_len(cache) - n
    if extra < 0:
        raise ValueError(f"cannot crop a cache of {cache_len(cache)} tokens to {n}")
    if not has_state_layers(cache):
        if extra:
            for layer in cache.layers:
                layer.crop(-extra)
        return n
    if not extra:
        return n
    cps = _checkpoints(cache)
    while cps and cps[-1].length > n:
        cps.pop()
    cp = cps[-1] if cps else None
    keep = cp.length if cp is not None else 0
    drop = cache_len(cache) - keep
    for i, layer in enumerate(cache.layers):
        if _is_state_layer(layer):
            _restore_layer(layer, cp.states.get(i) if cp is not None else None)
        if isinstance(layer, GrowingLayer) and drop:
            layer.crop(-drop)
        elif isinstance(layer, DynamicLayer) and drop:  # e.g. a linear + attention layer: crop its keys only
            DynamicLayer.crop(layer, -drop)
    return keep


def layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The live (key, value) tensors of each layer, shape [batch, heads, tokens, head_dim]."""
    out = []
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys is None:
            raise ValueError("cache layer not initialised")
        out.append((layer.keys, layer.values))
    return out


def cache_from_tensors(model: Any, tensors: list[tuple[torch.Tensor, torch.Tensor]], copy: bool = True) -> DynamicCache:
    """Rebuild a cache from per-layer (key, value) tensors (a copy is made; ``copy=False`` for tensors the
    caller gives away: growing layers copy into their own buffer anyway, plain ones keep them)."""
    cache = new_cache(model)
    for layer, (k, v) in zip(cache.layers, tensors):
        layer.update(k.clone() if copy else k, v.clone() if copy else v)
    return cache


def copy_prefix(model: Any, cache: DynamicCache, n: int) -> DynamicCache:
    """A new cache holding a copy of the first ``n`` tokens (cost proportional to ``n``, not to the cache).

    For hybrid models the copy may be shorter than ``n`` (see :func:`crop_to`); its length says so.
    """
    if n == 0 or cache_len(cache) == 0:
        return new_cache(model)
    if not has_state_layers(cache):
        return cache_from_tensors(model, [(k[..., :n, :], v[..., :n, :]) for k, v in layer_tensors(cache)])
    out = new_cache(model)
    held = cache_len(cache)
    for src, dst in zip(cache.layers, out.layers):
        if _is_state_layer(src):
            _restore_layer(dst, _snapshot_layer(src))
            for attr in ("device", "dtype", "record_past"):
                setattr(dst, attr, getattr(src, attr, None))
        if isinstance(src, DynamicLayer) and getattr(src, "is_initialized", False) and src.keys is not None:
            dst.update(src.keys[..., :held, :].clone(), src.values[..., :held, :].clone())
    out.flashback_checkpoints = [StateCheckpoint(cp.length, {i: _snapshot_layer_from(st) for i, st in cp.states.items()})
                                 for cp in _checkpoints(cache)]
    crop_to(out, n)
    return out


def _snapshot_layer_from(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a snapshot (a fork must not share checkpoint tensors with its parent)."""
    return {kind: ({i: (t.clone() if isinstance(t, torch.Tensor) else t) for i, t in state[kind].items()}
                   if kind != "flags" else {k: dict(v) for k, v in state[kind].items()}) for kind in state}


def cache_nbytes(cache: DynamicCache) -> int:
    """Memory held by the cache, counting reserved (not yet used) capacity."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            total += layer.nbytes()
        elif isinstance(layer, DynamicLayer) and layer.is_initialized and layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size() * 2
        if _is_state_layer(layer):
            total += sum(t.numel() * t.element_size() for d in (layer.conv_states, layer.recurrent_states)
                         for t in d.values() if isinstance(t, torch.Tensor))
    return total + checkpoint_nbytes(cache)


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
