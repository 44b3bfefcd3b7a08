"""Adapter training, its files: the adapter directory a run writes (:func:`write_adapter`) and the
checkpoints ``resume`` continues from exactly (:func:`save_checkpoint`, :func:`load_checkpoint`):
weights, optimizer, scheduler, RNG; everything read back is checked before it is used."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import ADAPTER_META, MARK_L, MARK_R, LoadedModel
from .config import CheckpointError, TrainConfig

CHECKPOINTS = "checkpoints"
_STATE_FILE = "trainer_state.pt"


# Fields that must match between a checkpoint and a resumed run (others, e.g. steps, may change).
_RESUME_KEYS = ("model", "r", "lora_alpha", "target_modules", "train_markers", "batch_size", "grad_accum", "seed")


def _rng_state() -> dict[str, Any]:
    """RNG state as tensors and plain values only, so it loads with ``torch.load(weights_only=True)``
    (a checkpoint file must never be able to run code when it is read)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [int(version), torch.tensor(internal, dtype=torch.int64),
                                        None if gauss is None else float(gauss)],
                             "torch": torch.get_rng_state()}
    try:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                          float(cached)]
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_error(path: Path, problem: str) -> CheckpointError:
    """One wording for every checkpoint ``resume`` refuses: which one, what is wrong, what to do."""
    return CheckpointError(f"Cannot resume from {path}: {problem}. Delete that checkpoint directory (an earlier "
                           "one, if any, is used then), or train without --resume into a new output directory.")


def _safe_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _checkpoint_error(
            path.parent, f"{path.name} is not a checkpoint this version can read safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); checkpoints are loaded with weights_only=True "
            "(no code from files)") from exc


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under ``output_dir``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    # exactly step-N: a save interrupted before its rename leaves step-N.tmp, never resumed from
    found = [p for p in root.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and p.is_dir()
             and (p / _STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def write_adapter(model: Any, lm: LoadedModel, config: TrainConfig, path: Path, step: int) -> None:
    """peft adapter + tokenizer + flashback_adapter.json: a directory load_model(adapter=) accepts."""
    path.mkdir(parents=True, exist_ok=True)
    # Marker rows are stored by trainable_token_indices; never write the whole (resized) embedding.
    model.save_pretrained(str(path), save_embedding_layers=False)
    lm.tokenizer.save_pretrained(str(path))
    meta = {"format": "flashback-adapter", "version": 1, "base_model": config.model,
            "markers": [MARK_L, MARK_R], "marker_ids": list(lm.marker_ids), "vocab_size": len(lm.tokenizer),
            "step": step, "target_modules": list(config.target_modules), "r": config.r,
            "lora_alpha": config.lora_alpha, "train_markers": config.train_markers,
            "base_fingerprint": lm.base_fingerprint}
    (path / ADAPTER_META).write_text(json.dumps(meta, indent=2))


def save_checkpoint(out_dir: Path, step: int, model: Any, lm: LoadedModel, optimizer: Any, scheduler: Any,
                     config: TrainConfig, accelerator: Any, history: dict) -> None:
    """A usable adapter directory plus everything needed to continue exactly (per-process RNG)."""
    path = out_dir / CHECKPOINTS / f"step-{step:06d}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_adapter(model, lm, config, tmp, step)
        torch.save({"step": step, "trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "config": asdict(config), "history": history},
                   tmp / _STATE_FILE)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), path / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and config.keep_checkpoints > 0:
        for old in checkpoints(out_dir)[:-config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


#: what trainer_state.pt must hold, and the type of each entry
_STATE_KEYS: dict[str, type] = {"step": int, "trainable": dict, "optimizer": dict, "scheduler": dict, "config": dict}
_LOAD_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError)
_ADAMW_KEYS = ("params", "lr", "betas", "eps", "weight_decay")  # what AdamW.step reads without a default


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same_kind(now: Any, saved: Any) -> bool:
    """Whether a value read from a checkpoint has the structure of the one this run has: same container
    lengths, no keys this run lacks (older torch versions may have fewer), tensors of the same shape
    and dtype, finite numbers where this run has numbers."""
    if _is_number(now):
        return _is_number(saved) and math.isfinite(saved)
    if isinstance(now, (list, tuple)):
        return type(saved) is type(now) and len(saved) == len(now) and all(map(_same_kind, now, saved))
    if isinstance(now, dict):  # a key this run lacks would become a stray attribute (torch's __dict__.update)
        return (isinstance(saved, dict) and saved.keys() <= now.keys()
                and all(_same_kind(now[k], saved[k]) for k in saved))
    if isinstance(now, torch.Tensor):
        return (isinstance(saved, torch.Tensor) and saved.shape == now.shape and saved.dtype == now.dtype
                and bool(torch.isfinite(saved).all()))
    return type(saved) is type(now)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} {value.dtype} tensor"
    return f"a {type(value).__name__}"


def _check_state(path: Path, state: Any, model: Any, config: TrainConfig) -> dict[str, torch.Tensor]:
    """trainer_state.pt: the required entries with their types, a step within 0..steps, the same
    resume-relevant config, and exactly this model's trainable weights (shape, dtype, finite).
    Returns the name -> parameter map to copy into."""
    if not isinstance(state, dict):
        raise _checkpoint_error(path, f"{_STATE_FILE} holds {_describe(state)}, not a checkpoint")
    for key, kind in _STATE_KEYS.items():
        if key not in state:
            raise _checkpoint_error(path, f"{_STATE_FILE} lacks {key!r}")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise _checkpoint_error(path, f"{_STATE_FILE}: {key!r} is {_describe(state[key])}, not "
                                          f"{'an integer' if kind is int else 'a dict'}")
    saved, step = state["config"], state["step"]
    diff = [k for k in _RESUME_KEYS if k in saved and saved[k] != getattr(config, k)]
    if diff:
        raise _checkpoint_error(path, f"the config differs in {diff} (checkpoint: {[saved[k] for k in diff]}, now: "
                                      f"{[getattr(config, k) for k in diff]}); resume with the checkpoint's settings")
    if not 0 <= step <= config.steps:
        raise _checkpoint_error(path, f"it is at step {step}, outside 0..steps={config.steps}"
                                      + (f" (pass steps >= {step} to train further)" if step > config.steps else ""))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    weights = state["trainable"]
    missing, unknown = sorted(set(params) - set(weights)), sorted(set(weights) - set(params), key=str)
    if missing or unknown:
        raise _checkpoint_error(path, f"its trainable weights do not match this model (missing {missing[:2]}, "
                                      f"unknown {unknown[:2]})")
    for name, value in weights.items():
        want = params[name]
        if not isinstance(value, torch.Tensor) or value.shape != want.shape or value.dtype != want.dtype:
            raise _checkpoint_error(path, f"parameter {name} is {_describe(value)}, this model's is {_describe(want)}")
        if not bool(torch.isfinite(value).all()):
            raise _checkpoint_error(path, f"parameter {name} holds NaN or infinite values")
    history = state.get("history", {})
    pairs = isinstance(history, dict) and set(history) <= {"train_loss", "eval_loss"} and all(
        isinstance(v, list) and all(isinstance(x, (list, tuple)) and len(x) == 2 and all(map(_is_number, x)) for x in v)
        for v in history.values())
    if not pairs:
        raise _checkpoint_error(path, f"{_STATE_FILE}: 'history' must map train_loss/eval_loss to (step, loss) pairs")
    return params


def _check_optimizer_state(path: Path, saved: dict, optimizer: Any) -> None:
    """The optimizer state fits this run's parameters: torch only checks group sizes, so a wrong-shaped
    moment would be a size mismatch at the first step, a NaN one a NaN model."""
    groups, per_param = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(per_param, dict) or len(groups) != len(optimizer.param_groups):
        raise _checkpoint_error(path, "its optimizer state is not one of this run's (param_groups/state)")
    by_index: dict[Any, torch.Tensor] = {}
    for group, now in zip(groups, optimizer.param_groups):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or len(ids) != len(now["params"]) or not all(isinstance(i, int) for i in ids):
            raise _checkpoint_error(path, "its optimizer param_groups do not match this run's parameters")
        if any(k not in group for k in _ADAMW_KEYS):
            raise _checkpoint_error(path, f"its optimizer param_groups lack one of {list(_ADAMW_KEYS)}")
        odd = [k for k in group if k != "params" and k in now and not _same_kind(now[k], group[k])]
        if odd:
            raise _checkpoint_error(path, f"its optimizer setting {odd[0]!r} is {group[odd[0]]!r:.60}")
        by_index.update(zip(ids, now["params"]))
    for index, values in per_param.items():
        param = by_index.get(index)
        if param is None or not isinstance(values, dict):
            raise _checkpoint_error(path, f"its optimizer state has an entry for an unknown parameter {index!r:.40}")
        for key, value in values.items():
            ok = (_is_number(value) and math.isfinite(value)) or (
                isinstance(value, torch.Tensor) and value.is_floating_point() and value.shape in (param.shape, ())
                and bool(torch.isfinite(value).all()))
            if not ok:
                raise _checkpoint_error(path, f"its optimizer state {key!r} of parameter {index} is {_describe(value)} "
                                              f"(the parameter is {tuple(param.shape)}, values must be finite)")


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, config: TrainConfig,
                     accelerator: Any, history: dict) -> int:
    """Continue from a checkpoint. Everything read is checked before any of it is used: a damaged or
    crafted file is a :class:`CheckpointError` naming the checkpoint and what to do, never a raw
    ``KeyError``/size mismatch or a silently wrong run (negative step, NaN weights)."""
    state = _safe_load(path / _STATE_FILE)
    params = _check_state(path, state, model, config)
    _check_optimizer_state(path, state["optimizer"], optimizer)
    if not _same_kind(scheduler.state_dict(), state["scheduler"]):
        raise _checkpoint_error(path, "its learning-rate scheduler state is not one of this run's")
    if state["scheduler"].get("last_epoch") != state["step"]:
        raise _checkpoint_error(path, f"its scheduler is at step {state['scheduler'].get('last_epoch')}, the "
                                      f"checkpoint at step {state['step']}")
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    rng = _safe_load(rng_file) if rng_file.is_file() else None
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value.to(params[name].device))
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except _LOAD_ERRORS as exc:
        raise _checkpoint_error(path, f"its optimizer or scheduler state cannot be loaded ({type(exc).__name__}: "
                                      f"{' '.join(str(exc).split())[:200]})") from None
    if rng is not None:
        try:
            _set_rng_state(rng)
        except _LOAD_ERRORS as exc:
            raise _checkpoint_error(path, f"{rng_file.name} is not a saved random state ({type(exc).__name__}: "
                                          f"{' '.join(str(exc).split())[:200]})") from None
    history.update({k: [tuple(x) for x in v] for k, v in state.get("history", {}).items()})
    return state["step"]
