"""Perplexity evaluation, its adapter: train (or reuse from the cache) the quick FlashBack adapter on
RALM samples from WikiText-2 *valid* for the adapter rows."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..models import cache_dir, load_model
from ..training import TrainConfig, ralm_samples, train
from ..training.ralm_corpus import chunk_retriever, split_articles
from ..training.samples import RalmSampleConfig
from .common import shared_data_dir
from .ppl_config import AdapterTrainConfig, PerplexityError, PplConfig


def adapter_cache_dir() -> Path:
    return cache_dir() / "ppl-adapters"


def train_ralm_adapter(model_spec: str, cfg: PplConfig, tcfg: AdapterTrainConfig, *,
                       wikitext_dir: str | Path | None = None, out_dir: str | Path | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Train (or reuse, when one with the same settings exists) a quick FlashBack adapter on RALM
    samples from WikiText-2 *valid* in the one RALM layout, retrieving from valid's chunks but never
    from a text's own article. Never touches the test split. Returns where it is and what it did."""
    d = Path(wikitext_dir) if wikitext_dir is not None else shared_data_dir() / "wikitext-2"
    valid = d / "valid.txt"
    if not valid.is_file():
        raise PerplexityError(f"Training an adapter needs WikiText-2 valid.txt under {d}; pass --adapter DIR instead.")
    key = hashlib.sha256(json.dumps({"model": model_spec, "t": asdict(tcfg), "stride": cfg.stride,
                                     "q": cfg.query_tokens, "chunk": cfg.chunk_tokens, "restate": cfg.restate,
                                     "v": 2},
                                    sort_keys=True).encode()).hexdigest()[:16]
    out = Path(out_dir) if out_dir is not None else adapter_cache_dir() / key
    info: dict[str, Any] = {"adapter": str(out), "steps": tcfg.steps, "train_config": asdict(tcfg),
                            "data": "wikitext-2 valid (retrieval: valid, never a text's own article)"}
    if (out / "adapter_config.json").is_file() and (out / "flashback_adapter.json").is_file():
        meta = json.loads((out / "flashback_adapter.json").read_text())
        info.update(reused=True, steps=meta.get("step", tcfg.steps), seconds=0.0)
        return info
    shutil.rmtree(out, ignore_errors=True)  # an unfinished earlier run
    t0 = time.perf_counter()
    lm = load_model(model_spec, adapter=None)  # fresh: the trainer wraps it in place
    articles = split_articles(valid.read_text(encoding="utf-8"), "wikitext-2/valid.txt")
    retriever = chunk_retriever(lm.tokenizer, articles, cfg.chunk_tokens, cfg.chunk_overlap)
    need = tcfg.steps * tcfg.batch_size
    rcfg = RalmSampleConfig(stride=cfg.stride, query_tokens=cfg.query_tokens, top_k=tcfg.top_k,
                            window=min(tcfg.max_length, 384), branches=8, seed=tcfg.seed, restate=cfg.restate)
    samples: list = []
    for art in articles:  # only as many texts as the steps need; never retrieving a text's own article
        got, _ = ralm_samples(lm, [art], retriever, rcfg)
        samples += got
        if len(samples) >= need:
            break
    if not samples:
        raise PerplexityError("No RALM training samples could be built from WikiText-2 valid.")
    config = TrainConfig(model=model_spec, output_dir=str(out), steps=tcfg.steps, learning_rate=tcfg.learning_rate,
                         batch_size=tcfg.batch_size, max_length=tcfg.max_length, eval_every=0, eval_fraction=0.0,
                         save_every=0, keep_checkpoints=1, seed=tcfg.seed, progress=progress,
                         warmup_steps=max(1, tcfg.steps // 10))
    result = train(config, samples, eval_samples=[], lm=lm)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the final adapter is all evaluation needs
    loss = result.train_loss
    info.update(reused=False, steps=result.step, samples=len(samples), seconds=time.perf_counter() - t0,
                first_loss=loss[0][1] if loss else None, last_loss=loss[-1][1] if loss else None)
    del lm, result
    return info
