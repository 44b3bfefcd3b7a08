"""Retrieval-augmented perplexity (the FlashBack paper's table, arXiv 2405.04065).

Settings, all scoring *the same* continuation tokens with teacher forcing (only their NLL counts):

- **no retrieval**: ``p(x_j | x_<j)``;
- **prepend** (In-Context RALM, Ram et al. 2023): every ``stride`` tokens the last ``query_tokens``
  tokens query the retriever; the next ``stride`` tokens are scored with the evidence placed
  *before* the text so far, ``[d_1 .. d_k][x_<j]``; the whole window is recomputed per stride;
- **append** (FlashBack): the same evidence, marker-wrapped, placed *after* the text so far,
  ``[x_<i][<MARK_L> d_1 <MARK_R> .. <MARK_L> d_k <MARK_R>][x_i .. x_j-1]``; the text so far stays in
  a KV cache (evidence of earlier strides is not kept: it is cropped off and the stride's text is
  appended without it), so only the evidence and the stride are computed;
- **append + adapter**: the same with the model loaded with a trained FlashBack adapter.

The evaluated text is cut into *blocks* of at most ``window`` tokens (bounded cost on a CPU). A
block's first ``stride`` tokens are context only; block ``b`` starts ``stride`` tokens before the
end of block ``b-1``, so every token after the first ``stride`` is evaluated exactly once. Within a
block, "text so far" is the block up to the current stride; queries use it too. Retrieval is done
once per stride with the largest ``top_k`` and shared by every setting (top-1 is the first hit of
top-2), so the settings differ only in where the evidence goes.

This module runs the settings and builds the table (:func:`evaluate_perplexity`, :func:`format_table`);
its parts live in ``ppl_config`` (settings, error), ``ppl_data`` (text, corpus, blocks), ``ppl_scoring``
(NLL per layout), ``ppl_retrieval`` (shared retrievals, evidence) and ``ppl_adapter`` (the quick
adapter). Every name is re-exported here.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from .ppl_adapter import adapter_cache_dir, train_ralm_adapter
from .ppl_config import AdapterTrainConfig, PerplexityError, PplConfig
from .ppl_data import (EvalData, build_retriever, chunk_starts, eval_ids, load_loghub, load_wikitext, loghub_systems,
                       make_blocks, parse_data)
from .ppl_retrieval import Retrievals
from .ppl_scoring import EvidenceFn, SettingResult, continuation_nll, score_append, score_prepend, token_nll


#: short names of the settings (``--settings``): a re-measurement of one claim runs only the rows it compares
SETTINGS = {"none": "no retrieval", "none+adapter": "no retrieval + adapter", "prepend": "prepend (In-Context RALM)",
            "prepend+adapter": "prepend + adapter", "append-plain": "append, no markers",
            "append": "append, no adapter", "append+adapter-paper": "append + adapter, no restated tokens",
            "flashback": "append + adapter (FlashBack)"}


def check_settings(names: Sequence[str] | None) -> set[str] | None:
    """Short setting names (:data:`SETTINGS`) as the rows' names; None: every setting."""
    if names is None:
        return None
    bad = [n for n in names if n not in SETTINGS]
    if bad or not names:
        raise PerplexityError(f"Unknown setting(s) {bad}; use some of {', '.join(SETTINGS)}.")
    return {SETTINGS[n] for n in names}


def evaluate_perplexity(lm: Any, data: EvalData, cfg: PplConfig, *, adapter_lm: Any = None,
                        retriever: Any = None, progress: bool = True, plain_append: bool = True,
                        settings: Sequence[str] | None = None) -> dict[str, Any]:
    """The table: no retrieval, prepend, append without markers (``plain_append``: the evidence as
    plain text, what an un-adapted model may get instead of markers), append with markers, and with
    ``adapter_lm`` the adapter's rows (no retrieval, prepend, append), each at every top-k, on the same
    evaluated tokens. ``settings``: only these rows (short names, :data:`SETTINGS`). Returns a
    JSON-able dict (``rows``)."""
    only = check_settings(settings)
    cfg.check()
    t_start = time.perf_counter()
    ids = eval_ids(lm, data.eval_text, cfg.tokens + cfg.stride)
    if len(ids) <= cfg.stride:
        raise PerplexityError(f"The evaluated text gave only {len(ids)} tokens.")
    blocks = make_blocks(ids, cfg.window, cfg.stride)
    n_chunks = sum(len(chunk_starts(b, cfg.stride)) for b in blocks)
    longest = cfg.window + max(cfg.top_ks) * (cfg.chunk_tokens + 8) + cfg.restate
    if longest > lm.max_positions:
        raise PerplexityError(f"window + evidence can reach {longest} tokens but {lm.name} has {lm.max_positions} "
                              "positions: lower --window or --top-k.")
    if adapter_lm is not None and tuple(adapter_lm.marker_ids) != tuple(lm.marker_ids):
        raise PerplexityError(f"The adapter's marker ids {adapter_lm.marker_ids} differ from the base model's "
                              f"{lm.marker_ids}: it was trained for another base model.")
    t0 = time.perf_counter()
    if retriever is None:
        retriever = build_retriever(lm, data.corpus_texts, cfg)
    index_seconds = time.perf_counter() - t0
    ret = Retrievals.run(lm, retriever, blocks, cfg, progress)

    rs = cfg.restate
    jobs: list[tuple[str, int, Callable[[SettingResult, Any], SettingResult]]] = [
        ("no retrieval", 0, lambda r, bar: score_append(lm, blocks, cfg.stride, None, r, bar))]
    if adapter_lm is not None:
        jobs.append(("no retrieval + adapter", 0, lambda r, bar: score_append(adapter_lm, blocks, cfg.stride, None, r, bar)))
    for k in cfg.top_ks:
        jobs.append(("prepend (In-Context RALM)", k,
                     lambda r, bar, k=k: score_prepend(lm, blocks, cfg.stride, ret.prepend_fn(lm, k), r, bar)))
        if adapter_lm is not None:
            jobs.append(("prepend + adapter", k, lambda r, bar, k=k: score_prepend(
                adapter_lm, blocks, cfg.stride, ret.prepend_fn(adapter_lm, k), r, bar)))
        if plain_append:
            jobs.append(("append, no markers", k, lambda r, bar, k=k: score_append(
                lm, blocks, cfg.stride, ret.append_fn(lm, k, blocks, rs, markers=False), r, bar)))
        jobs.append(("append, no adapter", k,
                     lambda r, bar, k=k: score_append(lm, blocks, cfg.stride, ret.append_fn(lm, k, blocks, rs), r, bar)))
        if adapter_lm is not None:
            if rs:  # the paper's exact layout beside ours: what restating the text tail buys
                jobs.append(("append + adapter, no restated tokens", k, lambda r, bar, k=k: score_append(
                    adapter_lm, blocks, cfg.stride, ret.append_fn(adapter_lm, k), r, bar)))
            jobs.append(("append + adapter (FlashBack)", k,
                         lambda r, bar, k=k: score_append(adapter_lm, blocks, cfg.stride,
                                                          ret.append_fn(adapter_lm, k, blocks, rs), r, bar)))
    if only is not None:
        jobs = [j for j in jobs if j[0] in only]
        if not jobs:
            raise PerplexityError("None of the chosen settings applies here (adapter rows need an adapter).")
    results: list[SettingResult] = []
    with tqdm(total=n_chunks * len(jobs), desc="ppl", unit="stride", disable=not progress) as bar:
        for name, k, job in jobs:
            bar.set_postfix_str(f"{name} k={k}" if k else name)
            results.append(job(SettingResult(name, k), bar))
    counts = {r.tokens for r in results}
    assert len(counts) == 1, f"settings evaluated different token counts: {counts}"

    order: list[str] = []
    for r in results:
        if r.setting not in order:
            order.append(r.setting)
    rows = []
    by = {(r.setting, r.top_k): r.ppl for r in results}
    for name in order:
        mine = [r for r in results if r.setting == name]
        row: dict[str, Any] = {"setting": name, "tokens": mine[0].tokens}
        for r in mine:
            for k in (cfg.top_ks if r.top_k == 0 else [r.top_k]):  # no retrieval: same value in every column
                row[f"ppl_top{k}"] = r.ppl
            row[f"seconds_top{r.top_k}" if r.top_k else "seconds"] = r.seconds
            row[f"tokens_computed_top{r.top_k}" if r.top_k else "tokens_computed"] = r.tokens_computed
        rows.append(row)
    return {"model": getattr(lm, "name", "model"), "adapter": getattr(adapter_lm, "adapter", None),
            "data": data.name, "config": asdict(cfg), "tokens_evaluated": results[0].tokens,
            "blocks": len(blocks), "strides": n_chunks, "retrievals": ret.queries, "empty_retrievals": ret.empty,
            "index_seconds": index_seconds, "retrieval_seconds": ret.seconds, "rows": rows,
            "ratios": _ratios(by, cfg.top_ks),
            "results": [r.as_dict() for r in results], "seconds": time.perf_counter() - t_start}


def _ratios(by: dict[tuple[str, int], float], ks: Sequence[int]) -> dict[str, float]:
    """The claims, as ratios of perplexities: does evidence help (vs no retrieval), and is append +
    adapter as good as prepend (the paper: close to or better)."""
    out: dict[str, float] = {}
    pairs = [("prepend / no retrieval", "prepend (In-Context RALM)", "no retrieval"),
             ("append + adapter / no retrieval + adapter", "append + adapter (FlashBack)", "no retrieval + adapter"),
             ("append + adapter / prepend", "append + adapter (FlashBack)", "prepend (In-Context RALM)"),
             ("prepend + adapter / no retrieval + adapter", "prepend + adapter", "no retrieval + adapter"),
             ("append, no markers / no retrieval", "append, no markers", "no retrieval"),
             ("append, no adapter / no retrieval", "append, no adapter", "no retrieval")]
    for k in ks:
        for name, num, den in pairs:
            a = by.get((num, k))
            b = by.get((den, k), by.get((den, 0)))
            if a is not None and b:
                out[f"{name} (top-{k})"] = a / b
    return out


def format_table(data: dict[str, Any]) -> str:
    """Rows: setting; columns: perplexity at each top-k, tokens evaluated."""
    ks = data["config"]["top_ks"]
    head = f"{'setting':<30}" + "".join(f"{'top-' + str(k):>10}" for k in ks) + f"{'tokens':>8}"
    lines = [head, "-" * len(head)]
    for row in data["rows"]:
        cells = "".join(f"{row.get(f'ppl_top{k}', float('nan')):>10.3f}" for k in ks)
        lines.append(f"{row['setting']:<30}{cells}{row['tokens']:>8}")
    for name, value in data.get("ratios", {}).items():
        lines.append(f"  {name}: {value:.3f}")
    return "\n".join(lines)


__all__ = ["AdapterTrainConfig", "EvalData", "EvidenceFn", "PerplexityError", "PplConfig", "Retrievals",
           "SettingResult", "adapter_cache_dir", "build_retriever", "chunk_starts", "continuation_nll", "eval_ids",
           "evaluate_perplexity", "format_table", "load_loghub", "load_wikitext", "loghub_systems", "make_blocks",
           "parse_data", "score_append", "score_prepend", "token_nll", "train_ralm_adapter"]
