"""``bench long``: a long agent replay on a token budget, ours (evict) vs ChatHuggingFace + trim_messages.

Each step generates G tokens (EOS ignored) and appends a tool result of T tokens; the budget is the
model's window (8,192 for the default model) minus room for the reply. ChatFlashBack compacts its
context (oldest tool results -> stubs, tail recomputed once); ChatHuggingFace gets the history
trimmed by LangChain's ``trim_messages`` to the same budget and recomputes its whole prompt.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import transformers
from tqdm.auto import tqdm

from ..context import CachedContext
from ..layout import LANGCHAIN_TYPES, Layout, Message, ToolCall
from .agent_bench import QUESTION, SYSTEM, TOOLS, Scenario, fresh_engine, spec_kwargs, tool_results


@dataclass
class LongStep:
    step: int
    seconds: float
    prompt_tokens: int
    output_tokens: int = 0
    cache_read: int = 0
    compacted: bool = False
    tokens_evicted: int = 0
    tokens_recomputed: int = 0
    forwards: int = 0  # decode forwards (ours; see flashback_agents.speculation)
    drafted: int = 0
    accepted: int = 0
    forced: int = 0


@dataclass
class LongRun:
    name: str
    steps: list[LongStep] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(s.seconds for s in self.steps)


def run_flashback(spec: str, lm, scenario: Scenario, results: list[str], budget: int,
                  on_overflow: str = "evict", speculation: bool = True) -> LongRun:
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage

    from langchain_flashback import ChatFlashBack

    base = ChatFlashBack(model=spec, max_tokens=scenario.generate, max_context_tokens=budget,
                         on_overflow=on_overflow, **spec_kwargs(speculation))
    fresh_engine(base.engine)  # a rerun (speculation off) must not start from the previous run's cache
    chat = base.bind_tools(TOOLS[:1], tool_choice="search_logs")
    history: list = [SystemMessage(SYSTEM), HumanMessage(QUESTION)]
    run = LongRun(f"ChatFlashBack ({on_overflow})" + ("" if speculation else " (no speculation)"))
    for i in tqdm(range(scenario.steps), desc=run.name, unit="step", leave=False):
        t0 = time.perf_counter()
        ai = chat.invoke(history)
        dt = time.perf_counter() - t0
        meta, usage = ai.response_metadata, ai.usage_metadata
        run.steps.append(LongStep(i + 1, dt, usage["input_tokens"], usage["output_tokens"],
                                  usage["input_token_details"]["cache_read"], meta["compacted"],
                                  meta["tokens_evicted"], meta["tokens_recomputed"], meta.get("decode_forwards", 0),
                                  meta.get("draft_tokens", 0), meta.get("draft_tokens_accepted", 0),
                                  meta.get("forced_tokens", 0)))
        # each step is a real (grammar-constrained) tool call, and its result is appended marked
        if not ai.tool_calls:
            raise RuntimeError(f"step {i + 1}: the reply was cut before its tool call completed "
                               f"(finish_reason={meta.get('finish_reason')!r}, prompt {usage['input_tokens']} "
                               f"tokens of a {budget}-token budget): raise --budget")
        history += [ai, ToolMessage(results[i], tool_call_id=ai.tool_calls[0]["id"], name="search_logs")]
    return run


def run_chathf_trim(lm, scenario: Scenario, results: list[str], budget: int,
                    gen_per_step: list[int] | None = None) -> LongRun:
    """``gen_per_step``: tokens to generate at each step (ours' reply lengths, so both decode the same)."""
    from langchain_core.messages import HumanMessage, SystemMessage, trim_messages
    from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
    G = scenario.generate
    pipe = transformers.pipeline("text-generation", model=lm.model, tokenizer=lm.tokenizer, max_new_tokens=G,
                    min_new_tokens=G, do_sample=False, return_full_text=False)
    chat = ChatHuggingFace(llm=HuggingFacePipeline(pipeline=pipe), tokenizer=lm.tokenizer)

    def count(msgs) -> int:  # tokens of the chat-templated prompt (what ChatHuggingFace will compute)
        if not msgs:
            return 0
        text = lm.tokenizer.apply_chat_template([{"role": LANGCHAIN_TYPES.get(m.type) or "user", "content": m.content}
                                                 for m in msgs], tokenize=False, add_generation_prompt=True)
        return len(lm.encode(text))

    history: list = [SystemMessage(SYSTEM), HumanMessage(QUESTION)]
    run = LongRun("ChatHuggingFace + trim_messages")
    for i in tqdm(range(scenario.steps), desc=run.name, unit="step", leave=False):
        t0 = time.perf_counter()
        trimmed = trim_messages(history, max_tokens=budget, token_counter=count, strategy="last",
                                include_system=True, start_on="human")
        g = gen_per_step[i] if gen_per_step else G
        ai = chat.invoke(trimmed, pipeline_kwargs={"max_new_tokens": g, "min_new_tokens": g})
        dt = time.perf_counter() - t0
        run.steps.append(LongStep(i + 1, dt, count(trimmed), g))
        # ChatHuggingFace needs a human message last: tool results go in as human messages
        history += [ai, HumanMessage(f"Tool result:\n{results[i]}")]
    return run


def bench_long(lm, spec: str, scenario: Scenario, budget: int | None = None,
               systems: tuple[str, ...] = ("flashback", "chathf")) -> dict:
    """``systems``: "flashback", "shift", "chathf", and "no-speculation" (ours again with speculation and
    jump-forward off, in the same run)."""
    budget = budget or lm.max_positions - 2 * scenario.generate - 64
    results = tool_results(lm, scenario)
    runs = []
    if "flashback" in systems:
        runs.append(run_flashback(spec, lm, scenario, results, budget))
    if "shift" in systems:
        runs.append(run_flashback(spec, lm, scenario, results, budget, on_overflow="shift"))
    if "no-speculation" in systems:
        runs.append(run_flashback(spec, lm, scenario, results, budget, speculation=False))
    if "chathf" in systems:  # same number of generated tokens per step as ours (its tool calls vary in length)
        gen = [s.output_tokens for s in runs[0].steps] if runs else None
        runs.append(run_chathf_trim(lm, scenario, results, budget, gen))
    out = {"model": lm.name, "threads": torch.get_num_threads(), "budget": budget,
           "scenario": asdict(scenario), "systems": []}
    for r in runs:
        comp = [s for s in r.steps if s.compacted]
        # a step that did not compact must be a pure append: all of the previous prompt and reply from the cache
        not_pure = [s.step for p, s in zip(r.steps, r.steps[1:])
                    if not s.compacted and s.cache_read != p.prompt_tokens + p.output_tokens] \
            if r.name.startswith("ChatFlashBack") else []
        out["systems"].append({
            "system": r.name, "total_s": r.total, "steps": [asdict(s) for s in r.steps],
            "compactions": len(comp), "compaction_steps": [s.step for s in comp],
            "steps_per_compaction": len(r.steps) / max(1, len(comp)),
            "non_append_steps": not_pure,
            "compaction_step_s": [s.seconds for s in comp],
            "tokens_recomputed": sum(s.tokens_recomputed for s in comp),
            "tokens_evicted": sum(s.tokens_evicted for s in comp)})
        row = out["systems"][-1]
        row["output_tokens"] = sum(s.output_tokens for s in r.steps)
        if any(s.forwards for s in r.steps):  # ours: multi-token decoding counters, in total
            row.update({k: sum(getattr(s, k) for s in r.steps) for k in ("forwards", "drafted", "accepted", "forced")})
            row["forwards_per_token"] = row["forwards"] / max(1, row["output_tokens"])
    by = {s["system"]: s for s in out["systems"]}
    fb, hf = by.get("ChatFlashBack (evict)"), by.get("ChatHuggingFace + trim_messages")
    plain = by.get("ChatFlashBack (evict) (no speculation)")
    if fb and hf:
        out["speedup_vs_chathf_trim"] = hf["total_s"] / fb["total_s"]
    if plain and hf:
        out["speedup_vs_chathf_trim_no_speculation"] = hf["total_s"] / plain["total_s"]
    if fb and plain:
        out["speedup_vs_no_speculation"] = plain["total_s"] / fb["total_s"]
    return out


@torch.inference_mode()
def shift_drift(lm, steps: int = 10, tool_tokens: int = 200, budget: int = 1200, probe_tokens: int = 64) -> dict:
    """How far ``on_overflow="shift"`` drifts from ``"evict"`` (which equals a full recompute).

    The same conversation (tool results of ``tool_tokens``) is synced step by step into two contexts
    with the same budget; after the first compaction, the next-token logits are compared, and a
    probe text appended to both is scored (perplexity under each cache).
    """
    lay = Layout(lm)
    results = tool_results(lm, Scenario(steps, tool_tokens, 8))
    evict = CachedContext(lm, max_context_tokens=budget, on_overflow="evict")
    shift = CachedContext(lm, max_context_tokens=budget, on_overflow="shift")
    msgs = [Message("system", SYSTEM), Message("user", QUESTION)]
    compacted_at = None
    for i in range(steps):
        call = ToolCall("search_logs", {"pattern": f"ERROR {i}"}, id=f"c{i}")
        msgs += [Message("assistant", "", tool_calls=[call]),
                 Message("tool", results[i], tool_call_id=f"c{i}", name="search_logs")]
        ids = lay.render(msgs)
        evict.sync(ids)
        shift.sync(ids)
        if shift.last_compaction is not None and compacted_at is None:
            compacted_at = i + 1
            break
    if compacted_at is None:
        raise ValueError("no compaction happened: lower the budget or raise steps/tool_tokens")
    assert evict.token_ids == shift.token_ids
    le, ls = evict.next_token_logits(), shift.next_token_logits()
    pe, ps = torch.log_softmax(le, -1), torch.log_softmax(ls, -1)
    kl = float((pe.exp() * (pe - ps)).sum())
    probe = lm.encode(tool_results(lm, Scenario(1, probe_tokens, 8))[0])

    def nll(ctx) -> float:
        total = 0.0
        for t in probe:
            total -= float(torch.log_softmax(ctx.next_token_logits(), -1)[t])
            ctx.append([t])
        return total / len(probe)

    return {"compacted_at_step": compacted_at, "context_tokens": len(evict), "budget": budget,
            "max_abs_logit_diff": float((le - ls).abs().max()), "kl_evict_to_shift": kl,
            "same_argmax": bool(int(le.argmax()) == int(ls.argmax())),
            "probe_ppl_evict": math.exp(nll(evict)), "probe_ppl_shift": math.exp(nll(shift)),
            "recompute_tokens_evict": evict.stats.tokens_recomputed,
            "recompute_tokens_shift": shift.stats.tokens_recomputed}
