"""Retrieval for the FlashBack loop: a ``Retriever`` protocol, Chroma and BM25 backends, chunking, stores.

Heavy libraries (chromadb, sentence-transformers, bm25s) are imported only when a backend is used:
the backend modules themselves import them inside the functions that need them.
"""

from __future__ import annotations

from .base import Document, RetrievalError, Retriever
from .bm25 import BM25Retriever
from .chroma import ChromaRetriever
from .chunking import Chunk, ChunkingConfig, chunk_text, load_tokenizer, read_text_file
from .store import IndexReport, StoreManifest, index_paths, is_store, open_store

__all__ = [
    "Document", "RetrievalError", "Retriever", "Chunk", "ChunkingConfig", "chunk_text", "load_tokenizer",
    "read_text_file", "IndexReport", "StoreManifest", "index_paths", "is_store", "open_store",
    "BM25Retriever", "ChromaRetriever",
]
