"""FlashBack adapters (LoRA on K/V plus the two marker rows): the marker tokens, the adapter shipped
for a base model, the ``adapter=`` argument, and attaching one: every file checked before peft reads
it, then merged for full-speed inference."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import safetensors
import torch
import transformers

from .modelbase import (DEFAULT_ALIASES, ADAPTER_META, AUTO_ADAPTER, DEFAULT_MODEL, MARK_L, MARK_R,
                        SHIPPED_ADAPTERS, ModelLoadError, refuse_custom_code)


def add_marker_tokens(model: Any, tokenizer: Any) -> tuple[int, int]:
    """Add ``<MARK_L>``/``<MARK_R>`` as special tokens; new embedding rows = mean of the old rows."""

    vocab = tokenizer.get_vocab()
    missing = [t for t in (MARK_L, MARK_R) if t not in vocab]
    if missing:
        tokenizer.add_tokens([transformers.AddedToken(t, special=True, normalized=False) for t in missing],
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


def shipped_adapter(name: str) -> Path | None:
    """The FlashBack adapter shipped in the package for a base model name (or spec), or None."""
    name = DEFAULT_MODEL if name.strip().lower() in DEFAULT_ALIASES else name.strip()
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

    path = adapter / _ADAPTER_WEIGHTS
    if not path.is_file():
        raise _bad_adapter(adapter, f"it has no {_ADAPTER_WEIGHTS} (its LoRA and marker weights)")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
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


def attach_adapter(model: Any, tokenizer: Any, adapter: Path) -> tuple[Any, Any]:
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
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(adapter), trust_remote_code=False)
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
