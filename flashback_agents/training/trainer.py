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

The loop lives here; its parts are ``config`` (TrainConfig, errors), ``lora`` (the peft model),
``checkpoint`` (adapter and checkpoint files) and ``export`` (merging); their public names are
re-exported.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..models import LoadedModel, base_fingerprint, load_model
from .checkpoint import checkpoints, load_checkpoint, save_checkpoint, write_adapter
from .config import AUTO_TARGETS, CheckpointError, TrainConfig, TrainError, TrainResult
from .export import export_merged, read_adapter_meta
from .lora import build_peft_model, default_lora_targets, embedding_module_name, resolve_targets
from .samples import IGNORE, Sample, collate, length_batches


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


def train(config: TrainConfig, samples: Sequence[Sample], eval_samples: Sequence[Sample] | None = None, *,
          lm: LoadedModel | None = None) -> TrainResult:
    """Train a FlashBack adapter on ``samples`` and write it to ``config.output_dir``.

    ``lm``: the base model the samples were tokenized with; it is wrapped in place (pass a fresh
    load). Without it, ``config.model`` is loaded. With ``config.resume`` the run continues from the
    newest checkpoint in ``output_dir`` (same data, same config) and ends exactly where an
    uninterrupted run would.
    """
    from accelerate.utils import set_seed
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
        step = load_checkpoint(found[-1], raw, optimizer, scheduler, config, accelerator, history)
        resumed_from = step
    data = _batch_stream(samples, config, pad_id, step * config.grad_accum,
                         accelerator.process_index, accelerator.num_processes)

    def checkpoint_now() -> None:
        save_checkpoint(out_dir, step, raw, lm, optimizer, scheduler, config, accelerator, history)

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
            checkpoint_now()
    bar.close()

    finished = step >= config.steps
    if finished:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_adapter(raw, lm, config, out_dir, step)
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


__all__ = ["AUTO_TARGETS", "CheckpointError", "TrainConfig", "TrainError", "TrainResult", "build_peft_model",
           "checkpoints", "default_lora_targets", "embedding_module_name", "evaluate", "export_merged",
           "read_adapter_meta", "resolve_targets", "train"]
