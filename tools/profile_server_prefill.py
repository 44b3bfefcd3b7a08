"""Profile llama.cpp's prefill/decode on the embedded server at given cached lengths (raw /completion requests
with token ids; timings from llama.cpp itself). One warm prefill of the longest prefix, then for each cached
length L (longest first, so the slot's cache keeps L tokens): L cached + N new tokens, G generated.

    python tools/profile_server_prefill.py --lengths 6000,3000,1000 --new 541 --gen 24 --threads 1 \
        [--flash-attn on|off|auto] [--cache-type f16|f32] [--ubatch-size 512]
"""
from __future__ import annotations

import argparse
import json
import random
import time

import httpx

from flashback_agents.llamacpp import ServeConfig, ServerProcess, free_port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="6000,3000,1000")
    ap.add_argument("--new", type=int, default=541)
    ap.add_argument("--gen", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--flash-attn", default="auto")
    ap.add_argument("--cache-type", default=None)
    ap.add_argument("--ubatch-size", type=int, default=None)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a .gguf file or the default model's name")
    ap.add_argument("--log", default="/tmp/h8_server.log")
    a = ap.parse_args()
    lengths = sorted((int(x) for x in a.lengths.split(",")), reverse=True)
    cfg = ServeConfig(model=a.model, port=free_port(), ctx_size=a.ctx, threads=a.threads, flash_attn=a.flash_attn,
                      cache_type=a.cache_type, ubatch_size=a.ubatch_size, verbose=True)
    rng = random.Random(0)
    base_prompt = [rng.randrange(200, 40000) for _ in range(lengths[0])]
    with ServerProcess(cfg, log_path=a.log) as url:
        base = url[:-3]
        client = httpx.Client(timeout=900)

        def ask(prompt, n):
            t0 = time.perf_counter()
            r = client.post(base + "/completion", json={"prompt": prompt, "n_predict": n, "ignore_eos": True,
                                                        "cache_prompt": True, "id_slot": 0, "temperature": 0})
            return r.json()["timings"], time.perf_counter() - t0

        t, wall = ask(base_prompt, 1)
        print(json.dumps({"warm": lengths[0], "prompt_tps": round(t["prompt_per_second"], 1), "wall_s": round(wall, 2)}),
              flush=True)
        for L in lengths:
            prompt = base_prompt[:L] + [rng.randrange(200, 40000) for _ in range(a.new)]
            t, wall = ask(prompt, a.gen)
            print(json.dumps({"cached": t.get("cache_n"), "prompt_n": t["prompt_n"],
                              "prompt_s": round(t["prompt_ms"] / 1e3, 2), "prompt_tps": round(t["prompt_per_second"], 1),
                              "predicted_n": t["predicted_n"], "predicted_s": round(t["predicted_ms"] / 1e3, 2),
                              "predicted_tps": round(t["predicted_per_second"], 1), "wall_s": round(wall, 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
