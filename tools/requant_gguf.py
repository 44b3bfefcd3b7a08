"""Rewrite a GGUF with its quantised tensors as F16 or Q8_0 (same metadata, same tokenizer): to tell
whether llama.cpp's kernels for one quantisation type bound its speed on a CPU. Local files only.

    python tools/requant_gguf.py IN.gguf OUT.gguf --type f16|q8_0
"""
from __future__ import annotations

import argparse

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--type", choices=("f16", "q8_0"), default="f16")
    a = ap.parse_args()
    r = GGUFReader(a.src)
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")
    w = GGUFWriter(a.dst, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    w.add_file_type(int(LlamaFileType.MOSTLY_F16 if a.type == "f16" else LlamaFileType.MOSTLY_Q8_0))
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # numpy order
        arr = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if arr.ndim < 2:
            w.add_tensor(t.name, arr)
        elif a.type == "f16":
            w.add_tensor(t.name, arr.astype(np.float16))
        else:
            w.add_tensor(t.name, quantize(arr, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
