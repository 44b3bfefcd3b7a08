"""The KV cache class: :class:`FlashBackCache`, transformers' ``DynamicCache`` in the shape the context
needs. It owns what is done to a cache: its length, crop to a length (from a state checkpoint on hybrid
models), a prefix copy, the state checkpoints themselves and its byte size. :mod:`flashback_agents.kvcache`
keeps the free functions (thin delegates) and the model call.

``GrowingLayer`` replaces transformers' ``DynamicLayer`` for full-attention layers: it keeps keys and
values in a buffer that grows by doubling and writes new tokens in place, instead of concatenating
(copying) the whole cache on every forward. That copy costs ~14 ms per decoded token at 4k tokens of
SmolLM2 context on a 2-core CPU, as much as the model's own compute.
"""

from __future__ import annotations

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


def is_state_layer(layer: Any) -> bool:
    """A layer that keeps a recurrent/conv state (hybrid models), which cannot be cropped to an earlier length."""
    return isinstance(layer, LinearAttentionCacheLayerMixin)


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


def _snapshot_layer_from(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a snapshot (a fork must not share checkpoint tensors with its parent)."""
    return {kind: ({i: (t.clone() if isinstance(t, torch.Tensor) else t) for i, t in state[kind].items()}
                   if kind != "flags" else {k: dict(v) for k, v in state[kind].items()}) for kind in state}


class FlashBackCache(DynamicCache):
    """A ``DynamicCache`` that owns its checkpoints, crop, prefix copy and size (see the module doc).

    ``growing``: full-attention layers grow by doubling (:class:`GrowingLayer`). Sliding-window layers
    (Mistral, Gemma 2/3, ...) get a full-length layer either way: transformers' ``DynamicSlidingWindowLayer``
    keeps only the last window of keys, so once past the window it can never be cropped back (a rollback or
    a rewritten last message would give wrong logits). The attention mask still applies the window (it is
    built from the config, not from the cache), so logits are unchanged; the cost is memory. Recurrent /
    conv layers of hybrid models are kept as they are (see :meth:`checkpoint`).
    """

    def __init__(self, ddp_cache_data: Any = None, config: Any = None, *, growing: bool = True, **kwargs: Any):
        super().__init__(ddp_cache_data, config=config, **kwargs)
        self.model_config = config
        if growing:
            self.layers = [GrowingLayer() if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) else layer
                           for layer in self.layers]
        elif any(type(layer) is DynamicSlidingWindowLayer for layer in self.layers):
            self.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer
                           for layer in self.layers]
        self.checkpoints: list[StateCheckpoint] = []  # oldest first

    @classmethod
    def adopt(cls, cache: DynamicCache) -> "FlashBackCache":
        """``cache`` itself when it is one; else one over the same layers (another kind of ``DynamicCache``,
        e.g. transformers' own: cropping it crops ``cache``, whose layers keep working as they do)."""
        if isinstance(cache, cls):
            return cache
        view = cls.__new__(cls)
        vars(view).update(vars(cache))
        view.model_config, view.checkpoints = None, []
        return view

    @classmethod
    def from_tensors(cls, config: Any, tensors: list[tuple[torch.Tensor, torch.Tensor]],
                     copy: bool = True) -> "FlashBackCache":
        """A cache holding per-layer (key, value) tensors (copied; ``copy=False`` for tensors the caller gives
        away: growing layers copy into their own buffer anyway, plain ones keep them)."""
        cache = cls(config=config)
        for layer, (k, v) in zip(cache.layers, tensors):
            layer.update(k.clone() if copy else k, v.clone() if copy else v)
        return cache

    # ------------------------------------------------------------------ views
    def length(self) -> int:
        """Tokens held."""
        return self.get_seq_length() if self.layers else 0

    def has_state_layers(self) -> bool:
        """True when some layer keeps a recurrent/conv state that cannot be cropped to an earlier length."""
        return any(is_state_layer(layer) for layer in self.layers)

    def layer_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The live (key, value) tensors of each layer, shape [batch, heads, tokens, head_dim]."""
        out = []
        for layer in self.layers:
            if not layer.is_initialized or layer.keys is None:
                raise ValueError("cache layer not initialised")
            out.append((layer.keys, layer.values))
        return out

    def nbytes(self) -> int:
        """Memory held, counting reserved (not yet used) capacity and the state checkpoints."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, GrowingLayer):
                total += layer.nbytes()
            elif isinstance(layer, DynamicLayer) and layer.is_initialized and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size() * 2
            if is_state_layer(layer):
                total += sum(t.numel() * t.element_size() for d in (layer.conv_states, layer.recurrent_states)
                             for t in d.values() if isinstance(t, torch.Tensor))
        return total + self.checkpoint_nbytes()

    def checkpoint_nbytes(self) -> int:
        """Memory held by the state checkpoints (hybrid models)."""
        return sum(cp.nbytes() for cp in self.checkpoints)

    # ---------------------------------------------------------------- changes
    def checkpoint(self) -> StateCheckpoint | None:
        """Remember the state layers' state at the current length (hybrid models only; a no-op for plain
        caches). Taken at message boundaries, so a rollback, a rewrite of the last message or a fork
        restarts from the nearest one instead of from token 0."""
        if not self.has_state_layers():
            return None
        n = self.length()
        cps = self.checkpoints
        if n == 0:
            return None
        while cps and cps[-1].length >= n:
            cps.pop()
        cp = StateCheckpoint(n, {i: _snapshot_layer(layer) for i, layer in enumerate(self.layers)
                                 if is_state_layer(layer)})
        cps.append(cp)
        del cps[:-MAX_STATE_CHECKPOINTS]
        return cp

    def crop_to(self, n: int) -> int:
        """Keep the first ``n`` tokens (transformers' ``crop`` takes a count to remove). Returns the length
        kept: ``n`` for plain caches; for hybrid models the length of the nearest state checkpoint at or
        before ``n`` (0 if none): the caller must recompute the tokens between that and ``n``."""
        extra = self.length() - n
        if extra < 0:
            raise ValueError(f"cannot crop a cache of {self.length()} tokens to {n}")
        if not self.has_state_layers():
            if extra:
                for layer in self.layers:
                    layer.crop(-extra)
            return n
        if not extra:
            return n
        cps = self.checkpoints
        while cps and cps[-1].length > n:
            cps.pop()
        cp = cps[-1] if cps else None
        keep = cp.length if cp is not None else 0
        drop = self.length() - keep
        for i, layer in enumerate(self.layers):
            if is_state_layer(layer):
                _restore_layer(layer, cp.states.get(i) if cp is not None else None)
            if isinstance(layer, GrowingLayer) and drop:
                layer.crop(-drop)
            elif isinstance(layer, DynamicLayer) and drop:  # e.g. a linear + attention layer: crop its keys only
                DynamicLayer.crop(layer, -drop)
        return keep

    def copy_prefix(self, n: int, config: Any = None) -> "FlashBackCache":
        """A new cache holding a copy of the first ``n`` tokens (cost proportional to ``n``, not to the cache;
        ``config``: the model's, when this cache does not know it). For hybrid models the copy may be
        shorter than ``n`` (see :meth:`crop_to`); its length says so."""
        config = config if config is not None else self.model_config
        if n == 0 or self.length() == 0:
            return FlashBackCache(config=config)
        if not self.has_state_layers():
            prefix = [(k[..., :n, :], v[..., :n, :]) for k, v in self.layer_tensors()]
            return FlashBackCache.from_tensors(config, prefix)
        out = FlashBackCache(config=config)
        held = self.length()
        for src, dst in zip(self.layers, out.layers):
            if is_state_layer(src):
                _restore_layer(dst, _snapshot_layer(src))
                for attr in ("device", "dtype", "record_past"):
                    setattr(dst, attr, getattr(src, attr, None))
            if isinstance(src, DynamicLayer) and getattr(src, "is_initialized", False) and src.keys is not None:
                dst.update(src.keys[..., :held, :].clone(), src.values[..., :held, :].clone())
        out.checkpoints = [StateCheckpoint(cp.length, {i: _snapshot_layer_from(st) for i, st in cp.states.items()})
                           for cp in self.checkpoints]
        out.crop_to(n)
        return out
