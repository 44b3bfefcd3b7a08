"""The server backend's tokenizer side: load the served model's tokenizer (no weights) and wrap it for rendering."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from ...models import (DEFAULT_MODEL, MARK_L, MARK_R, LoadedModel, ModelLoadError, custom_code_error,
                       default_gguf_path, is_default_spec, refuse_custom_code, resolve_spec)

__all__ = ["ServerTokenizerModel", "load_server_tokenizer", "add_marker_tokens_only"]


@dataclass
class ServerTokenizerModel(LoadedModel):
    """A :class:`LoadedModel` with a tokenizer and no weights: rendering runs here, compute on the server."""

    context_window: int = 8192
    server_url: str = ""

    @property
    def max_positions(self) -> int:  # type: ignore[override]
        return self.context_window

    @property
    def eos_token_ids(self) -> set[int]:  # type: ignore[override]
        eos = self.tokenizer.eos_token_id
        return {int(eos)} if eos is not None else set()

    @property
    def device(self):  # type: ignore[override]
        return torch.device("cpu")

    @property
    def dtype(self):  # type: ignore[override]
        return torch.float32

    @property
    def fingerprint(self) -> str:  # type: ignore[override]
        if self._fingerprint is None:
            vocab = self.tokenizer.get_vocab()
            h = hashlib.sha256(f"server:{self.server_url}:{len(self.tokenizer)}:{self.marker_ids}".encode())
            h.update(json.dumps(sorted(vocab.items())[:: max(1, len(vocab) // 512)]).encode())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint



def load_server_tokenizer(spec: str) -> tuple[Any, str]:
    """The tokenizer for a model spec, without loading weights (nothing is downloaded).

    The default model (or its GGUF) uses the converted default model directory's tokenizer (the same
    ids the in-process engine uses); another .gguf file its embedded tokenizer; a directory or a Hub id
    (already in the local cache) its tokenizer files.
    """

    spec = str(spec).strip()
    try:
        default_gguf = default_gguf_path()
    except ModelLoadError:
        default_gguf = None
    try:
        resolved = resolve_spec(spec)
    except ModelLoadError as exc:
        if is_default_spec(spec):
            raise
        if spec.lower().endswith(".gguf"):
            raise ModelLoadError(f"{exc} (for the tokenizer)") from None
        resolved = None  # not a spec we know: try it as a Hub id (already in the local cache)
    try:
        if resolved is not None and resolved.kind == "gguf" and default_gguf is not None \
                and resolved.gguf.resolve() == default_gguf.resolve():
            resolved = resolve_spec(DEFAULT_MODEL)  # the default GGUF by its path: the same ids as by name
        if resolved is None or resolved.kind in ("hub", "server"):
            return transformers.AutoTokenizer.from_pretrained(spec, trust_remote_code=False), spec
        source, kwargs = resolved.tokenizer_source()
        if resolved.kind == "dir":
            refuse_custom_code(source, "tokenizer")  # before transformers reads it: no prompt, no import
        return transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs), resolved.name
    except ModelLoadError:
        raise
    except Exception as exc:  # OSError / ValueError from transformers: say what to pass instead
        custom = custom_code_error(spec, exc, "tokenizer")
        if custom is not None:
            raise custom from None
        raise ModelLoadError(
            f"Could not load a tokenizer for {spec!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "Pass tokenizer= (or set FLASHBACK_TOKENIZER) to the served model's directory, .gguf file or a "
            "Hub id available offline.") from exc


def add_marker_tokens_only(tokenizer: Any) -> tuple[int, int]:
    """Add ``<MARK_L>``/``<MARK_R>`` to a tokenizer (no embeddings to resize here); their ids."""

    vocab = tokenizer.get_vocab()
    missing = [t for t in (MARK_L, MARK_R) if t not in vocab]
    if missing:
        tokenizer.add_tokens([transformers.AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(MARK_L)), int(tokenizer.convert_tokens_to_ids(MARK_R))
