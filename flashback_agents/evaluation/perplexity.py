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
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import kvcache
from ..errors import FlashBackError
from ..ralm_layout import RESTATE_TOKENS, check_restate, evidence_ids, placed_ids, query_text, retrieval_points, step_ids
from .common import shared_data_dir


class PerplexityError(ValueError, FlashBackError):
    """A user mistake in the perplexity evaluation (bad data spec, missing files, too-long windows)."""


# ------------------------------------------------------------------------------------- config
@dataclass
class PplConfig:
    """What is evaluated and how (paper defaults: stride 16, query 32 tokens, top-1 and top-2)."""

    tokens: int = 4096          # continuation tokens evaluated (per setting)
    window: int = 1024          # max tokens of text per block ("text so far" is at most this)
    stride: int = 16            # retrieve every N tokens
    query_tokens: int = 32      # query with the last N tokens of the text so far
    top_ks: tuple[int, ...] = (1, 2)
    chunk_tokens: int = 128     # retrieval chunk size (model tokens)
    chunk_overlap: int = 16
    restate: int = RESTATE_TOKENS  # text tokens restated after appended evidence (ralm_layout; 0: the paper's)

    def check(self) -> None:
        for name in ("tokens", "stride", "query_tokens", "chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PerplexityError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.window < 2 * self.stride:
            raise PerplexityError(f"window ({self.window}) must be at least 2 x stride ({2 * self.stride}).")
        if not self.top_ks or any((not isinstance(k, int)) or k < 1 for k in self.top_ks):
            raise PerplexityError(f"top-k values must be integers >= 1, got {self.top_ks!r}.")
        try:
            check_restate(self.restate)
        except ValueError as exc:
            raise PerplexityError(str(exc)) from exc


@dataclass
class AdapterTrainConfig:
    """The quick adapter trained when none is given (on WikiText-2 *valid*, never on test text)."""

    steps: int = 100
    batch_size: int = 2
    max_length: int = 512
    learning_rate: float = 5e-4
    top_k: int = 2
    seed: int = 0


# --------------------------------------------------------------------------------------- data
@dataclass
class EvalData:
    """Evaluated text plus the retrieval corpus it may draw from (disjoint from it)."""

    name: str
    eval_text: str
    corpus_texts: list[tuple[str, str]]  # (source, text) chunked into the retrieval corpus
    note: str = ""


def load_wikitext(data_dir: str | Path | None = None) -> EvalData:
    """WikiText-2 *test* evaluated, retrieval from WikiText-2 *valid*."""
    d = Path(data_dir) if data_dir is not None else shared_data_dir() / "wikitext-2"
    valid, test = d / "valid.txt", d / "test.txt"
    if not valid.is_file() or not test.is_file():
        raise PerplexityError(f"WikiText-2 not found under {d} (needs valid.txt and test.txt).")
    return EvalData("wikitext-2 test (retrieval: valid)", test.read_text(encoding="utf-8"),
                    [("wikitext-2/valid.txt", valid.read_text(encoding="utf-8"))])


def loghub_systems(data_dir: str | Path | None = None) -> list[str]:
    root = Path(data_dir) if data_dir is not None else shared_data_dir() / "loghub"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def load_loghub(system: str, data_dir: str | Path | None = None) -> EvalData:
    """A Loghub 2k log: the first half of its lines is the retrieval corpus, the second half is evaluated."""
    root = Path(data_dir) if data_dir is not None else shared_data_dir() / "loghub"
    systems = loghub_systems(root)
    match = [s for s in systems if s.lower() == system.strip().lower()]
    if not match:
        raise PerplexityError(f"Unknown Loghub system {system!r}; available under {root}: "
                              f"{', '.join(systems) or '(none: directory missing)'}.")
    path = root / match[0] / f"{match[0]}_2k.log"
    if not path.is_file():
        raise PerplexityError(f"Log file not found: {path}")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    half = len(lines) // 2
    return EvalData(f"loghub {match[0]} (second half; retrieval: first half)", "".join(lines[half:]),
                    [(f"{match[0]}_2k.log[:{half}]", "".join(lines[:half]))])


def parse_data(spec: str, data_dir: str | Path | None = None) -> EvalData:
    """``wikitext`` or ``loghub:SYSTEM``."""
    s = (spec or "").strip()
    if s.lower() in ("wikitext", "wikitext-2", "wikitext2"):
        return load_wikitext(Path(data_dir) / "wikitext-2" if data_dir else None)
    if s.lower().startswith("loghub:") and s.split(":", 1)[1].strip():
        return load_loghub(s.split(":", 1)[1], Path(data_dir) / "loghub" if data_dir else None)
    raise PerplexityError(f"Unknown --data {spec!r}: use 'wikitext' or 'loghub:SYSTEM' "
                          f"(systems: {', '.join(loghub_systems()) or 'none found'}).")


def build_retriever(lm: Any, texts: Sequence[tuple[str, str]], cfg: PplConfig) -> Any:
    """BM25 over token-sized chunks of ``texts`` (the same retriever the trainer builds)."""
    from ..training.ralm_corpus import CorpusError, chunk_retriever

    try:
        return chunk_retriever(lm.tokenizer, texts, cfg.chunk_tokens, cfg.chunk_overlap)
    except CorpusError as exc:
        raise PerplexityError(str(exc)) from None


def eval_ids(lm: Any, text: str, n: int) -> list[int]:
    """The first ``n`` token ids of ``text`` (tokenizing only as much text as needed)."""
    chars = max(4096, n * 8)
    while True:
        ids = lm.encode(text[:chars])
        if len(ids) > n or chars >= len(text):  # more than n: the last (maybe cut mid-word) token is dropped
            return ids[:n]
        chars *= 2


def make_blocks(ids: Sequence[int], window: int, stride: int) -> list[list[int]]:
    """Blocks of at most ``window`` ids overlapping by ``stride`` (see module doc)."""
    blocks, start = [], 0
    while start + stride < len(ids):
        blocks.append(list(ids[start:start + window]))
        start += window - stride
    return blocks


def chunk_starts(block: Sequence[int], stride: int) -> list[int]:
    """The retrieval points of a block (:func:`..ralm_layout.retrieval_points`)."""
    return retrieval_points(len(block), stride)


# ------------------------------------------------------------------------------------ scoring
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


# ---------------------------------------------------------------------------------- retrieval
@dataclass
class Retrievals:
    """The documents retrieved for each stride (with the largest top-k), shared by every setting."""

    docs: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    queries: int = 0
    empty: int = 0
    seconds: float = 0.0

    @classmethod
    def run(cls, lm: Any, retriever: Any, blocks: Sequence[Sequence[int]], cfg: PplConfig,
            progress: bool = False) -> "Retrievals":
        from tqdm.auto import tqdm

        out = cls()
        k = max(cfg.top_ks)
        t0 = time.perf_counter()
        total = sum(len(chunk_starts(b, cfg.stride)) for b in blocks)
        with tqdm(total=total, desc="retrieve", unit="query", disable=not progress, leave=False) as bar:
            for b, block in enumerate(blocks):
                for i in chunk_starts(block, cfg.stride):
                    query = query_text(lm, block, i, cfg.query_tokens)
                    docs = [d.text for d in retriever.retrieve(query, k)] if query else []
                    out.docs[(b, i)] = docs
                    out.queries += 1
                    out.empty += int(not docs)
                    bar.update(1)
        out.seconds = time.perf_counter() - t0
        return out

    def prepend_fn(self, lm: Any, k: int) -> EvidenceFn:
        """In-Context RALM: the plain document texts (rank order), each followed by a newline."""
        memo: dict[str, list[int]] = {}

        def fn(b: int, i: int) -> list[int]:
            ids: list[int] = []
            for text in self.docs.get((b, i), [])[:k]:
                if text not in memo:
                    memo[text] = lm.encode(text + "\n")
                ids += memo[text]
            return ids
        return fn

    def append_fn(self, lm: Any, k: int, blocks: Sequence[Sequence[int]] = (), restate: int = 0,
                  markers: bool = True) -> EvidenceFn:
        """FlashBack: what the one RALM layout places at a point (:func:`..ralm_layout.placed_ids`):
        the evidence block, then the last ``restate`` tokens of ``blocks[b]`` before the point.
        ``markers=False``: the documents as plain text (:meth:`prepend_fn`'s) in that position."""
        from ..layout import Layout

        if restate and not blocks:
            raise PerplexityError("append_fn: restating text tokens needs the blocks.")
        if markers:
            layout = Layout(lm)
            evidence: EvidenceFn = lambda b, i: evidence_ids(layout, self.docs.get((b, i), [])[:k])  # noqa: E731
        else:
            evidence = self.prepend_fn(lm, k)
        return lambda b, i: placed_ids(evidence(b, i), blocks[b] if restate else (), i, restate)


# ------------------------------------------------------------------------------ the adapter
def adapter_cache_dir() -> Path:
    from ..models import cache_dir

    return cache_dir() / "ppl-adapters"


def train_ralm_adapter(model_spec: str, cfg: PplConfig, tcfg: AdapterTrainConfig, *,
                       wikitext_dir: str | Path | None = None, out_dir: str | Path | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Train (or reuse, when one with the same settings exists) a quick FlashBack adapter on RALM
    samples from WikiText-2 *valid* in the one RALM layout, retrieving from valid's chunks but never
    from a text's own article. Never touches the test split. Returns where it is and what it did."""
    from ..models import load_model
    from ..training import TrainConfig, ralm_samples, train
    from ..training.ralm_corpus import chunk_retriever, split_articles
    from ..training.samples import RalmSampleConfig

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


# ------------------------------------------------------------------------------ the evaluation
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
    from tqdm.auto import tqdm

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


__all__ = ["AdapterTrainConfig", "EvalData", "PerplexityError", "PplConfig", "Retrievals", "SettingResult",
           "build_retriever", "chunk_starts", "continuation_nll", "eval_ids", "evaluate_perplexity", "format_table",
           "load_loghub", "load_wikitext", "make_blocks", "parse_data", "score_append", "score_prepend",
           "token_nll", "train_ralm_adapter"]
