"""``bench pool``: many long-running conversations through one ``ChatFlashBack`` whose memory holds few.

C conversations take turns round-robin, S steps each; a step appends a T-token tool observation
(after the model's previous reply) and generates G tokens. The memory budget holds ``hold`` of them at
their final length, so with C > hold every conversation is evicted before its next turn: without the
disk tier (:mod:`flashback_agents.kvstore`) its next step recomputes everything, with it the step
reloads the stored KV and computes only the new tokens. Both runs happen here, one after the other,
on the same weights; reported: tokens computed, tokens recomputed (computed minus tokens new to the
conversation), tokens restored from disk, and seconds.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from typing import Any, Callable

import torch

from ..engines import release_engines
from ..kvcache import forward, layer_tensors, new_cache
from ..models import shared_model
from .common import filler_ids


def conversation_bytes(lm: Any, tokens: int) -> int:
    """KV bytes a conversation of ``tokens`` holds in the pool (buffers grow by doubling)."""
    cache = new_cache(lm.model)
    with torch.inference_mode():
        forward(lm.model, torch.tensor([[1]], device=lm.device), cache, logits_to_keep=1)
    per_token = sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k, _ in layer_tensors(cache))
    return per_token * max(256, 2 ** math.ceil(math.log2(max(tokens, 1))))


def _observation(lm: Any, conv: int, step: int, tokens: int) -> str:
    """About ``tokens`` tokens of log text, different per conversation and step."""
    offset = (conv * 37 + step * 101) % 997
    return f"[conversation {conv} step {step}] read_log output:\n" + lm.decode(filler_ids(lm, offset + tokens)[offset:])


def run_pool(llm: Any, lm: Any, conversations: int, steps: int, tokens: int,
             progress: Callable[[str], None] | None = None) -> dict:
    """One pass: every conversation takes ``steps`` turns, round-robin; returns the counts and seconds."""
    from langchain_core.messages import HumanMessage, SystemMessage

    system = SystemMessage("You are a log analysis agent. Read the logs the user pastes, find the errors and "
                           "say which component failed and why. Answer briefly.")
    convs: list[list[Any]] = [[system, HumanMessage(f"Conversation {i}: the service went down last night; "
                                                    "here are the logs, one part per step.")]
                              for i in range(conversations)]
    prev_total = [0] * conversations  # tokens the conversation held after its last reply
    computed = new = restored = cache_read = 0
    t0 = time.perf_counter()
    for step in range(steps):
        for i in range(conversations):
            convs[i].append(HumanMessage(_observation(lm, i, step, tokens)))
            reply = llm.invoke(convs[i])
            u, meta = reply.usage_metadata or {}, reply.response_metadata or {}
            held = int(u.get("input_tokens", 0))
            computed += int(meta.get("computed_tokens", 0))
            cache_read += int((u.get("input_token_details") or {}).get("cache_read", 0))
            restored += int(meta.get("cache_restored_tokens", 0))
            new += held - prev_total[i]
            prev_total[i] = held + int(u.get("output_tokens", 0))
            convs[i].append(reply)
        if progress is not None:
            progress(f"step {step + 1}/{steps}: {time.perf_counter() - t0:.1f}s")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens_computed": computed, "tokens_new": new,
            "tokens_recomputed": max(0, computed - new), "tokens_restored": restored, "cache_read": cache_read,
            "final_tokens": max(prev_total)}


def bench_pool(model: str, conversations: int = 32, steps: int = 12, tokens: int = 256, generate: int = 8,
               hold: int = 4, store_dir: str | None = None, systems: tuple[str, ...] = ("memory", "disk"),
               progress: Callable[[str], None] | None = None) -> dict:
    """Both systems, same model and scenario; ``speedup`` = memory-only seconds / disk-tier seconds."""
    try:
        from langchain_flashback import ChatFlashBack
    except ImportError as exc:  # pragma: no cover - the langchain extra is not installed
        raise RuntimeError("bench pool drives ChatFlashBack: pip install 'flashback-agents[langchain]'") from exc
    lm = shared_model(model, adapter=None)
    est_tokens = 64 + steps * (tokens + generate + 40)
    budget = hold * conversation_bytes(lm, est_tokens)
    root = store_dir or tempfile.mkdtemp(prefix="flashback-pool-")
    out: dict[str, Any] = {"model": lm.name, "dtype": str(lm.dtype), "threads": torch.get_num_threads(),
                           "conversations": conversations, "steps": steps, "tool_tokens": tokens,
                           "generate": generate, "hold": hold, "max_cached_bytes": budget, "systems": {}}
    try:
        for system in systems:
            release_engines()
            kw: dict[str, Any] = {"kv_store_dir": f"{root}/{system}"} if system == "disk" else {}
            llm = ChatFlashBack(model=model, max_cached_bytes=budget, max_tokens=generate, min_tokens=generate,
                                temperature=0.0, **kw)
            res = run_pool(llm, lm, conversations, steps, tokens,
                           progress=(lambda m, s=system: progress(f"{s}: {m}")) if progress else None)
            store = llm.engine.kv_store
            if store is not None:
                res["store"] = {**store.stats.as_dict(), "bytes_on_disk": store.nbytes}
            out["systems"][system] = res
            llm.engine.close()
    finally:
        release_engines()
        if store_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    s = out["systems"]
    if "memory" in s and "disk" in s:
        out["speedup"] = s["memory"]["seconds"] / max(s["disk"]["seconds"], 1e-9)
        d = s["disk"]["tokens_recomputed"]
        out["recomputed_ratio"] = s["memory"]["tokens_recomputed"] / d if d else None  # None: disk recomputed 0
    return out
