"""GGUF in: refuse a file that cannot be a GGUF model (header check), and convert a GGUF file once
into a safetensors model directory under the cache dir (reused by later loads). GGUF out (a merged
model to a .gguf file) is :mod:`flashback_agents.export_gguf`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from .modelbase import DEFAULT_MODEL, ModelLoadError, cache_dir, default_gguf_path

logger = logging.getLogger("flashback_agents")


_GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: str | os.PathLike) -> Path:
    """Refuse, with :class:`ModelLoadError`, a file that cannot be a GGUF model: missing, not a regular
    file, empty, without the ``GGUF`` magic, of an unknown version or with absurd counts in its header.

    Reads 24 bytes (no parsing of the rest): llama.cpp and the converter are never handed garbage."""
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
    steps.set_postfix_str("dequantizing GGUF")
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32, trust_remote_code=False)
    steps.update(1)
    steps.set_postfix_str("rebuilding")
    model = transformers.AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
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
