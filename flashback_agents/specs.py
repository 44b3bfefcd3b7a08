"""Model specs: what a spec names (the embedded default, a .gguf file, a model directory, a Hub id or a
server address) and where its files are. :func:`resolve_spec` is the one place a spec is turned into
a kind and file locations (the loader, the server backend's tokenizer, the llama.cpp process, GGUF
export and chunking use it); nothing is loaded here (a GGUF is converted once, on request)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .gguf import convert_gguf
from .modelbase import DEFAULT_ALIASES, DEFAULT_MODEL, ModelLoadError, default_gguf_path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def is_default_spec(spec: object) -> bool:
    """Whether a model spec names the embedded default model (``"default"``, ``"smollm2"``, ...; case and
    surrounding spaces ignored)."""
    return isinstance(spec, str) and spec.strip().lower() in DEFAULT_ALIASES


def is_server_spec(spec: Any) -> bool:
    """Whether a model spec is the address of a model server (``http(s)://...``), not weights."""
    return isinstance(spec, str) and spec.strip().lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class ResolvedSpec:
    """What a model spec names, and where its files are (nothing is loaded, converted or downloaded).

    ``kind``: ``"default"`` (the embedded model), ``"gguf"`` (a .gguf file), ``"dir"`` (a Hugging Face
    model directory), ``"hub"`` (a Hub id) or ``"server"`` (an ``http(s)://`` address).
    """

    kind: str
    spec: str                      # as given, without surrounding spaces
    name: str                      # the model's name: DEFAULT_MODEL, the GGUF's stem, the directory's name, the id
    gguf: Path | None = None       # "default" / "gguf": the GGUF file
    directory: Path | None = None  # "dir": the model directory

    def source(self) -> str:
        """Where transformers loads the model from: a directory (a GGUF is converted once, then reused) or a Hub id."""
        if self.kind in ("default", "gguf"):
            return str(convert_gguf(self.gguf))
        if self.kind == "dir":
            return str(self.directory)
        if self.kind == "hub":
            return self.spec
        raise ModelLoadError(f"{self.spec!r} is a server address, not weights: pass it as `model=` to ChatFlashBack "
                             "or FlashBackLLM to use the OpenAI-compatible server backend.")

    def tokenizer_source(self) -> tuple[str, dict[str, Any]]:
        """``(source, kwargs)`` for ``AutoTokenizer.from_pretrained``: tokenizer files only, no weights loaded
        (the default model reads its converted directory, so its ids equal the in-process engine's)."""
        if self.kind == "gguf":
            return str(self.gguf.parent), {"gguf_file": self.gguf.name}
        return self.source(), {}


def resolve_spec(spec: Any) -> ResolvedSpec:
    """THE resolver of a model spec: which kind it is and where its files are; :class:`ModelLoadError`
    (saying what to pass instead) for an empty, missing or unknown one."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"Model spec must be a non-empty string, got {spec!r}.")
    spec = spec.strip()
    if is_server_spec(spec):
        return ResolvedSpec("server", spec, spec)
    expanded = os.path.expanduser(spec)
    if spec.lower() in DEFAULT_ALIASES:
        return ResolvedSpec("default", spec, DEFAULT_MODEL, gguf=default_gguf_path())
    if expanded.lower().endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise ModelLoadError(f"GGUF file not found: {expanded}")
        return ResolvedSpec("gguf", spec, Path(expanded).stem, gguf=Path(expanded))
    if os.path.isdir(expanded):
        return ResolvedSpec("dir", spec, Path(expanded).name, directory=Path(expanded))
    if os.path.exists(expanded):
        raise ModelLoadError(f"{expanded} is a file; pass a model directory, a .gguf file or a Hub id.")
    if spec.startswith((".", "/", "~")) or os.sep in spec.replace("/", "", 1) or spec.count("/") > 1:
        raise ModelLoadError(f"Model path not found: {expanded}")
    if _HUB_ID.match(spec):
        return ResolvedSpec("hub", spec, spec)
    raise ModelLoadError(
        f"Unknown model spec {spec!r}. Use {DEFAULT_MODEL!r} (embedded, offline), a Hugging Face id "
        "like 'HuggingFaceTB/SmolLM2-360M-Instruct', a local model directory, or a .gguf file."
    )


def spec_gguf(spec: Any) -> Path | None:
    """The GGUF file a spec names (the default model's, or a .gguf path that exists); None if it names none.

    The default model not being installed is still an error (it says how to install it)."""
    try:
        return resolve_spec(spec).gguf
    except ModelLoadError:
        if is_default_spec(spec):
            raise
        return None
