"""``bench ralm``: FlashBack append vs In-Context RALM prepend decoding speed with retrieval, per context size.

Runs :class:`flashback_agents.ralm.RetrievalLoop` in both patterns on the same text (WikiText-2 test,
BM25 over WikiText-2 valid) and reports tokens/s; the loop itself lives in :mod:`flashback_agents.ralm`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..context import CachedContext
from ..generation import GenerationConfig
from ..ralm import PATTERNS, RalmResult, RetrievalLoop
from ..retrieval.base import RetrievalError
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
    ``quick`` decodes one stride window per size, timed once. A warm-up retrieval and decode run first.
    """
    from tqdm.auto import tqdm

    from ..retrieval.bm25 import BM25Retriever
    from ..retrieval.chunking import ChunkingConfig, chunk_text

    cfg = config or RalmBenchConfig()
    if quick and config is None:
        cfg = RalmBenchConfig(new_tokens=cfg.stride, repeats=1)
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
    gen_cfg = GenerationConfig(max_new_tokens=cfg.new_tokens, stop_at_eos=False)
    warm = base.fork_prefix(min(cfg.sizes))  # first-call costs (allocations, thread pools) are not timed
    RetrievalLoop(warm, retriever, stride=cfg.stride, query_tokens=cfg.query_tokens, top_k=cfg.top_k).generate(
        [], GenerationConfig(max_new_tokens=2, stop_at_eos=False), input_start=0)
    del warm
    rows = []
    bar = tqdm(total=len(cfg.sizes) * 2 * cfg.repeats, desc="bench ralm", unit="run", disable=not progress)
    for size in cfg.sizes:
        row: dict[str, Any] = {"context_tokens": size}
        for pattern in PATTERNS:
            best: RalmResult | None = None
            for _ in range(max(1, cfg.repeats)):
                ctx = base.fork_prefix(size)
                ctx.flush()
                loop = RetrievalLoop(ctx, retriever, stride=cfg.stride, query_tokens=cfg.query_tokens,
                                     top_k=cfg.top_k, pattern=pattern)
                res = loop.generate([], gen_cfg, input_start=0)
                del ctx, loop
                if best is None or res.generate_seconds < best.generate_seconds:
                    best = res
                bar.update(1)
            res = best
            row[f"{pattern}_tokens_per_s"] = res.tokens_per_second
            row[f"{pattern}_seconds"] = res.generate_seconds
            row[f"{pattern}_tokens_computed"] = res.tokens_computed
            row[f"{pattern}_retrievals"] = len(res.retrievals)
            row[f"{pattern}_retrieval_seconds"] = res.retrieval_seconds
        row["append_over_prepend"] = (row["append_tokens_per_s"] / row["prepend_tokens_per_s"]
                                      if row["prepend_tokens_per_s"] else float("inf"))
        rows.append(row)
    bar.close()
    return {"model": getattr(lm, "name", "model"), "quick": quick, "config": asdict(cfg),
            "corpus_chunks": len(chunks), "index_seconds": index_seconds,
            "prefill_seconds": prefill_seconds, "rows": rows,
            "ratios": {str(r["context_tokens"]): r["append_over_prepend"] for r in rows},
            "seconds": time.perf_counter() - t0}
