"""``bench ralm``: FlashBack append vs In-Context RALM prepend decoding speed with retrieval, per context size.

Runs :class:`flashback_agents.ralm.RetrievalLoop` in both patterns on the same text (WikiText-2 test,
BM25 over WikiText-2 valid) and reports tokens/s and model forwards per generated token (decoding
plus evidence placement; prompt-lookup speculation inside the loop, on by default, lowers it: drafts
copied from the context, the evidence included); the loop itself lives in :mod:`flashback_agents.ralm`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..context import CachedContext
from ..generation import GenerationConfig
from ..ralm import PATTERNS, RalmResult, RetrievalLoop
from ..retrieval.base import RetrievalError
from ..retrieval.bm25 import BM25Retriever
from ..retrieval.chunking import ChunkingConfig, chunk_text
from .common import shared_data_dir

__all__ = ["RalmBenchConfig", "default_wikitext_dir", "run_ralm_bench"]


@dataclass
class RalmBenchConfig:
    """Append vs prepend decoding speed with retrieval every ``stride`` tokens, per context size."""

    sizes: tuple[int, ...] = (512, 1024, 2048)
    new_tokens: int = 64
    stride: int = 16
    query_tokens: int = 32
    top_k: int = 2
    chunk_tokens: int = 128
    overlap: int = 16
    repeats: int = 2  # each pattern/size is timed this many times; the fastest counts (less noise)
    speculate: bool = True  # prompt-lookup speculation inside the loop (exact: the same tokens)
    compare_no_speculation: bool = False  # also run both patterns without it (rows ``*_no_spec_*``)


def default_wikitext_dir() -> Path:
    """``../shared/data/wikitext-2`` next to the repository (where the project keeps its data)."""
    return shared_data_dir() / "wikitext-2"


def run_ralm_bench(lm: Any, *, quick: bool = False, config: RalmBenchConfig | None = None,
                   data_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Tokens/s of the append (FlashBack) and prepend (In-Context RALM) loops, same text, same run.

    Retrieval corpus: BM25 over WikiText-2 *valid*; inputs: the start of WikiText-2 *test*. Each
    context size is prefilled once (shared by both patterns via ``fork_prefix``, not timed); the timed
    part is decoding ``new_tokens`` greedy tokens with a retrieval every ``stride`` tokens, the first
    at step 0, so every stride window pays for one retrieval (the steady state of a long generation).
    EOS is masked (``min_new_tokens``), so every run decodes exactly ``new_tokens`` tokens.
    ``quick`` decodes one stride window per size, timed once. A warm-up retrieval and decode run first.

    Per pattern a row has tokens/s, tokens computed, retrievals, ``forwards_per_token`` (every model
    forward after the context's prefill: decoding plus placing the evidence, ``prefill_chunk`` tokens a
    forward) and the drafts verified / kept; ``compare_no_speculation`` adds the same without
    speculation and whether the tokens are identical.
    """
    cfg = config or RalmBenchConfig()
    if quick:
        cfg = replace(cfg, new_tokens=cfg.stride, repeats=1)
    data = Path(data_dir) if data_dir is not None else default_wikitext_dir()
    valid, test = data / "valid.txt", data / "test.txt"
    if not valid.is_file() or not test.is_file():
        raise RetrievalError(f"WikiText-2 not found under {data} (needs valid.txt and test.txt).")
    t0 = time.perf_counter()
    chunks = chunk_text(valid.read_text(encoding="utf-8"), "wikitext-2/valid.txt", lm.tokenizer,
                        ChunkingConfig(cfg.chunk_tokens, cfg.overlap))
    retriever = BM25Retriever.from_texts([c.text for c in chunks], [c.id for c in chunks],
                                         [c.full_metadata() for c in chunks])
    index_seconds = time.perf_counter() - t0
    biggest = max(cfg.sizes)
    text = test.read_text(encoding="utf-8")[: biggest * 8]
    ids = lm.encode(text)[:biggest]
    if len(ids) < biggest:
        raise RetrievalError(f"test.txt gave only {len(ids)} tokens; need {biggest}.")
    base = CachedContext(lm)
    t1 = time.perf_counter()
    base.append(ids)
    prefill_seconds = time.perf_counter() - t1
    def gen_cfg(n: int, speculate: bool) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=n, min_new_tokens=n, speculate=speculate)

    warm = base.fork_prefix(min(cfg.sizes))  # first-call costs (allocations, thread pools) are not timed
    RetrievalLoop(warm, retriever, stride=cfg.stride, query_tokens=cfg.query_tokens, top_k=cfg.top_k).generate(
        [], gen_cfg(2, cfg.speculate), input_start=0)
    del warm
    modes = [("", cfg.speculate)] + ([("no_spec_", False)] if cfg.compare_no_speculation and cfg.speculate else [])
    rows = []
    bar = tqdm(total=len(cfg.sizes) * 2 * len(modes) * max(1, cfg.repeats), desc="bench ralm", unit="run",
               disable=not progress)
    for size in cfg.sizes:
        row: dict[str, Any] = {"context_tokens": size}
        for tag, speculate in modes:
            for pattern in PATTERNS:
                best: RalmResult | None = None
                for _ in range(max(1, cfg.repeats)):
                    ctx = base.fork_prefix(size)
                    ctx.flush()
                    loop = RetrievalLoop(ctx, retriever, stride=cfg.stride, query_tokens=cfg.query_tokens,
                                         top_k=cfg.top_k, pattern=pattern)
                    res = loop.generate([], gen_cfg(cfg.new_tokens, speculate), input_start=0)
                    del ctx, loop
                    if best is None or res.generate_seconds < best.generate_seconds:
                        best = res
                    bar.update(1)
                res = best
                key = f"{pattern}_{tag}"
                row[f"{key}tokens_per_s"] = res.tokens_per_second
                row[f"{key}seconds"] = res.generate_seconds
                row[f"{key}tokens_computed"] = res.tokens_computed
                row[f"{key}retrievals"] = len(res.retrievals)
                row[f"{key}retrieval_seconds"] = res.retrieval_seconds
                row[f"{key}forwards"] = res.forwards
                row[f"{key}placement_forwards"] = res.placement_forwards
                row[f"{key}forwards_per_token"] = res.forwards_per_token
                row[f"{key}drafted"] = res.drafted
                row[f"{key}accepted"] = res.accepted
                row[f"{key}token_ids"] = res.token_ids
            row[f"append_over_prepend{'_' + tag.rstrip('_') if tag else ''}"] = (
                row[f"append_{tag}tokens_per_s"] / row[f"prepend_{tag}tokens_per_s"]
                if row[f"prepend_{tag}tokens_per_s"] else float("inf"))
        for pattern in PATTERNS:  # the ids are only compared, not reported
            ids = row.pop(f"{pattern}_token_ids")
            other = row.pop(f"{pattern}_no_spec_token_ids", None)
            if other is not None:
                row[f"{pattern}_identical_tokens"] = ids == other
        rows.append(row)
    bar.close()
    return {"model": getattr(lm, "name", "model"), "quick": quick, "config": asdict(cfg),
            "corpus_chunks": len(chunks), "index_seconds": index_seconds,
            "prefill_seconds": prefill_seconds, "rows": rows,
            "ratios": {str(r["context_tokens"]): r["append_over_prepend"] for r in rows},
            "seconds": time.perf_counter() - t0}
