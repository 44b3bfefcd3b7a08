"""Quickstart: a multi-step conversation on one cached context, showing what each step computes.

Run:  python examples/quickstart.py        (offline, on the embedded SmolLM2-135M-Instruct)

Each step appends a tool result (marker-wrapped) and generates a short reply. Only the new tokens
are computed; the line printed per step shows tokens computed vs reused from the cache.
"""

from __future__ import annotations

import argparse
import time

from flashback_agents import CachedContext, GenerationConfig, Message, generate, load_model

LOG = """2024-03-01 10:15:02 INFO  scheduler: job 4411 started on worker-3
2024-03-01 10:15:04 WARN  storage: volume /data/7 at 91% capacity
2024-03-01 10:15:09 ERROR network: connection reset by peer 10.0.4.21:8020
2024-03-01 10:15:11 ERROR network: connection reset by peer 10.0.4.22:8020
2024-03-01 10:15:20 INFO  scheduler: job 4411 finished in 18s"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()

    lm = load_model(args.model)
    ctx = CachedContext(lm)
    lay = ctx.layout
    messages = [Message("system", "You are a log analysis assistant. Answer briefly."),
                Message("user", "Which component reports errors in this log?")]
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    print(f"model {lm.name} on {lm.device}; window {lm.max_positions} tokens\n")
    lines = LOG.splitlines()
    for step in range(1, args.steps + 1):
        ids = lay.render(messages)
        t0 = time.perf_counter()
        sync = ctx.sync(ids)
        result = generate(ctx, cfg)
        dt = time.perf_counter() - t0
        print(f"step {step}: computed {sync.computed:4d} tokens, reused {sync.reused:4d}  ({dt:.2f}s)")
        print(f"   model: {result.text.strip()[:100]!r}")
        reply = Message("assistant", result.text)
        lay.remember_reply(reply, result.token_ids)  # the same text re-renders to the generated ids
        messages += [reply, Message("user", f"Tool result for step {step}:", documents=[lines[(step - 1) % len(lines)]])]
    s = ctx.stats
    print(f"\ntotal: computed {s.tokens_computed} tokens, reused {s.tokens_reused}; "
          f"prefill {s.prefill_seconds:.2f}s, decode {s.decode_seconds:.2f}s for {s.decoded_tokens} tokens")


if __name__ == "__main__":
    main()
