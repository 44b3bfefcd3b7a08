"""Write a merged FlashBack model (markers included) as a GGUF file that llama.cpp loads.

The ``gguf`` package reads and writes GGUF but has no HF -> GGUF converter, so this does the small
part that matters for Llama-family models:

- metadata (architecture hyper-parameters, tokenizer model, merges, chat template, special ids) is
  copied from the base model's GGUF;
- the tokenizer arrays are extended with ``<MARK_L>``/``<MARK_R>`` (type USER_DEFINED: llama.cpp then
  matches them in text like the HF tokenizer's added tokens) and ``vocab_size`` follows;
- every tensor is written fresh from the merged Hugging Face weights (F16 or F32): the resized token
  embedding (and output rows when untied) carries the markers' rows; ``q_proj``/``k_proj`` are
  permuted back into llama.cpp's rotary layout (transformers un-permutes them when loading a GGUF).

Other architectures are refused with a clear message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import FlashBackError
from .models import DEFAULT_MODEL, MARK_L, MARK_R, ModelLoadError, refuse_custom_code, spec_gguf

_LLAMA_TYPES = {"llama"}
_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_SKIP_KEYS = {"general.architecture", "general.file_type", "general.quantization_version",
              "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}


class GGUFExportError(RuntimeError, FlashBackError):
    """The model cannot be written as a GGUF (architecture, missing base GGUF, ...)."""


def permute_for_rope(w: Any, n_head: int) -> Any:
    """llama.cpp's q/k row order (as its convert_hf_to_gguf.py ``permute``): inverse of transformers' load."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field_value(field: Any) -> Any:
    return field.contents()


def export_gguf(merged_dir: str | os.PathLike, out: str | os.PathLike, base_gguf: str | os.PathLike,
                dtype: str = "f16") -> Path:
    """Write ``out`` (GGUF) from a merged HF directory and the base model's GGUF (for the metadata)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, TokenType
    merged_dir, out, base_gguf = Path(merged_dir), Path(out), Path(base_gguf)
    if dtype not in ("f16", "f32"):
        raise GGUFExportError(f"dtype must be 'f16' or 'f32', got {dtype!r}")
    if not base_gguf.is_file():
        raise GGUFExportError(f"Base GGUF not found: {base_gguf} (its metadata and tokenizer are copied).")
    try:
        refuse_custom_code(merged_dir)
    except ModelLoadError as exc:
        raise GGUFExportError(str(exc)) from None
    config = AutoConfig.from_pretrained(str(merged_dir), trust_remote_code=False)
    if config.model_type not in _LLAMA_TYPES:
        raise GGUFExportError(f"GGUF export supports Llama-family models; {merged_dir} is {config.model_type!r}. "
                              "Convert the merged directory with llama.cpp's convert_hf_to_gguf.py instead.")
    reader = GGUFReader(str(base_gguf))
    arch = _field_value(reader.fields["general.architecture"])
    if arch != "llama":
        raise GGUFExportError(f"The base GGUF's architecture is {arch!r}, not 'llama'.")
    tok = AutoTokenizer.from_pretrained(str(merged_dir), trust_remote_code=False)
    ids = {t: tok.convert_tokens_to_ids(t) for t in (MARK_L, MARK_R)}
    tokens = list(_field_value(reader.fields["tokenizer.ggml.tokens"]))
    types = list(_field_value(reader.fields["tokenizer.ggml.token_type"]))
    if any(i is None or i == tok.unk_token_id for i in ids.values()):
        raise GGUFExportError(f"{merged_dir} has no marker tokens in its tokenizer; export the merged adapter.")
    for name in (MARK_L, MARK_R):  # markers come right after the base vocabulary
        if ids[name] != len(tokens):
            raise GGUFExportError(f"{name} has id {ids[name]}, expected {len(tokens)} (right after the base "
                                  "GGUF's vocabulary): the merged model's tokenizer does not extend this base.")
        tokens.append(name)
        types.append(int(TokenType.USER_DEFINED))

    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32, trust_remote_code=False)
    state = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    vocab = state["model.embed_tokens.weight"].shape[0]
    if vocab < len(tokens):
        raise GGUFExportError(f"The embedding has {vocab} rows but the vocabulary {len(tokens)} tokens.")
    if vocab > len(tokens):  # padded embedding rows: pad the vocabulary with unused tokens
        for i in range(len(tokens), vocab):
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _SKIP_KEYS:
            continue
        vtype = field.types[0]
        value = _field_value(field)
        if key == "llama.vocab_size":
            value = len(tokens)
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)
    if "llama.vocab_size" not in reader.fields:
        writer.add_vocab_size(len(tokens))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_file_type(int(LlamaFileType.MOSTLY_F16 if dtype == "f16" else LlamaFileType.ALL_F32))

    def put(name: str, arr: Any) -> None:
        arr = np.ascontiguousarray(arr)
        if dtype == "f16" and arr.ndim > 1:
            arr = arr.astype(np.float16)
        else:
            arr = arr.astype(np.float32)
        writer.add_tensor(name, arr)

    put("token_embd.weight", state["model.embed_tokens.weight"])
    put("output_norm.weight", state["model.norm.weight"])
    if not tied and "lm_head.weight" in state:
        put("output.weight", state["lm_head.weight"])
    for i in range(config.num_hidden_layers):
        for hf, gg in _LAYER_MAP.items():
            w = state[f"model.layers.{i}.{hf}"]
            if hf.startswith("self_attn.q_proj"):
                w = permute_for_rope(w, n_head)
            elif hf.startswith("self_attn.k_proj"):
                w = permute_for_rope(w, n_kv)
            put(f"blk.{i}.{gg}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    os.replace(tmp, out)
    return out


def base_gguf_for(spec: str | None) -> Path:
    """The GGUF a base model spec came from (the default model, or a .gguf spec)."""
    gguf = spec_gguf(DEFAULT_MODEL if spec is None else spec)
    if gguf is not None:
        return gguf
    raise ModelLoadError(f"GGUF export copies metadata from the base model's GGUF, and {spec!r} is not one; "
                         "pass --gguf-base BASE.gguf (the GGUF of the same base model).")
