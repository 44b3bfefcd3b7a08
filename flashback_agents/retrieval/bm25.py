"""BM25 retrieval on ``bm25s``: lexical, fast, no model; persisted as a bm25s index + chunks.jsonl.

bm25s has no incremental update, so any change rebuilds the index from the stored chunks (cheap:
a few hundred ms for thousands of chunks) and saves it atomically (a new directory swapped in).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from .base import Document, RetrievalError
from .chunking import Chunk

_DIR = "bm25"
_CHUNKS = "chunks.jsonl"


def _tokenize(texts: list[str], stopwords: str | None) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords=stopwords, return_ids=False, show_progress=False)


class BM25Retriever:
    """BM25 over chunks. ``BM25Retriever(path)`` opens (or will create) a persisted index;
    ``BM25Retriever.from_texts(texts)`` builds one in memory."""

    kind = "bm25"

    def __init__(self, path: str | os.PathLike | None = None, *, stopwords: str | None = "en"):
        self.path = Path(path) if path is not None else None
        self.stopwords = stopwords
        self._docs: list[dict[str, Any]] = []  # {"id", "text", "metadata"}, aligned with the index
        self._pos: dict[str, int] = {}
        self._index: Any = None
        self._dirty = False
        if self.path is not None:
            self._load()

    # ----------------------------------------------------------------------------- building
    @classmethod
    def from_texts(cls, texts: Sequence[str], ids: Sequence[str] | None = None,
                   metadatas: Sequence[dict] | None = None, *, stopwords: str | None = "en") -> "BM25Retriever":
        """An in-memory index over ``texts`` (ids default to their positions)."""
        r = cls(None, stopwords=stopwords)
        ids = list(ids) if ids is not None else [str(i) for i in range(len(texts))]
        metas = list(metadatas) if metadatas is not None else [{} for _ in texts]
        r._docs = [{"id": i, "text": t, "metadata": dict(m)} for i, t, m in zip(ids, texts, metas)]
        r._reindex()
        r._build()
        return r

    def _reindex(self) -> None:
        self._pos = {d["id"]: i for i, d in enumerate(self._docs)}

    def _build(self) -> None:
        if not self._docs:
            self._index = None
            return
        import bm25s

        index = bm25s.BM25()
        index.index(_tokenize([d["text"] for d in self._docs], self.stopwords), show_progress=False)
        self._index = index

    # ----------------------------------------------------------------------- index protocol
    def ids_by_source(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for d in self._docs:
            out.setdefault(str(d["metadata"].get("source", "")), set()).add(d["id"])
        return out

    def add_chunks(self, chunks: Iterable[Chunk], progress: bool = False) -> int:
        n = 0
        for c in chunks:
            doc = {"id": c.id, "text": c.text, "metadata": c.full_metadata()}
            if c.id in self._pos:
                self._docs[self._pos[c.id]] = doc
            else:
                self._pos[c.id] = len(self._docs)
                self._docs.append(doc)
            n += 1
        self._dirty = self._dirty or n > 0
        return n

    def delete(self, ids: Iterable[str]) -> int:
        drop = set(ids) & set(self._pos)
        if drop:
            self._docs = [d for d in self._docs if d["id"] not in drop]
            self._reindex()
            self._dirty = True
        return len(drop)

    def count(self) -> int:
        return len(self._docs)

    def commit(self) -> None:
        """Rebuild the index after adds/deletes and save it (atomically) when persisted."""
        if not self._dirty and (self._index is not None or not self._docs):
            return
        self._build()
        if self.path is not None:
            self._save()
        self._dirty = False

    # ---------------------------------------------------------------------------- persistence
    def _save(self) -> None:
        assert self.path is not None
        self.path.mkdir(parents=True, exist_ok=True)
        final = self.path / _DIR
        tmp = self.path / f".{_DIR}.tmp{os.getpid()}"
        old = self.path / f".{_DIR}.old{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / _CHUNKS, "w", encoding="utf-8") as f:
            for d in self._docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        if self._index is not None:
            self._index.save(str(tmp / "index"), show_progress=False)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _load(self) -> None:
        assert self.path is not None
        final = self.path / _DIR
        if not (final / _CHUNKS).is_file():
            return  # a new store: nothing indexed yet
        self._docs = _read_chunks(final / _CHUNKS, self.path)
        self._reindex()
        if self._docs:
            import bm25s

            try:  # numpy arrays and JSON only (allow_pickle=False): no code from the store
                index = bm25s.BM25.load(str(final / "index"), show_progress=False, allow_pickle=False)
                if int(index.scores.get("num_docs", -1)) != len(self._docs):
                    raise ValueError("the index and the chunks disagree")
                self._index = index
            except Exception:  # noqa: BLE001 - an unreadable or stale index is rebuilt from the chunks
                self._build()

    # ------------------------------------------------------------------------------- querying
    def retrieve(self, query: str, k: int = 4) -> list[Document]:
        """Top ``k`` chunks by BM25 score (chunks sharing no term with the query are left out)."""
        if not isinstance(query, str):
            raise RetrievalError(f"The query must be a string, got {type(query).__name__}.")
        if not isinstance(k, int) or k < 0:
            raise RetrievalError(f"k must be a non-negative integer, got {k!r}.")
        if self._dirty:
            self.commit()
        if not self._docs:
            where = f" at {self.path}" if self.path else ""
            raise RetrievalError(f"The BM25 store{where} is empty: index some files first (`flashback-agents index`).")
        if k == 0 or not query.strip():
            return []
        tokens = _tokenize([query], self.stopwords)
        if not tokens or not tokens[0]:
            return []
        k = min(k, len(self._docs))
        res = self._index.retrieve(tokens, k=k, show_progress=False)
        out = []
        for idx, score in zip(res.documents[0], res.scores[0]):
            if float(score) <= 0:
                continue
            d = self._docs[int(idx)]
            out.append(Document(text=d["text"], id=d["id"], score=float(score), metadata=dict(d["metadata"])))
        return out

    def get(self, doc_id: str) -> Document | None:
        i = self._pos.get(doc_id)
        if i is None:
            return None
        d = self._docs[i]
        return Document(text=d["text"], id=d["id"], metadata=dict(d["metadata"]))

    def __repr__(self) -> str:
        return f"BM25Retriever(path={str(self.path) if self.path else None!r}, chunks={len(self._docs)})"


def _read_chunks(path: Path, store: Path) -> list[dict[str, Any]]:
    """The chunks of a BM25 store, each checked: a corrupt file is a :class:`RetrievalError` naming the line."""
    docs: list[dict[str, Any]] = []
    redo = f"re-create the store with `flashback-agents index PATH... --store {store}`"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RetrievalError(f"Cannot read {path} ({exc}); {redo}.") from exc
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise RetrievalError(f"{path}:{lineno} is not a JSON line ({type(exc).__name__}); {redo}.") from exc
        if not (isinstance(d, dict) and isinstance(d.get("id"), str) and isinstance(d.get("text"), str)
                and isinstance(d.get("metadata", {}), dict)):
            raise RetrievalError(f"{path}:{lineno} is not a chunk (an object with str 'id' and 'text' and a "
                                 f"'metadata' object); {redo}.")
        try:
            d["text"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RetrievalError(f"{path}:{lineno} holds text that is not valid Unicode; {redo}.") from exc
        d.setdefault("metadata", {})
        docs.append(d)
    return docs
