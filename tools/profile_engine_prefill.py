"""Our in-process engine at the same points as tools/profile_server_prefill.py: CachedContext with L cached
tokens, append N new tokens (timed prefill), then G greedy decode steps (timed decode). 1 torch thread by default.

    python tools/profile_engine_prefill.py --lengths 6000,3000,1000 --new 541 --gen 24 --threads 1
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from flashback_agents.context import CachedContext
from flashback_agents.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="6000,3000,1000")
    ap.add_argument("--new", type=int, default=541)
    ap.add_argument("--gen", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model(a.model, adapter=None)
    rng = random.Random(0)
    lengths = sorted((int(x) for x in a.lengths.split(",")), reverse=True)
    base = [rng.randrange(200, 40000) for _ in range(lengths[0])]
    ctx = CachedContext(lm, max_context_tokens=lengths[0] + a.new + a.gen + 64)
    t0 = time.perf_counter()
    ctx.append(base)
    print(json.dumps({"warm": lengths[0], "prompt_tps": round(lengths[0] / (time.perf_counter() - t0), 1)}), flush=True)
    for L in lengths:
        ctx.rollback(len(ctx) - L)
        new = [rng.randrange(200, 40000) for _ in range(a.new)]
        with torch.inference_mode():
            t0 = time.perf_counter()
            ctx.append(new)
            logits = ctx.next_token_logits()
            t1 = time.perf_counter()
            for _ in range(a.gen):
                tok = int(logits.argmax())
                ctx.push_generated(tok)
                logits = ctx.next_token_logits()
            t2 = time.perf_counter()
        print(json.dumps({"cached": L, "prompt_n": a.new, "prompt_s": round(t1 - t0, 2),
                          "prompt_tps": round(a.new / (t1 - t0), 1), "predicted_n": a.gen,
                          "predicted_s": round(t2 - t1, 2), "predicted_tps": round(a.gen / (t2 - t1), 1)}), flush=True)


if __name__ == "__main__":
    main()
