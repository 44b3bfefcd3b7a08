"""Saved-context files of formats v1 and v2 (``flashback-context-v1``/``-v2``: torch zip files, read with
``weights_only=True``): still loaded, never written (:mod:`flashback_agents.contextfile` writes v3).
Every key, type, dtype, shape, id range and length is checked before anything is built."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from . import kvcache
from .contextbase import ContextConfig, ContextError, ContextLoadError, ContextState

_FORMAT = "flashback-context-v2"
_FORMATS = ("flashback-context-v1", _FORMAT)  # v1: no on_overflow / low_water / prefill_chunk / evictions


def read_payload(lm: Any, payload: object, path: Path) -> ContextState:
    """The state a v1/v2 payload (as ``torch.load(..., weights_only=True)`` returned it) holds, checked
    against ``lm`` (raises :class:`ContextLoadError`)."""
    def bad(what: str) -> ContextLoadError:
        return ContextLoadError(f"{path} is corrupt or not a saved context: {what}. Rebuild the context "
                                "(or save it again) with CachedContext.save.")

    if not isinstance(payload, dict) or payload.get("format") not in _FORMATS:
        raise ContextLoadError(f"{path} is not a saved flashback-agents context (format {_FORMAT}); pass a "
                               "file written by CachedContext.save.")
    v2 = payload["format"] == _FORMAT
    required = ("fingerprint", "token_ids", "kv", "max_context_tokens") + (
        ("on_overflow", "low_water", "prefill_chunk", "evicted", "checksum") if v2 else ())
    missing = [k for k in required if k not in payload]
    if missing:
        raise bad(f"missing {missing}")
    if not isinstance(payload["fingerprint"], str):
        raise bad("the model fingerprint is not a string")
    if payload["fingerprint"] != lm.fingerprint:
        raise ContextLoadError(
            f"{path} was saved with another model or tokenizer ({payload.get('model')!r}, fingerprint "
            f"{payload['fingerprint']}); this one is {lm.name!r} ({lm.fingerprint}). Rebuild the context "
            "with this model instead.")
    ids = payload["token_ids"]
    if not isinstance(ids, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
        raise bad("token_ids is not a list of integers")
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    if any(t < 0 or t >= vocab for t in ids):
        raise bad(f"token ids outside this model's vocabulary (0..{vocab - 1})")
    budget = payload["max_context_tokens"]
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise bad(f"max_context_tokens is {budget!r}")
    held = min(budget or lm.max_positions, lm.max_positions)
    if len(ids) > held:
        raise bad(f"it holds {len(ids)} tokens but its budget (max_context_tokens, capped at the model's "
                  f"window) is {held}")
    settings = {"on_overflow": payload.get("on_overflow", "error"), "low_water": payload.get("low_water", 0.75),
                "prefill_chunk": payload.get("prefill_chunk", 512)}
    try:
        config = ContextConfig(budget, **settings)
        config.budget_for(lm)  # a bad budget / low_water for this model raises here
    except (ContextError, ValueError, TypeError) as exc:
        raise bad(f"settings {settings} with max_context_tokens={budget!r} ({exc})") from exc
    evicted = payload.get("evicted")
    if evicted is not None:
        stubs = evicted.get("stubs") if isinstance(evicted, dict) else None
        keys = evicted.get("stub_keys") if isinstance(evicted, dict) else None
        if not isinstance(stubs, dict) or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise bad("the record of evicted blocks is malformed")
        for k, stub in stubs.items():
            if not isinstance(k, str) or not isinstance(stub, list) or any(
                    isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in stub):
                raise bad("an evicted block's stub is not a list of valid token ids")
        if settings["on_overflow"] == "error":
            raise bad("it records evicted blocks but on_overflow is 'error'")
        evicted = {"stubs": {k: list(v) for k, v in stubs.items()}, "stub_keys": list(keys)}
    kv = payload["kv"]
    if not ids:
        _verify_checksum(payload, bad)
        return ContextState([], None, config, evicted)
    if isinstance(kv, (list, tuple)) and not kv and not kvcache.is_plain(kvcache.new_cache(lm.model)):
        _verify_checksum(payload, bad)  # a hybrid model: ids only, recomputed when next used
        return ContextState(list(ids), None, config, evicted)
    n_layers = len(kvcache.new_cache(lm.model).layers)
    if not isinstance(kv, (list, tuple)) or len(kv) != n_layers:
        raise bad(f"the cache has {len(kv) if isinstance(kv, (list, tuple)) else 'no'} layers, this model {n_layers}")
    heads, head_dim = kv_shape(lm)
    tensors = []
    for i, pair in enumerate(kv):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(t, torch.Tensor) for t in pair):
            raise bad(f"layer {i} is not a (keys, values) pair of tensors")
        for name, t in zip(("keys", "values"), pair):
            if not t.is_floating_point():
                raise bad(f"layer {i} {name} have dtype {t.dtype}, not a floating point type")
            if t.dim() != 4 or t.shape[0] != 1 or t.shape[2] != len(ids):
                raise bad(f"layer {i} {name} have shape {tuple(t.shape)}; expected [1, heads, {len(ids)}, head_dim] "
                          f"({len(ids)} ids)")
            if (heads is not None and t.shape[1] != heads) or (head_dim is not None and t.shape[3] != head_dim):
                raise bad(f"layer {i} {name} have shape {tuple(t.shape)}; this model needs "
                          f"[1, {heads}, {len(ids)}, {head_dim}]")
            if not bool(torch.isfinite(t).all()):
                raise bad(f"layer {i} {name} hold NaN or infinite values")
        tensors.append((pair[0].to(lm.device, lm.dtype), pair[1].to(lm.device, lm.dtype)))
    _verify_checksum(payload, bad)
    return ContextState(list(ids), kvcache.cache_from_tensors(lm.model, tensors), config, evicted)


def _checksum(payload: dict) -> str:
    """SHA-256 over every field and tensor byte of a saved context: a file altered after ``save``
    (a flipped byte in a key tensor loads as valid floats) is refused instead of silently diverging."""
    h = hashlib.sha256()
    meta = {k: payload[k] for k in sorted(payload) if k not in ("kv", "checksum")}
    h.update(json.dumps(meta, sort_keys=True, default=repr).encode())
    for pair in payload["kv"]:
        for t in pair:
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _verify_checksum(payload: dict, bad) -> None:
    if "checksum" not in payload:  # format v1 had none
        return
    if not isinstance(payload["checksum"], str) or payload["checksum"] != _checksum(payload):
        raise bad("its checksum does not match its contents (the file was altered or damaged after it was saved)")


def kv_shape(lm: Any) -> tuple[int | None, int | None]:
    """(kv heads, head size) the model's cache layers have, from its config (None where it does not say)."""
    cfg = lm.model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is None and getattr(cfg, "hidden_size", None) and getattr(cfg, "num_attention_heads", None):
        head_dim = cfg.hidden_size // cfg.num_attention_heads
    return (int(heads) if heads else None), (int(head_dim) if head_dim else None)
