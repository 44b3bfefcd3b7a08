"""Perplexity evaluation, its scoring: teacher-forced NLL of every stride with evidence appended after
the cached text (FlashBack, :func:`score_append`) or prepended before it (In-Context RALM,
:func:`score_prepend`), summed per setting in a :class:`SettingResult`."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from .. import kvcache
from ..ralm_layout import step_ids
from .ppl_config import PerplexityError
from .ppl_data import chunk_starts


def token_nll(logits: torch.Tensor, targets: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood (float64) of ``targets`` under ``logits`` ([n, vocab])."""
    t = torch.as_tensor(targets, dtype=torch.long, device=logits.device)
    return torch.nn.functional.cross_entropy(logits.float(), t, reduction="none").double().cpu()


@torch.inference_mode()
def continuation_nll(lm: Any, context_ids: Sequence[int], continuation_ids: Sequence[int]) -> torch.Tensor:
    """NLL of each continuation token given the context, by one plain full forward (the reference)."""
    if not context_ids:
        raise PerplexityError("continuation_nll needs at least one context token.")
    cont = list(continuation_ids)
    inp = torch.tensor([list(context_ids) + cont[:-1]], dtype=torch.long, device=lm.device)
    logits = lm.model(input_ids=inp, use_cache=False, logits_to_keep=len(cont)).logits[0]
    return token_nll(logits, cont)


@torch.inference_mode()
def _forward(lm: Any, ids: Sequence[int], cache: Any, keep: int) -> torch.Tensor:
    inp = torch.tensor([list(ids)], dtype=torch.long, device=lm.device)
    return kvcache.forward(lm.model, inp, cache, logits_to_keep=keep).logits[0]


EvidenceFn = Callable[[int, int], list[int]]  # (block index, chunk start) -> ids placed for that stride


@dataclass
class SettingResult:
    """One row cell: NLL summed over the evaluated tokens, how many, and what it cost."""

    setting: str
    top_k: int
    nll: float = 0.0
    tokens: int = 0
    tokens_computed: int = 0  # model positions run (the price of the layout)
    seconds: float = 0.0
    # NLL summed by offset in the stride (0: the token right after the evidence): where a layout loses
    offset_nll: list[float] = field(default_factory=list)
    offset_tokens: list[int] = field(default_factory=list)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def add(self, nll: torch.Tensor) -> None:
        """Count one stride's per-token NLLs (in order)."""
        values = [float(x) for x in nll]
        grow = len(values) - len(self.offset_nll)
        if grow > 0:
            self.offset_nll += [0.0] * grow
            self.offset_tokens += [0] * grow
        for j, x in enumerate(values):
            self.offset_nll[j] += x
            self.offset_tokens[j] += 1
        self.nll += sum(values)
        self.tokens += len(values)

    def offset_ppl(self) -> list[float]:
        """Perplexity at each offset in the stride."""
        return [math.exp(n / c) if c else float("nan") for n, c in zip(self.offset_nll, self.offset_tokens)]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ppl": self.ppl, "offset_ppl": self.offset_ppl()}


@torch.inference_mode()
def score_append(lm: Any, blocks: Sequence[Sequence[int]], stride: int, evidence: EvidenceFn | None = None,
                 result: SettingResult | None = None, bar: Any = None) -> SettingResult:
    """Teacher-forced NLL of every stride with ``evidence(b, i)`` appended after the cached text so far.

    Per stride: run ``evidence + stride[:-1]`` on the text cache (its logits predict the stride),
    crop the cache back, then append the stride's text alone. No evidence: the stride is run once
    and predicted by the previous position's logits (plain cached perplexity).
    """
    res = result or SettingResult("append", 0)
    t0 = time.perf_counter()
    for b, block in enumerate(blocks):
        cache = kvcache.new_cache(lm.model)
        last = _forward(lm, block[:stride], cache, 1)[-1]
        res.tokens_computed += stride
        starts = chunk_starts(block, stride)
        for n, i in enumerate(starts):
            cont = list(block[i:i + stride])
            ev = evidence(b, i) if evidence is not None else []
            if ev:
                pred = _forward(lm, step_ids(block, i, ev, len(cont))[i:-1], cache, len(cont))
                res.tokens_computed += len(ev) + len(cont) - 1
                kept = kvcache.crop_to(cache, i)
                if kept < i:  # a recurrent/hybrid state cannot be cropped: re-run the text from the checkpoint
                    _forward(lm, block[kept:i], cache, 1)
                    res.tokens_computed += i - kept
                if n + 1 < len(starts):
                    last = _forward(lm, cont, cache, 1)[-1]
                    res.tokens_computed += len(cont)
            else:
                out = _forward(lm, cont, cache, len(cont))
                res.tokens_computed += len(cont)
                pred = torch.cat([last[None], out[:-1]]) if len(cont) > 1 else last[None]
                last = out[-1]
            res.add(token_nll(pred, cont))
            if bar is not None:
                bar.update(1)
        del cache
    res.seconds += time.perf_counter() - t0
    return res


@torch.inference_mode()
def score_prepend(lm: Any, blocks: Sequence[Sequence[int]], stride: int, evidence: EvidenceFn,
                  result: SettingResult | None = None, bar: Any = None) -> SettingResult:
    """Teacher-forced NLL of every stride with ``evidence(b, i)`` placed before the text so far
    (In-Context RALM): one full forward of ``[evidence][block[:i + stride - 1]]`` per stride."""
    res = result or SettingResult("prepend", 0)
    t0 = time.perf_counter()
    for b, block in enumerate(blocks):
        for i in chunk_starts(block, stride):
            cont = list(block[i:i + stride])
            ids = evidence(b, i) + list(block[:i + len(cont) - 1])
            inp = torch.tensor([ids], dtype=torch.long, device=lm.device)
            logits = lm.model(input_ids=inp, use_cache=False, logits_to_keep=len(cont)).logits[0]
            res.tokens_computed += len(ids)
            res.add(token_nll(logits, cont))
            if bar is not None:
                bar.update(1)
    res.seconds += time.perf_counter() - t0
    return res
