"""RALM training corpora: texts as ``(source, text)`` articles, and a retriever over their chunks.

A training text must never retrieve its own article (the paper's forbidden titles): otherwise the
adapter learns to copy its own future instead of reading evidence. Every text therefore carries a
source name, and the chunks it may retrieve carry theirs (``metadata["source"]``). WikiText-style
files are split into articles at their `` = Title = `` lines; any other file is one article named
by its path. A ``.jsonl`` line may name its ``source`` and mark itself ``"store": true``: retrieved
from, never trained on (a log's first half as the datastore for excerpts of its second half, as
``eval ppl --data loghub:SYSTEM`` scores it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import FlashBackError
from ..retrieval.bm25 import BM25Retriever
from ..retrieval.chunking import ChunkingConfig, chunk_text

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".log", ".text", ".py", ".json"}
_TITLE = re.compile(r"^ ?= ([^=].*?) = ?$")


class CorpusError(ValueError, FlashBackError):
    """A RALM corpus that cannot be read (missing path, bad JSONL line); the message says where."""


def split_articles(text: str, source: str) -> list[tuple[str, str]]:
    """``(title, article)`` pairs for a WikiText-style text (`` = Title = `` starts an article;
    `` = = Section = = `` does not); any other text is one article named ``source``."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines(keepends=True):
        m = _TITLE.match(line.rstrip("\n"))
        if m:
            out.append((f"{source}#{m.group(1).strip()}", []))
        elif not out:
            out.append((source, []))
        out[-1][1].append(line)
    arts = [(name, "".join(lines)) for name, lines in out]
    return [(name, body) for name, body in arts if body.strip()]


@dataclass
class RalmCorpus:
    """Articles to train on (``texts``) and articles only retrieved from (``store``), as
    ``(source, text)`` pairs; the retriever covers both."""

    texts: list[tuple[str, str]] = field(default_factory=list)
    store: list[tuple[str, str]] = field(default_factory=list)

    @property
    def articles(self) -> list[tuple[str, str]]:
        return self.texts + self.store


def _files(p: Path) -> list[Path]:
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and (f.suffix.lower() in TEXT_SUFFIXES | {".jsonl"}))
    if p.is_file():
        return [p]
    raise CorpusError(f"RALM corpus not found: {p}")


def _read_jsonl(f: Path, corpus: RalmCorpus) -> None:
    for lineno, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{f}:{lineno}: invalid JSON ({exc.msg})") from None
        text = value.get("text") if isinstance(value, dict) else value
        if not isinstance(text, str):
            raise CorpusError(f"{f}:{lineno}: expected a string or an object with a 'text' string")
        meta = value if isinstance(value, dict) else {}
        source = meta.get("source") or f"{f}:{lineno}"
        if not isinstance(source, str):
            raise CorpusError(f"{f}:{lineno}: 'source' must be a string")
        if text.strip():
            (corpus.store if meta.get("store") is True else corpus.texts).append((source, text))


def read_ralm_corpus(paths: str | Path | Sequence[str | Path]) -> RalmCorpus:
    """The training texts and retrieval-only store of one or more corpus paths: text files (WikiText
    articles split at their titles), ``.jsonl`` files (``{"text": ..., "source": ..., "store": bool}``
    or a string per line, one article each) or directories of such files (recursively, sorted)."""
    corpus = RalmCorpus()
    for path in ([paths] if isinstance(paths, (str, Path)) else list(paths)):
        for f in _files(Path(path)):
            if f.suffix.lower() == ".jsonl":
                _read_jsonl(f, corpus)
            else:
                corpus.texts += split_articles(f.read_text(encoding="utf-8", errors="replace"), str(f))
    return corpus


def read_corpus(path: str | Path) -> list[tuple[str, str]]:
    """Every article (training texts and store) of a corpus path; see :func:`read_ralm_corpus`."""
    return read_ralm_corpus(path).articles


def chunk_retriever(tokenizer: Any, articles: Sequence[tuple[str, str]], chunk_tokens: int = 128,
                    overlap: int = 16) -> Any:
    """An in-memory BM25 retriever over ``chunk_tokens``-token chunks; each chunk's metadata
    ``source`` is its article's name (what :func:`..samples.ralm_samples` excludes)."""
    chunks = []
    for source, text in articles:
        chunks += chunk_text(text, source, tokenizer, ChunkingConfig(chunk_tokens, overlap))
    if not chunks:
        raise CorpusError("The retrieval corpus is empty.")
    return BM25Retriever.from_texts([c.text for c in chunks], [c.id for c in chunks],
                                    [c.full_metadata() for c in chunks])


__all__ = ["CorpusError", "RalmCorpus", "chunk_retriever", "read_corpus", "read_ralm_corpus", "split_articles"]
