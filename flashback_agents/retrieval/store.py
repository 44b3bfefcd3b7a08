"""A store directory: a manifest saying which retriever built it, plus that retriever's files.

``index_paths`` keeps a store in step with files on disk: unchanged chunks keep their ids (nothing
is re-embedded), a changed file's stale chunks are removed, a deleted file's chunks are removed.
All files are read and chunked before anything is written, so a bad file leaves the store as it was.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from .base import RetrievalError
from .bm25 import BM25Retriever
from .chroma import DEFAULT_COLLECTION, ChromaRetriever
from .chunking import Chunk, ChunkingConfig, chunk_text, load_tokenizer, read_text_file, tokenizer_name

MANIFEST = "flashback-store.json"
_FORMAT = "flashback-store-v1"
RETRIEVERS = ("chroma", "bm25")


@dataclass
class StoreManifest:
    """What built a store: the retriever kind and its settings (read back by :func:`open_store`)."""

    retriever: str
    chunk_tokens: int
    overlap: int
    tokenizer: str = "default"
    embedding_model: str | None = None
    collection: str | None = None
    host: str | None = None
    port: int | None = None
    format: str = _FORMAT
    updated: float = field(default_factory=time.time)

    @classmethod
    def read(cls, path: Path) -> "StoreManifest":
        redo = f"re-create the store with `flashback-agents index PATH... --store {path}`"
        try:
            data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise RetrievalError(f"{path / MANIFEST} is unreadable ({type(exc).__name__}); {redo}.") from exc
        if not isinstance(data, dict):
            raise RetrievalError(f"{path / MANIFEST} is a JSON {type(data).__name__}, not an object; {redo}.")
        if data.get("format") != _FORMAT:
            raise RetrievalError(f"{path} is not a flashback-agents store (format {data.get('format')!r}); {redo}.")
        types = {"retriever": (str,), "chunk_tokens": (int,), "overlap": (int,), "tokenizer": (str,),
                 "embedding_model": (str, type(None)), "collection": (str, type(None)), "host": (str, type(None)),
                 "port": (int, type(None)), "updated": (int, float)}
        for key in ("retriever", "chunk_tokens", "overlap"):
            if key not in data:
                raise RetrievalError(f"{path / MANIFEST} has no {key!r}; {redo}.")
        for key, allowed in types.items():
            if key in data and (isinstance(data[key], bool) or not isinstance(data[key], allowed)):
                raise RetrievalError(f"{path / MANIFEST}: {key!r} is {data[key]!r:.60}, of the wrong type; {redo}.")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def write(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        os.replace(tmp, path / MANIFEST)


@dataclass
class IndexReport:
    """What one ``index_paths`` call did."""

    store: str
    retriever: str
    files: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    chunks_unchanged: int = 0
    chunks_total: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: reason" for files left out of a directory walk
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_store(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _make(path: Path, m: StoreManifest, embedding_model: str | None = None) -> Any:
    if m.retriever == "bm25":
        return BM25Retriever(path)
    if m.retriever == "chroma":
        return ChromaRetriever(path / "chroma" if not m.host else None, host=m.host, port=m.port or 8000,
                               collection=m.collection or DEFAULT_COLLECTION,
                               embedding_model=embedding_model or m.embedding_model)
    raise RetrievalError(f"{path} was built by an unknown retriever {m.retriever!r}; expected one of {RETRIEVERS}.")


def open_store(path: str | os.PathLike, *, embedding_model: str | None = None) -> Any:
    """Open an existing store with the retriever that built it (ChromaRetriever or BM25Retriever)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RetrievalError(f"No store at {path}: create one with `flashback-agents index PATH... --store {path}`.")
    if not is_store(path):
        raise RetrievalError(f"{path} is not a flashback-agents store (no {MANIFEST}); "
                             f"create one with `flashback-agents index PATH... --store {path}`.")
    m = StoreManifest.read(path)
    r = _make(path, m, embedding_model)
    r.manifest = m
    return r


def _walk(root: Path, store: Path) -> list[Path]:
    """Regular files under ``root``, skipping hidden entries and the store itself."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (d / n).resolve() != store)
        out += [d / n for n in sorted(filenames) if not n.startswith(".")]
    return out


def index_paths(paths: Sequence[str | os.PathLike], store: str | os.PathLike, retriever: str | None = None, *,
                chunk_tokens: int | None = None, overlap: int | None = None, tokenizer: Any = None,
                embedding_model: str | None = None, host: str | None = None, port: int | None = None,
                progress: bool = True) -> IndexReport:
    """Index files and directories into ``store`` (created if needed; ``retriever`` defaults to chroma).

    Re-indexing is idempotent: chunk ids come from source + content, unchanged chunks are kept,
    stale chunks of changed or deleted sources are removed. A named file that cannot be read as
    UTF-8 text is an error (nothing written); such files met in a directory walk are skipped.
    """
    t0 = time.perf_counter()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise RetrievalError("Nothing to index: pass at least one file or directory.")
    store_path = Path(store).expanduser().resolve()
    if store_path.exists() and not store_path.is_dir():
        raise RetrievalError(f"The store path {store_path} is a file; pass a directory.")
    if retriever is not None and retriever not in RETRIEVERS:
        raise RetrievalError(f"Unknown retriever {retriever!r}; expected one of {RETRIEVERS}.")
    existing = StoreManifest.read(store_path) if is_store(store_path) else None
    if existing is None and store_path.is_dir() and any(store_path.iterdir()):
        raise RetrievalError(f"{store_path} is a non-empty directory that is not a flashback-agents store; "
                             "pick a new or empty directory for --store.")
    if existing is not None and retriever is not None and retriever != existing.retriever:
        raise RetrievalError(f"The store {store_path} was built with the {existing.retriever} retriever; "
                             f"re-index with --retriever {existing.retriever} or use another --store.")
    kind = existing.retriever if existing else (retriever or "chroma")
    cfg = ChunkingConfig(chunk_tokens=chunk_tokens if chunk_tokens is not None else
                         (existing.chunk_tokens if existing else ChunkingConfig.chunk_tokens),
                         overlap=overlap if overlap is not None else
                         (existing.overlap if existing else ChunkingConfig.overlap))
    cfg.validate()
    tok_spec = tokenizer if tokenizer is not None else (existing.tokenizer if existing and existing.tokenizer != "default" else None)

    # 1. Resolve paths: files to (re)index, and roots whose vanished files must be dropped.
    files: list[Path] = []
    explicit: set[Path] = set()
    scopes: list[Path] = []  # deleted-source detection: directories walked, files named but gone
    for p in paths:
        p = Path(p).expanduser().resolve()
        if p.is_dir():
            files += _walk(p, store_path)
            scopes.append(p)
        elif p.is_file():
            files.append(p)
            explicit.add(p)
        elif existing is not None:
            scopes.append(p)  # maybe a source that was deleted: its chunks go
        else:
            raise RetrievalError(f"No such file or directory: {p}; pass existing files or directories to index.")
    # 2. Read and chunk everything before writing anything.
    tok = load_tokenizer(tok_spec)
    report = IndexReport(store=str(store_path), retriever=kind)
    planned: dict[str, list[Chunk]] = {}
    for f in tqdm(files, desc="Chunking", unit="file", disable=not progress or len(files) < 2):
        try:
            text = read_text_file(f)
        except RetrievalError as exc:
            if f in explicit:
                raise
            report.skipped.append(f"{f}: {exc}")
            continue
        planned[str(f)] = chunk_text(text, str(f), tok, cfg)
    # 3. Diff against the store (a new store is only created once there is something to put in it).
    def nothing() -> RetrievalError:
        return RetrievalError("Nothing to index: the given paths contain no text"
                              + (f" (skipped: {'; '.join(report.skipped[:3])})" if report.skipped else "") + ".")

    if existing is None and not any(planned.values()):
        raise nothing()
    r = _make(store_path, existing or StoreManifest(kind, cfg.chunk_tokens, cfg.overlap, host=host, port=port),
              embedding_model)
    have = r.ids_by_source()
    to_add: list[Chunk] = []
    to_delete: list[str] = []
    for src, chunks in planned.items():
        old = have.get(src, set())
        new_ids = {c.id for c in chunks}
        to_add += [c for c in chunks if c.id not in old]
        to_delete += sorted(old - new_ids)
        report.chunks_unchanged += len(old & new_ids)
    for src, old in have.items():
        if src in planned:
            continue
        sp = Path(src)
        if any(sp == s or s in sp.parents for s in scopes):
            to_delete += sorted(old)
    total_after = r.count() - len(to_delete) + len(to_add)
    if total_after <= 0:
        raise nothing()
    # 4. Write: remove stale chunks, add new ones, then record the manifest.
    report.chunks_removed = r.delete(to_delete) if to_delete else 0
    report.chunks_added = r.add_chunks(to_add, progress=progress) if to_add else 0
    r.commit()
    report.files = len(planned)
    report.chunks_total = r.count()
    if existing is None:
        m = StoreManifest(kind, cfg.chunk_tokens, cfg.overlap, tokenizer=tokenizer_name(tok_spec),
                          embedding_model=(embedding_model or getattr(r, "embedding_model", None)) if kind == "chroma" else None,
                          collection=DEFAULT_COLLECTION if kind == "chroma" else None, host=host, port=port)
    else:
        m = existing
        m.chunk_tokens, m.overlap, m.updated = cfg.chunk_tokens, cfg.overlap, time.time()
    m.write(store_path)
    report.seconds = time.perf_counter() - t0
    return report
