"""Adapter training, its settings: what a run depends on (:class:`TrainConfig`), what it produced
(:class:`TrainResult`), and the training errors (:class:`TrainError`, :class:`CheckpointError`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import FlashBackError
from ..models import DEFAULT_MODEL

#: ``target_modules`` value (like None) for the model's K/V projections (:func:`..lora.default_lora_targets`)
AUTO_TARGETS = "auto"


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
