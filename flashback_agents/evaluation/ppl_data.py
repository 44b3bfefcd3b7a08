"""Perplexity evaluation, its data: the evaluated text and the retrieval corpus it draws from
(WikiText-2, Loghub), the BM25 retriever over that corpus, and the cut into blocks and strides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..ralm_layout import retrieval_points
from ..training.ralm_corpus import CorpusError, chunk_retriever
from .common import shared_data_dir
from .ppl_config import PerplexityError, PplConfig


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
