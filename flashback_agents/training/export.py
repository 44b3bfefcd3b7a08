"""Adapter training, its outputs read back: an adapter's ``flashback_adapter.json``
(:func:`read_adapter_meta`) and the adapter merged into its base model (:func:`export_merged`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..models import ADAPTER_META, load_model
from .config import TrainError


def read_adapter_meta(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """``flashback_adapter.json`` as a dict ({} if absent); a damaged one is a :class:`TrainError`."""
    path = Path(adapter_dir) / ADAPTER_META
    try:
        meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError, RecursionError) as exc:
        raise TrainError(f"{path} is not readable JSON ({exc}); re-train the adapter or download it again.") from None
    if not isinstance(meta, dict):
        raise TrainError(f"{path} must hold a JSON object; re-train the adapter or download it again.")
    return meta


def export_merged(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None,
                  dtype: str = "float32") -> Path:
    """Merge an adapter into its base model and save a plain Hugging Face directory (model +
    tokenizer with the markers, resized embeddings) that ``load_model(out_dir)`` loads as is.

    Also what vLLM-style servers need: they no longer accept extra vocabulary in LoRA adapters.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise TrainError(f"{adapter_dir} is not an adapter directory (no adapter_config.json).")
    base = base or read_adapter_meta(adapter_dir).get("base_model")
    if not base:
        raise TrainError(f"{adapter_dir} does not record its base model; pass --base SPEC.")
    lm = load_model(base, adapter=str(adapter_dir), device="cpu", dtype=dtype)
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lm.model.save_pretrained(str(tmp))
    lm.tokenizer.save_pretrained(str(tmp))
    (tmp / ADAPTER_META).write_text(json.dumps({"format": "flashback-merged", "base_model": base,
                                                "adapter": str(adapter_dir), "marker_ids": list(lm.marker_ids)},
                                               indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
