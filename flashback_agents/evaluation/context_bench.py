"""``bench context`` and ``bench decode``: the physical limits of the engine.

- context: appending M tokens to a cached N-token context vs recomputing all N+M tokens (the
  baseline at its best: one forward pass, same weights, dtype and threads, ``logits_to_keep=1``).
- decode: milliseconds per generated token at a given context, beside the weight-streaming floor
  (one token's matrix-vector products over every weight matrix, nothing else), and beside
  transformers' own ``DynamicCache`` (which concatenates the whole cache on every token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..context import CachedContext
from ..kvcache import new_cache
from .common import filler_ids, timed


@dataclass
class ContextPoint:
    context_tokens: int
    append_tokens: int
    cached_append_s: float
    full_recompute_s: float
    ratio: float


@torch.inference_mode()
def bench_context(lm, contexts: list[int], append: int = 64, repeats: int = 3) -> list[ContextPoint]:
    """Cached append vs full recompute at each context length (both measured here, now)."""
    points = []
    for n in tqdm(contexts, desc="bench context", unit="ctx"):
        if n + append > lm.max_positions:
            raise ValueError(f"--context {n} + --append {append} exceeds the model window ({lm.max_positions})")
        ids = filler_ids(lm, n + append)
        ctx = CachedContext(lm)
        ctx.append(ids[:n])

        def cached() -> None:
            ctx.append(ids[n:])
            ctx.rollback(append)

        def full() -> None:
            lm.model(torch.tensor([ids], device=lm.device), use_cache=False, logits_to_keep=1)

        t_append = timed(cached, repeats=max(repeats, 3))
        t_full = timed(full, repeats=repeats)
        points.append(ContextPoint(n, append, t_append, t_full, t_full / t_append))
    return points


def weight_floor_seconds(lm, repeats: int = 5) -> float:
    """One token's matrix-vector products over all 2-D weight matrices: the decode floor."""
    mats = [p.detach() for p in lm.model.parameters() if p.dim() == 2]
    seen, uniq = set(), []
    for m in mats:  # tied embeddings count once (they are streamed once)
        if m.data_ptr() not in seen:
            seen.add(m.data_ptr())
            uniq.append(m)
    vecs = {m.shape[1]: torch.randn(m.shape[1], dtype=m.dtype, device=m.device) for m in uniq}
    # the input embedding is a row lookup, not a matvec, unless it is tied to the LM head
    emb = lm.model.get_input_embeddings().weight
    tied = lm.model.get_output_embeddings() is not None and lm.model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    work = [m for m in uniq if tied or m.data_ptr() != emb.data_ptr()]

    def run() -> None:
        for m in work:
            torch.mv(m, vecs[m.shape[1]])

    return timed(run, repeats=repeats, warmup=2)


@torch.inference_mode()
def decode_ms_per_token(lm, context: int, tokens: int = 32, growing: bool = True) -> float:
    """Steady-state decode cost at ``context`` tokens, with our cache or transformers' DynamicCache."""
    ctx = CachedContext(lm)
    if not growing:
        from transformers.cache_utils import DynamicCache

        ctx.use_cache(DynamicCache(config=lm.model.config))
    else:
        ctx.use_cache(new_cache(lm.model))
    ctx.append(filler_ids(lm, context))
    import time

    tok = int(torch.argmax(ctx.next_token_logits()))
    t0 = time.perf_counter()
    for _ in range(tokens):
        ctx.push_generated(tok)
        tok = int(torch.argmax(ctx.next_token_logits()))
    return (time.perf_counter() - t0) / tokens * 1000


def bench_decode(lm, contexts: list[int], tokens: int = 32) -> dict:
    floor_ms = weight_floor_seconds(lm) * 1000
    rows = []
    for n in tqdm(contexts, desc="bench decode", unit="ctx"):
        ours = decode_ms_per_token(lm, n, tokens, growing=True)
        dyn = decode_ms_per_token(lm, n, tokens, growing=False)
        rows.append({"context_tokens": n, "ms_per_token": ours, "dynamic_cache_ms_per_token": dyn,
                     "floor_ms": floor_ms, "ratio_to_floor": ours / floor_ms,
                     "speedup_vs_dynamic_cache": dyn / ours})
    return {"model": lm.name, "dtype": str(lm.dtype), "threads": torch.get_num_threads(),
            "floor_ms": floor_ms, "points": rows}


def points_to_dicts(points: list[ContextPoint]) -> list[dict]:
    return [asdict(p) for p in points]
