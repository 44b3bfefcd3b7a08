"""The FlashBack adapter trainer: LoRA on K/V projections plus the two marker embedding rows.

What is optimised, and nothing else: peft LoRA on the attention K/V projections (``k_proj``/``v_proj``,
or the fused ``c_attn`` / ``query_key_value`` / ``qkv_proj`` by family: :func:`default_lora_targets`;
configurable) and the
``<MARK_L>``/``<MARK_R>`` rows of the input embedding (peft ``trainable_token_indices``; a tied LM
head follows). The base model stays frozen and bit-identical.

The loop is deliberately plain (nanoGPT style): AdamW, cosine schedule with warmup, gradient
accumulation, eval loss every N steps, a checkpoint every N steps that ``resume=True`` continues
from exactly (weights, optimizer, scheduler, RNG, data position). It runs through
:class:`accelerate.Accelerator`, so ``accelerate launch -m flashback_agents.cli train ...`` trains
data-parallel on several GPUs with the same code; on a CPU it is one process.

Output directory: the peft adapter (``save_pretrained``: LoRA + marker rows), the tokenizer (with
the markers) and ``flashback_adapter.json`` (base model spec, marker ids). Load it with
``flashback_agents.load_model(spec, adapter=DIR)``; merge it with :func:`export_merged`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import FlashBackError
from ..models import ADAPTER_META, DEFAULT_MODEL, MARK_L, MARK_R, LoadedModel, base_fingerprint, load_model
from .samples import IGNORE, Sample, collate, length_batches

CHECKPOINTS = "checkpoints"
_STATE_FILE = "trainer_state.pt"


class TrainError(RuntimeError, FlashBackError):
    """A training mistake a user can make (no samples, output dir in use, config mismatch on resume)."""


class CheckpointError(TrainError):
    """A checkpoint ``resume`` cannot continue from (damaged, crafted, or of another run): a bad input,
    so the CLI exits 2; the message names the checkpoint and says what to do."""


@dataclass
class TrainConfig:
    """Everything a run depends on (peft ``LoraConfig`` style: plain fields, sensible defaults)."""

    model: str = DEFAULT_MODEL            # base model spec, recorded in flashback_adapter.json
    output_dir: str = "flashback-adapter"
    steps: int = 200                      # optimizer steps in total
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int | None = None       # None: 5% of steps (at least 1)
    batch_size: int = 4                   # samples per micro-batch per process
    grad_accum: int = 1                   # micro-batches per optimizer step
    max_length: int = 1024                # tokens per sample (samples are cut at whole blocks/turns)
    max_grad_norm: float | None = 1.0
    eval_every: int = 50                  # 0: never (an eval also runs at the end if there is eval data)
    eval_fraction: float = 0.05           # held out when no eval samples are given
    eval_max_samples: int = 64
    save_every: int = 100                 # checkpoint interval; 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    gradient_checkpointing: bool = False
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | str | None = None  # None / "auto": default_lora_targets(model) (the K/V projections)
    train_markers: bool = True            # the two marker rows via trainable_token_indices
    resume: bool = False
    max_steps_this_run: int | None = None  # stop (with a checkpoint) after this many steps; resume later
    mixed_precision: str = "no"           # "no" | "bf16" | "fp16" (accelerate autocast)
    dtype: str = "float32"                # weights dtype when this trainer loads the model
    progress: bool = True

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, round(0.05 * self.steps))

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "max_length", "r"):
            if getattr(self, name) < 1:
                raise TrainError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise TrainError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not 0 <= self.lora_dropout < 1:
            raise TrainError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.target_modules is not None and self.target_modules != AUTO_TARGETS and not self.target_modules:
            raise TrainError("target_modules must name at least one module, or be None/'auto' for the model's "
                             "K/V projections (default_lora_targets).")


# Fields that must match between a checkpoint and a resumed run (others, e.g. steps, may change).
_RESUME_KEYS = ("model", "r", "lora_alpha", "target_modules", "train_markers", "batch_size", "grad_accum", "seed")


@dataclass
class TrainResult:
    """What a run produced: where, how far, and the loss history (step, value)."""

    output_dir: str
    step: int
    train_loss: list[tuple[int, float]]
    eval_loss: list[tuple[int, float]]
    model: Any = None                 # the trained PeftModel (unwrapped), for tests and notebooks
    finished: bool = True             # False when stopped early by max_steps_this_run
    resumed_from: int | None = None


# ----------------------------------------------------------------------------- helpers

def embedding_module_name(model: Any) -> str:
    """Short name of the input embedding module (``embed_tokens`` for Llama-family models)."""
    emb = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is emb:
            return name.rsplit(".", 1)[-1]
    raise TrainError("Could not find the model's input embedding module.")


AUTO_TARGETS = "auto"
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


def default_lora_targets(model: Any) -> list[str]:
    """The LoRA targets FlashBack trains for ``model``: its key/value projections, by family.

    The one place target names are resolved (``TrainConfig.target_modules`` None or ``"auto"``), so
    the CLI, the trainer and the tests agree for every architecture.
    """
    from transformers.pytorch_utils import Conv1D

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
    from transformers.pytorch_utils import Conv1D

    # GPT-2-style Conv1D stores its weight transposed: peft must be told (it warns and fixes it otherwise)
    conv1d = any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in lm.model.named_modules())
    peft_config = LoraConfig(
        task_type="CAUSAL_LM", r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, fan_in_fan_out=conv1d,
        trainable_token_indices={embedding_module_name(lm.model): list(lm.marker_ids)} if config.train_markers else None,
    )
    return get_peft_model(lm.model, peft_config)


def _rng_state() -> dict[str, Any]:
    """RNG state as tensors and plain values only, so it loads with ``torch.load(weights_only=True)``
    (a checkpoint file must never be able to run code when it is read)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [int(version), torch.tensor(internal, dtype=torch.int64),
                                        None if gauss is None else float(gauss)],
                             "torch": torch.get_rng_state()}
    try:
        import numpy as np
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
        import numpy as np
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


def _write_adapter(model: Any, lm: LoadedModel, config: TrainConfig, path: Path, step: int) -> None:
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


def _batch_stream(samples: Sequence[Sample], config: TrainConfig, pad_id: int, start: int,
                  rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches, reshuffled every epoch, starting at micro-batch ``start`` (for resume).

    Process ``rank`` takes every ``world``-th batch of each epoch: data parallel without a sampler.
    """
    lengths = [len(s) for s in samples]
    k, epoch = 0, 0
    while True:
        order = length_batches(lengths, config.batch_size, seed=config.seed, epoch=epoch)[rank::world]
        if not order:
            order = length_batches(lengths, config.batch_size, seed=config.seed, epoch=epoch)[:1]
        for b in order:
            if k >= start:
                yield collate([samples[i] for i in b], pad_id)
            k += 1
        epoch += 1


def _split_eval(samples: list[Sample], config: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    if len(samples) < 10 or config.eval_fraction <= 0:
        return samples, []
    n = min(config.eval_max_samples, max(1, int(len(samples) * config.eval_fraction)))
    idx = list(range(len(samples)))
    random.Random(config.seed).shuffle(idx)
    held = set(idx[:n])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


@torch.no_grad()
def evaluate(model: Any, samples: Sequence[Sample], pad_id: int, batch_size: int, accelerator: Any = None) -> float:
    """Token-weighted mean loss over ``samples`` (the same loss the trainer optimises)."""
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for b in length_batches([len(s) for s in samples], batch_size, shuffle=False)[rank::world]:
        batch = {k: v.to(device) for k, v in collate([samples[i] for i in b], pad_id).items()}
        ctx = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
        with ctx:
            out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        logits = out.logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
        total += torch.stack([loss.double(), (target != IGNORE).sum().double()])
    if accelerator is not None:
        total = accelerator.reduce(total, "sum")
    if was_training:
        model.train()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


# ----------------------------------------------------------------------------- the loop

def train(config: TrainConfig, samples: Sequence[Sample], eval_samples: Sequence[Sample] | None = None, *,
          lm: LoadedModel | None = None) -> TrainResult:
    """Train a FlashBack adapter on ``samples`` and write it to ``config.output_dir``.

    ``lm``: the base model the samples were tokenized with; it is wrapped in place (pass a fresh
    load). Without it, ``config.model`` is loaded. With ``config.resume`` the run continues from the
    newest checkpoint in ``output_dir`` (same data, same config) and ends exactly where an
    uninterrupted run would.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    config.check()
    samples = [s for s in samples if s.n_trained]
    if not samples:
        raise TrainError("No training samples with trainable tokens (check the data and max_length).")
    if eval_samples is None:
        samples, eval_samples = _split_eval(list(samples), config)
    eval_samples = [s for s in (eval_samples or []) if s.n_trained]
    out_dir = Path(config.output_dir)
    found = checkpoints(out_dir)
    if found and not config.resume:
        raise TrainError(f"{out_dir} already holds checkpoints (last: {found[-1].name}); pass resume=True "
                         "(--resume) to continue, or choose another output directory.")

    accelerator = _accelerator(config)
    set_seed(config.seed)
    if lm is None:
        lm = load_model(config.model, adapter=None, device=str(accelerator.device), dtype=config.dtype)
    too_long = max(s.span for s in samples)
    if too_long > lm.max_positions:
        raise TrainError(f"A sample has {too_long} tokens but the model's window is {lm.max_positions}; "
                         "lower max_length.")
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0

    # Model: LoRA on K/V + marker rows; the rest frozen.
    if lm.adapter is not None:
        raise TrainError(f"The base model already has an adapter attached ({lm.adapter}); load it with "
                         "adapter=None to train a new one.")
    if lm.base_fingerprint is None:
        lm.base_fingerprint = base_fingerprint(lm.model)
    config = replace(config, target_modules=resolve_targets(lm.model, config.target_modules))  # recorded resolved
    set_seed(config.seed)  # LoRA init is random: make it a function of the seed
    model = build_peft_model(lm, config)
    if config.gradient_checkpointing:
        base = model.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup(), config.steps)
    model, optimizer = accelerator.prepare(model, optimizer)  # scheduler stepped by hand, once per step
    raw = accelerator.unwrap_model(model)

    step, resumed_from = 0, None
    history: dict[str, list] = {"train_loss": [], "eval_loss": []}
    if config.resume and found:
        step = _load_checkpoint(found[-1], raw, optimizer, scheduler, config, accelerator, history)
        resumed_from = step
    data = _batch_stream(samples, config, pad_id, step * config.grad_accum,
                         accelerator.process_index, accelerator.num_processes)

    def save_checkpoint() -> None:
        _save_checkpoint(out_dir, step, raw, lm, optimizer, scheduler, config, accelerator, history)

    stop_at = config.steps if config.max_steps_this_run is None else min(config.steps, step + config.max_steps_this_run)
    bar = tqdm(total=config.steps, initial=step, desc="train", unit="step",
               disable=not (config.progress and accelerator.is_local_main_process))
    model.train()
    t0, tokens = time.perf_counter(), 0
    while step < stop_at:
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro in range(config.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in next(data).items()}
            last = micro == config.grad_accum - 1
            with (contextlib.nullcontext() if last else accelerator.no_sync(model)), accelerator.autocast():
                loss = model(**batch, use_cache=False).loss / config.grad_accum
            accelerator.backward(loss)
            loss_sum += loss.detach()
            tokens += int(batch["input_ids"].numel())
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        loss_value = float(accelerator.reduce(loss_sum, "mean"))
        history["train_loss"].append((step, loss_value))
        rate = tokens * accelerator.num_processes / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", tok_s=f"{rate:.0f}")
        bar.update(1)
        if eval_samples and ((config.eval_every and step % config.eval_every == 0) or step == config.steps):
            ev = evaluate(model, eval_samples, pad_id, config.batch_size, accelerator)
            history["eval_loss"].append((step, ev))
            if config.progress and accelerator.is_local_main_process:
                bar.write(f"step {step}: eval loss {ev:.4f}")
        if (config.save_every and step % config.save_every == 0) or step == stop_at:
            save_checkpoint()
    bar.close()

    finished = step >= config.steps
    if finished:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_adapter(raw, lm, config, out_dir, step)
            (out_dir / "train_history.json").write_text(json.dumps(
                {"config": asdict(config), "step": step, **history}, indent=2, default=str))
    accelerator.wait_for_everyone()
    model.eval()
    return TrainResult(output_dir=str(out_dir), step=step, train_loss=history["train_loss"],
                       eval_loss=history["eval_loss"], model=raw, finished=finished, resumed_from=resumed_from)


def _accelerator(config: TrainConfig) -> Any:
    """An Accelerator; in a single process a later run may change mixed precision (notebooks, tests)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    try:
        return Accelerator(mixed_precision=config.mixed_precision)
    except ValueError:
        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()  # accelerate keeps process-wide state; one process may reset it
        return Accelerator(mixed_precision=config.mixed_precision)


def _save_checkpoint(out_dir: Path, step: int, model: Any, lm: LoadedModel, optimizer: Any, scheduler: Any,
                     config: TrainConfig, accelerator: Any, history: dict) -> None:
    """A usable adapter directory plus everything needed to continue exactly (per-process RNG)."""
    path = out_dir / CHECKPOINTS / f"step-{step:06d}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _write_adapter(model, lm, config, tmp, step)
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


def _load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, config: TrainConfig,
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


# ----------------------------------------------------------------------------- export

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


__all__ = ["CheckpointError", "TrainConfig", "TrainError", "TrainResult", "build_peft_model", "checkpoints",
           "default_lora_targets", "evaluate", "export_merged", "read_adapter_meta", "train"]

