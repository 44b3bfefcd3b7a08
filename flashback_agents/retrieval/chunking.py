"""Token-aware chunking with overlap, keeping the source line range of every chunk.

Chunks are sized in *model tokens* (the LM's tokenizer by default), because a chunk ends up as
evidence in the model's context: its token count is what costs compute. Each chunk keeps its exact
character span, so its text is a verbatim slice of the file and its line range is exact.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from ..models import DEFAULT_MODEL, refuse_custom_code, resolve_spec
from .base import RetrievalError

DEFAULT_CHUNK_TOKENS = 128
DEFAULT_OVERLAP = 16
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class ChunkingConfig:
    """How to cut text: ``chunk_tokens`` per chunk, ``overlap`` tokens shared by neighbours."""

    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    overlap: int = DEFAULT_OVERLAP
    snap_to_lines: bool = True  # end a chunk at a line break in its second half when there is one

    def validate(self) -> None:
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 8:
            raise RetrievalError(f"chunk_tokens must be an integer >= 8, got {self.chunk_tokens!r}.")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.chunk_tokens // 2 + 1:
            raise RetrievalError(f"overlap must be an integer in 0..{self.chunk_tokens // 2} "
                                 f"(at most half of chunk_tokens={self.chunk_tokens}), got {self.overlap!r}.")


@dataclass
class Chunk:
    """A verbatim slice of a source: text, 1-based inclusive line range, and a stable id."""

    text: str
    source: str
    start_line: int
    end_line: int
    index: int = 0
    id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def full_metadata(self) -> dict[str, Any]:
        meta = {"source": self.source, "start_line": self.start_line, "end_line": self.end_line,
                "chunk": self.index, "content_hash": content_hash(self.text)}
        meta.update(self.metadata)
        return meta


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def chunk_id(source: str, text: str, occurrence: int = 0) -> str:
    """Stable id from source + content: re-indexing unchanged text gives the same ids."""
    h = hashlib.sha256(f"{source}\x00{text}".encode("utf-8")).hexdigest()[:24]
    return h if occurrence == 0 else f"{h}-{occurrence}"


# ------------------------------------------------------------------------------------ tokenizer
_TOKENIZERS: dict[str, Any] = {}


def default_tokenizer_source() -> str:
    """Directory of the default model (tokenizer files only are read: no weights are loaded)."""
    return resolve_spec(DEFAULT_MODEL).source()


def load_tokenizer(spec: Any = None) -> Any:
    """A fast HF tokenizer: ``None``/"default" (the default model's), a name/path, a LoadedModel or a tokenizer."""
    if spec is not None and not isinstance(spec, str):
        tok = getattr(spec, "tokenizer", spec)  # LoadedModel or tokenizer object
        if not callable(tok):
            raise RetrievalError(f"Not a tokenizer: {type(spec).__name__}.")
        return tok
    key = spec or "default"
    tok = _TOKENIZERS.get(key)
    if tok is None:
        source = default_tokenizer_source() if key in ("default", "smollm2-135m-instruct") else key
        refuse_custom_code(source, "tokenizer")  # a local directory's auto_map: ModelLoadError, nothing run
        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - any loading failure is a user-facing spec problem
            raise RetrievalError(f"Could not load tokenizer {spec!r} for chunking "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                                 "Pass a local model directory or an available Hugging Face tokenizer.") from exc
        if not getattr(tok, "is_fast", False):
            raise RetrievalError(f"Tokenizer {spec!r} is not a fast tokenizer; chunking needs offset mappings.")
        _TOKENIZERS[key] = tok
    return tok


def tokenizer_name(spec: Any = None) -> str:
    if spec is None or spec == "default":
        return "default"
    if isinstance(spec, str):
        return spec
    tok = getattr(spec, "tokenizer", spec)
    return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


# ------------------------------------------------------------------------------------- reading
def read_text_file(path: str | Path) -> str:
    """UTF-8 text of a file, or a :class:`RetrievalError` saying why it cannot be indexed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RetrievalError(f"No such file: {path}") from None
    except IsADirectoryError:
        raise RetrievalError(f"{path} is a directory (pass it as a path to index it recursively).") from None
    except OSError as exc:
        raise RetrievalError(f"Cannot read {path}: {exc.strerror or exc}") from None
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise RetrievalError(f"{path} looks like a binary file (it contains NUL bytes); only UTF-8 text can be indexed.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RetrievalError(f"{path} is not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                             "convert it to UTF-8 (e.g. `iconv -t UTF-8`) or leave it out.") from None


# ------------------------------------------------------------------------------------ chunking
def chunk_text(text: str, source: str, tokenizer: Any = None,
               config: ChunkingConfig | None = None) -> list[Chunk]:
    """Cut ``text`` into overlapping token windows; every chunk is a verbatim slice with its lines."""
    config = config or ChunkingConfig()
    config.validate()
    if not text.strip():
        return []
    tok = load_tokenizer(tokenizer)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    n = len(offsets)
    if n == 0:
        return []
    line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]

    def line_of(char: int) -> int:
        return bisect.bisect_right(line_starts, char)  # 1-based

    size, overlap = config.chunk_tokens, config.overlap
    chunks: list[Chunk] = []
    seen: dict[str, int] = {}
    start = 0
    while start < n:
        end = min(start + size, n)
        if config.snap_to_lines and end < n:
            for i in range(end - 1, start + size // 2 - 1, -1):
                a, b = offsets[i]
                if "\n" in text[a:b]:
                    end = i + 1
                    break
        c0 = offsets[start][0]
        c1 = max(b for _, b in offsets[start:end])
        piece = text[c0:c1]
        if piece.strip():
            first = c0 + (len(piece) - len(piece.lstrip()))
            last = c0 + len(piece.rstrip()) - 1
            occ = seen.get(piece, 0)
            seen[piece] = occ + 1
            chunks.append(Chunk(text=piece, source=source, start_line=line_of(first), end_line=line_of(max(first, last)),
                                index=len(chunks), id=chunk_id(source, piece, occ)))
        if end >= n:
            break
        start = max(end - overlap, start + 1)
    return chunks
