"""Adapter training, its model: which modules get LoRA (the attention K/V projections by family) and
the peft model with the two marker embedding rows trainable (:func:`build_peft_model`)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

from ..models import LoadedModel
from .config import AUTO_TARGETS, TrainConfig, TrainError

# Per family, the modules that produce attention keys and values, most specific first. FlashBack trains
# K/V only; where K and V come out of one fused projection (GPT-2 ``c_attn``, GPT-NeoX/Falcon
# ``query_key_value``, Phi-3 ``qkv_proj``, MPT ``Wqkv``) that projection is the target (it includes Q).
_KV_TARGETS: tuple[tuple[str, ...], ...] = (
    ("k_proj", "v_proj"),          # Llama, Qwen2/3, Mistral, Gemma, OPT, Qwen3-Next / LFM2 attention layers
    ("qkv_proj",),                 # Phi-3
    ("c_attn",),                   # GPT-2
    ("query_key_value",),          # GPT-NeoX, Falcon, BLOOM
    ("Wqkv",),                     # MPT, ModernBERT-style
    ("key", "value"),              # GPT-J-like naming in some ports
)


def embedding_module_name(model: Any) -> str:
    """Short name of the input embedding module (``embed_tokens`` for Llama-family models)."""
    emb = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is emb:
            return name.rsplit(".", 1)[-1]
    raise TrainError("Could not find the model's input embedding module.")


def default_lora_targets(model: Any) -> list[str]:
    """The LoRA targets FlashBack trains for ``model``: its key/value projections, by family.

    The one place target names are resolved (``TrainConfig.target_modules`` None or ``"auto"``), so
    the CLI, the trainer and the tests agree for every architecture.
    """
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    for group in _KV_TARGETS:
        if all(t in names for t in group):
            return list(group)
    raise TrainError(f"Cannot tell which modules of {type(model).__name__} compute attention keys and values "
                     f"(its linear layers are e.g. {sorted(names)[:10]}); pass target_modules explicitly "
                     "(--target-modules NAME,NAME).")


def resolve_targets(model: Any, target_modules: list[str] | str | None) -> list[str]:
    """``target_modules`` as a list of names: None / ``"auto"`` become :func:`default_lora_targets`."""
    if target_modules is None or target_modules == AUTO_TARGETS:
        return default_lora_targets(model)
    if isinstance(target_modules, str):
        return [t.strip() for t in target_modules.split(",") if t.strip()]
    return list(target_modules)


def build_peft_model(lm: LoadedModel, config: TrainConfig) -> Any:
    """Wrap ``lm.model`` in place with LoRA (K/V) and trainable marker rows; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(lm.model, config.target_modules)
    names = {n.rsplit(".", 1)[-1] for n, _ in lm.model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise TrainError(f"target modules {missing} are not in this model (it has e.g. "
                         f"{sorted(n for n in names if n.endswith('proj'))[:8]}).")
    # GPT-2-style Conv1D stores its weight transposed: peft must be told (it warns and fixes it otherwise)
    conv1d = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in lm.model.named_modules())
    peft_config = LoraConfig(
        task_type="CAUSAL_LM", r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, fan_in_fan_out=conv1d,
        trainable_token_indices={embedding_module_name(lm.model): list(lm.marker_ids)} if config.train_markers else None,
    )
    return get_peft_model(lm.model, peft_config)
