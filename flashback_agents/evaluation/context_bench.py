"""``bench context`` and ``bench decode``: the physical limits of the engine.

- context: appending M tokens to a cached N-token context vs recomputing all N+M tokens (the
  baseline at its best: one forward pass, same weights, dtype and threads, ``logits_to_keep=1``).
- decode: milliseconds per generated token at a given context, beside the weight-streaming floor
  (one token's matrix-vector products over every weight matrix, nothing else), and beside
  transformers' own ``DynamicCache`` (which concatenates the whole cache on every token).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from ..context import CachedContext
from ..generation import GenerationConfig, generate
from ..kvcache import new_cache
from ..kvstore import DiskKVStore
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
        ctx.use_cache(DynamicCache(config=lm.model.config))
    else:
        ctx.use_cache(new_cache(lm.model))
    ctx.append(filler_ids(lm, context))
    tok = int(torch.argmax(ctx.next_token_logits()))
    t0 = time.perf_counter()
    for _ in range(tokens):
        ctx.push_generated(tok)
        tok = int(torch.argmax(ctx.next_token_logits()))
    return (time.perf_counter() - t0) / tokens * 1000


def generate_ms_per_token(lm, context: int, tokens: int = 32, speculation: bool = True) -> dict:
    """``generate`` (greedy, ``tokens`` tokens, EOS masked) on ``context`` tokens of log text, with
    prompt-lookup speculation on or off: ms per token and the multi-token decoding counters."""
    ctx = CachedContext(lm)
    ctx.append(filler_ids(lm, context))
    cfg = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, speculate=speculation,
                           jump_forward=speculation)
    t0 = time.perf_counter()
    r = generate(ctx, cfg)
    dt = time.perf_counter() - t0
    n = max(1, len(r.token_ids))
    return {"ms_per_token": dt / n * 1000, "tokens": len(r.token_ids), "forwards": r.forwards,
            "forwards_per_token": r.forwards / n, "drafted": r.drafted, "accepted": r.accepted,
            "token_ids": r.token_ids}


def bench_decode(lm, contexts: list[int], tokens: int = 32, speculation: bool = False) -> dict:
    """``speculation``: also time ``generate`` with prompt-lookup speculation vs without (same run)."""
    floor_ms = weight_floor_seconds(lm) * 1000
    rows = []
    for n in tqdm(contexts, desc="bench decode", unit="ctx"):
        ours = decode_ms_per_token(lm, n, tokens, growing=True)
        dyn = decode_ms_per_token(lm, n, tokens, growing=False)
        rows.append({"context_tokens": n, "ms_per_token": ours, "dynamic_cache_ms_per_token": dyn,
                     "floor_ms": floor_ms, "ratio_to_floor": ours / floor_ms,
                     "speedup_vs_dynamic_cache": dyn / ours})
        if speculation:
            plain = generate_ms_per_token(lm, n, tokens, speculation=False)
            spec = generate_ms_per_token(lm, n, tokens, speculation=True)
            rows[-1]["generate"] = {
                "no_speculation_ms_per_token": plain["ms_per_token"], "speculation_ms_per_token": spec["ms_per_token"],
                "speedup": plain["ms_per_token"] / spec["ms_per_token"], "forwards_per_token": spec["forwards_per_token"],
                "no_speculation_forwards_per_token": plain["forwards_per_token"], "drafted": spec["drafted"],
                "accepted": spec["accepted"], "identical_tokens": spec["token_ids"] == plain["token_ids"]}
    return {"model": lm.name, "dtype": str(lm.dtype), "threads": torch.get_num_threads(),
            "floor_ms": floor_ms, "points": rows}


def points_to_dicts(points: list[ContextPoint]) -> list[dict]:
    return [asdict(p) for p in points]


@dataclass
class RestorePoint:
    context_tokens: int
    file_bytes: int
    write_s: float
    restore_s: float  # lookup + read + checks + cache rebuild + next-token logits
    recompute_s: float  # prefill of every token + next-token logits (what a miss costs)
    ratio: float
    max_abs_logit_diff: float
    logits_equal: bool


@torch.inference_mode()
def bench_restore(lm, contexts: list[int], repeats: int = 3, store_dir: str | None = None,
                  atol: float = 1e-4) -> list[RestorePoint]:
    """Restoring an N-token context from the disk tier vs recomputing it (both to next-token logits).

    The file is read right after it was written, so from the page cache: the restore time is the
    store's own cost (parsing, CRC checks, copying into the cache), not the disk's."""
    root = store_dir or tempfile.mkdtemp(prefix="flashback-restore-")
    points = []
    try:
        for n in tqdm(contexts, desc="bench context --restore", unit="ctx"):
            if n > lm.max_positions:
                raise ValueError(f"--context {n} exceeds the model window ({lm.max_positions})")
            ids = filler_ids(lm, n)
            store = DiskKVStore(Path(root) / f"n{n}", max_bytes=1 << 40, min_tokens=1)
            src = CachedContext(lm)
            src.append(ids)
            t0 = time.perf_counter()
            path = store.put(src)
            write_s = time.perf_counter() - t0
            out: dict[str, torch.Tensor] = {}

            def recompute() -> None:
                ctx = CachedContext(lm)
                ctx.append(ids)
                out["recompute"] = ctx.next_token_logits()

            def restore() -> None:
                entry, k = store.longest_prefix(lm, ids)
                ctx = store.load(entry, lm, k, ids)
                out["restore"] = ctx.next_token_logits()

            t_restore = timed(restore, repeats=max(repeats, 3))
            t_full = timed(recompute, repeats=repeats)
            diff = (out["restore"] - out["recompute"]).abs().max().item()
            points.append(RestorePoint(n, path.stat().st_size, write_s, t_restore, t_full, t_full / t_restore,
                                       diff, diff <= atol))
    finally:
        if store_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return points
