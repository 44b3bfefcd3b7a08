"""``bench agent``: one agent run replayed through the ideal loop, the libraries users would pick
instead, and flashback-agents, on the same weights, in one run.

The scenario: a system prompt with two tool schemas and a question; then ``steps`` times: the model
generates exactly ``generate`` tokens (EOS ignored, so every system does the same work), and a tool
result of ``tool_tokens`` tokens is appended. Each system keeps its own history (its own replies),
as a real agent would.

Systems:
- ``ideal``: a bare loop over the model, one transformers ``DynamicCache``, prefill of the new tokens
  only, G greedy tokens: no framework at all.
- ``ChatHuggingFace`` (langchain-huggingface, on ``HuggingFacePipeline``) and LlamaIndex
  ``HuggingFaceLLM``: the whole prompt is recomputed at every step (what they do).
- ``ChatFlashBack`` and LlamaIndex ``FlashBack`` (system name "LlamaIndex FlashBackLLM"): ours.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import transformers
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from ..kvcache import forward
from ..layout import Layout, Message
from .common import filler_ids

TOOLS = [
    {"type": "function", "function": {
        "name": "search_logs", "description": "Search the log file with a regular expression.",
        "parameters": {"type": "object", "properties": {"pattern": {"type": "string", "maxLength": 32}},
                       "required": ["pattern"]}}},
    {"type": "function", "function": {
        "name": "count_by_level", "description": "Count log lines by level (INFO, WARN, ERROR).",
        "parameters": {"type": "object", "properties": {"window": {"type": "string", "maxLength": 32}}}}},
]
SYSTEM = "You are a log analysis agent. Use the tools, then answer briefly."
QUESTION = "Which component reports the most errors, and since when?"


@dataclass
class Scenario:
    steps: int = 12
    tool_tokens: int = 512
    generate: int = 24
    #: ``bench agent --tool-calls``: every step is a required (grammar-constrained) search_logs call whose
    #: pattern the previous tool result suggests (copied by the model), instead of G free-text tokens
    tool_calls: bool = False


@dataclass
class StepRecord:
    step: int
    seconds: float
    tokens_computed: int
    tokens_reused: int
    output_tokens: int = 0
    forwards: int = 0  # decode forwards (ours; see flashback_agents.speculation)
    drafted: int = 0
    accepted: int = 0
    forced: int = 0


@dataclass
class SystemRun:
    name: str
    steps: list[StepRecord] = field(default_factory=list)
    error: str | None = None

    @property
    def total(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def last(self) -> float:
        return self.steps[-1].seconds if self.steps else float("nan")


def tool_results(lm, scenario: Scenario) -> list[str]:
    """Deterministic tool outputs of about ``tool_tokens`` tokens each (log-like text)."""
    base = filler_ids(lm, scenario.tool_tokens * scenario.steps + 64)
    out = []
    for i in range(scenario.steps):
        out.append(lm.decode(base[i * scenario.tool_tokens:(i + 1) * scenario.tool_tokens]))
        if scenario.tool_calls:  # what the next call should search for, to be copied into its arguments
            comp = COMPONENTS[i % len(COMPONENTS)]
            out[-1] += f"\n{i % 24:02d}:{i % 60:02d}:07 ERROR {comp}: retry limit reached. Next: search_logs " \
                       f"with pattern \"{comp} ERROR\""
    return out


COMPONENTS = ["disk-monitor", "auth-service", "scheduler", "payment-gateway", "cache-node", "api-proxy"]
SYSTEM_CALLS = "You are a log analysis agent. Call search_logs with the pattern the last tool result suggests."


def _spec_fields(rec: StepRecord, meta: dict | None) -> None:
    """Copy ours' multi-token decoding counters (response metadata / LlamaIndex usage) into ``rec``."""
    meta = meta or {}
    rec.forwards = int(meta.get("decode_forwards", 0) or 0)
    rec.drafted = int(meta.get("draft_tokens", 0) or 0)
    rec.accepted = int(meta.get("draft_tokens_accepted", 0) or 0)
    rec.forced = int(meta.get("forced_tokens", 0) or 0)


@torch.inference_mode()
def run_ideal(lm, scenario: Scenario, results: list[str], gen_per_step: list[int] | None = None) -> SystemRun:
    """The floor: one DynamicCache, prefill only the new tokens, G greedy decode steps (``gen_per_step``:
    tokens per step, ours' reply lengths in ``--tool-calls`` mode)."""
    lay = Layout(lm)
    model = lm.model
    cache = DynamicCache(config=model.config)
    held: list[int] = []
    msgs = [Message("system", SYSTEM), Message("user", QUESTION)]
    run = SystemRun("ideal")
    for step in range(scenario.steps):
        ids = lay.render(msgs, tools=TOOLS)
        t0 = time.perf_counter()
        new = ids[len(held):]
        assert ids[: len(held)] == held
        out = forward(model, torch.tensor([new]), cache, logits_to_keep=1)
        gen = []
        tok = int(out.logits[0, -1].argmax())
        for _ in range((gen_per_step[step] if gen_per_step else scenario.generate) - 1):
            gen.append(tok)
            out = forward(model, torch.tensor([[tok]]), cache, logits_to_keep=1)
            tok = int(out.logits[0, -1].argmax())
        gen.append(tok)
        held = ids + gen[:-1]  # the last sampled token is fed with the next prefill
        run.steps.append(StepRecord(step + 1, time.perf_counter() - t0, len(new), len(ids) - len(new), len(gen)))
        reply = Message("assistant", lm.decode(gen, skip_special_tokens=True))
        lay.remember_reply(reply, gen)
        msgs += [reply, Message("tool", results[step], name="search_logs")]
        held_ids = lay.render(msgs, tools=TOOLS, add_generation_prompt=False)
        assert held_ids[: len(held)] == held
    return run


def run_langchain(name: str, chat_model, lm, scenario: Scenario, results: list[str],
                  usage: Callable | None = None, tool_as_human: bool = False) -> SystemRun:
    """Drive a LangChain chat model with the growing message list (as an agent loop does).

    ``tool_as_human``: ChatHuggingFace refuses a history that does not end with a HumanMessage,
    so its tool results are sent as human messages (same text, same token count).
    """
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage

    tool_lines = "\n".join(t["function"]["name"] + ": " + t["function"]["description"] for t in TOOLS)
    history: list = [SystemMessage(SYSTEM + "\nTools:\n" + tool_lines), HumanMessage(QUESTION)]
    run = SystemRun(name)
    for step in range(scenario.steps):
        t0 = time.perf_counter()
        reply = chat_model.invoke(history)
        dt = time.perf_counter() - t0
        computed, reused = usage(reply, history) if usage else (0, 0)
        rec = StepRecord(step + 1, dt, computed, reused, (reply.usage_metadata or {}).get("output_tokens", 0)
                         or scenario.generate)
        _spec_fields(rec, reply.response_metadata)
        run.steps.append(rec)
        result = (HumanMessage(f"Tool result:\n{results[step]}") if tool_as_human
                  else ToolMessage(results[step], tool_call_id=f"call_{step}"))
        history += [reply, result]
    return run


def run_llamaindex(name: str, llm, lm, scenario: Scenario, results: list[str],
                   usage: Callable | None = None) -> SystemRun:
    """Drive a LlamaIndex LLM's ``chat`` with the growing history."""
    from llama_index.core.llms import ChatMessage

    history = [ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content=QUESTION)]
    run = SystemRun(name)
    for step in range(scenario.steps):
        t0 = time.perf_counter()
        resp = llm.chat(history)
        dt = time.perf_counter() - t0
        computed, reused = usage(resp, history) if usage else (0, 0)
        u = (resp.raw or {}).get("usage", {}) if isinstance(resp.raw, dict) else {}
        rec = StepRecord(step + 1, dt, computed, reused, u.get("completion_tokens", 0) or scenario.generate)
        _spec_fields(rec, u)
        run.steps.append(rec)
        history += [resp.message, ChatMessage(role="tool", content=results[step],
                                              additional_kwargs={"tool_call_id": f"call_{step}"})]
    return run


def summarize(runs: list[SystemRun], scenario: Scenario, lm) -> dict:
    by = {r.name: r for r in runs if r.steps}
    ideal = by.get("ideal")
    hf = by.get("ChatHuggingFace")
    rows = []
    for r in runs:
        row = {"system": r.name, "error": r.error, "total_s": r.total if r.steps else None,
               "last_step_s": r.last if r.steps else None,
               "tokens_computed": sum(s.tokens_computed for s in r.steps),
               "tokens_reused": sum(s.tokens_reused for s in r.steps),
               "output_tokens": sum(s.output_tokens for s in r.steps),
               "steps": [asdict(s) for s in r.steps]}
        if any(s.forwards for s in r.steps):  # ours: multi-token decoding counters, in total
            row.update({k: sum(getattr(s, k) for s in r.steps) for k in ("forwards", "drafted", "accepted", "forced")})
            row["forwards_per_token"] = row["forwards"] / max(1, row["output_tokens"])
        if r.steps and ideal:
            row["vs_ideal_total"] = r.total / ideal.total
            row["vs_ideal_last"] = r.last / ideal.last
        if r.steps and hf:
            row["speedup_vs_chathf_total"] = hf.total / r.total
            row["speedup_vs_chathf_last"] = hf.last / r.last
        plain = by.get(f"{r.name} (no speculation)")
        if r.steps and plain is not None:
            row["speedup_vs_no_speculation_total"] = plain.total / r.total
        rows.append(row)
    return {"model": lm.name, "dtype": str(lm.dtype), "threads": torch.get_num_threads(),
            "scenario": asdict(scenario), "systems": rows}


def fresh_engine(engine) -> None:
    """Drop the idle cached contexts of a shared engine: a rerun (speculation on, then off) must not
    find the previous run's conversation already cached."""
    if getattr(engine, "pool", None) is not None:
        engine.pool.clear()


def spec_kwargs(speculation: bool) -> dict:
    return {} if speculation else {"speculate": False, "jump_forward": False}


def build_systems(lm, spec: str, scenario: Scenario, only: list[str] | None = None,
                  no_speculation: bool = False) -> dict[str, Callable]:
    """Name -> zero-argument runner, for each system whose library is installed.

    ``no_speculation``: also run ours with speculation and jump-forward off (rows named
    "... (no speculation)"), in the same run."""
    if scenario.tool_calls:
        return build_tool_call_systems(lm, spec, scenario, only, no_speculation)
    results = tool_results(lm, scenario)
    G = scenario.generate
    systems: dict[str, Callable] = {"ideal": lambda: run_ideal(lm, scenario, results)}

    def chat_hf() -> SystemRun:
        from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
        pipe = transformers.pipeline("text-generation", model=lm.model, tokenizer=lm.tokenizer, max_new_tokens=G,
                        min_new_tokens=G, do_sample=False, return_full_text=False)
        chat = ChatHuggingFace(llm=HuggingFacePipeline(pipeline=pipe), tokenizer=lm.tokenizer)

        def usage(reply, history):  # the whole prompt is recomputed: nothing reused
            return len(lm.encode(chat._to_chat_prompt(history))), 0
        return run_langchain("ChatHuggingFace", chat, lm, scenario, results, usage, tool_as_human=True)

    def li_hf() -> SystemRun:
        from llama_index.llms.huggingface import HuggingFaceLLM

        llm = HuggingFaceLLM(model=lm.model, tokenizer=lm.tokenizer, max_new_tokens=G, context_window=lm.max_positions,
                             generate_kwargs={"min_new_tokens": G, "do_sample": False}, is_chat_model=True,
                             device_map="cpu")
        def usage(resp, history):
            return len(lm.encode(llm.messages_to_prompt(history))), 0
        return run_llamaindex("LlamaIndex HuggingFaceLLM", llm, lm, scenario, results, usage)

    def chat_fb(speculation: bool = True) -> SystemRun:
        from langchain_flashback import ChatFlashBack

        chat = ChatFlashBack(model=spec, max_tokens=G, min_tokens=G, temperature=0.0, **spec_kwargs(speculation))
        fresh_engine(chat.engine)

        def usage(reply, history):
            meta = reply.usage_metadata or {}
            reused = (meta.get("input_token_details") or {}).get("cache_read", 0)
            return meta.get("input_tokens", 0) - reused, reused
        # the replies are free text (no tool call ids), so tool results go in as human messages, as for
        # ChatHuggingFace: the same text and token counts for both LangChain systems
        name = "ChatFlashBack" + ("" if speculation else " (no speculation)")
        return run_langchain(name, chat, lm, scenario, results, usage, tool_as_human=True)

    def li_fb(speculation: bool = True) -> SystemRun:
        from llama_index.llms.flashback import FlashBack

        llm = FlashBack(model=spec, max_tokens=G, min_tokens=G, temperature=0.0, **spec_kwargs(speculation))
        fresh_engine(llm.engine)

        def usage(resp, history):
            u = (resp.raw or {}).get("usage", {})
            cached = u.get("cached_tokens", u.get("cache_read", 0))
            return u.get("prompt_tokens", 0) - cached, cached
        name = "LlamaIndex FlashBackLLM" + ("" if speculation else " (no speculation)")
        return run_llamaindex(name, llm, lm, scenario, results, usage)

    systems.update({"ChatHuggingFace": chat_hf, "LlamaIndex HuggingFaceLLM": li_hf,
                    "ChatFlashBack": chat_fb, "LlamaIndex FlashBackLLM": li_fb})
    if no_speculation:
        systems.update({"ChatFlashBack (no speculation)": lambda: chat_fb(False),
                        "LlamaIndex FlashBackLLM (no speculation)": lambda: li_fb(False)})
    if only:
        systems = {k: v for k, v in systems.items() if k in only or k.removesuffix(" (no speculation)") in only}
    return systems


def run_flashback_calls(spec: str, scenario: Scenario, results: list[str], speculation: bool = True) -> SystemRun:
    """Ours in ``--tool-calls`` mode: every step a required search_logs call (grammar-constrained), its
    result appended as a ToolMessage; the model copies the suggested pattern into the arguments."""
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage

    from langchain_flashback import ChatFlashBack

    base = ChatFlashBack(model=spec, max_tokens=64, temperature=0.0, **spec_kwargs(speculation))
    fresh_engine(base.engine)
    chat = base.bind_tools(TOOLS[:1], tool_choice="search_logs")
    history: list = [SystemMessage(SYSTEM_CALLS), HumanMessage(QUESTION)]
    run = SystemRun("ChatFlashBack" + ("" if speculation else " (no speculation)"))
    for step in range(scenario.steps):
        t0 = time.perf_counter()
        ai = chat.invoke(history)
        dt = time.perf_counter() - t0
        usage = ai.usage_metadata or {}
        reused = usage.get("input_token_details", {}).get("cache_read", 0)
        rec = StepRecord(step + 1, dt, usage.get("input_tokens", 0) - reused, reused, usage.get("output_tokens", 0))
        _spec_fields(rec, ai.response_metadata)
        run.steps.append(rec)
        if not ai.tool_calls:
            raise RuntimeError(f"step {step + 1}: no tool call (finish_reason "
                               f"{ai.response_metadata.get('finish_reason')!r})")
        history += [ai, ToolMessage(results[step], tool_call_id=ai.tool_calls[0]["id"], name="search_logs")]
    return run


def build_tool_call_systems(lm, spec: str, scenario: Scenario, only: list[str] | None = None,
                            no_speculation: bool = False) -> dict[str, Callable]:
    """``--tool-calls`` systems: ours first (its reply lengths are what the baselines then generate, as
    ``bench long`` does), then the ideal loop and ChatHuggingFace with those lengths."""
    results = tool_results(lm, scenario)
    lengths: list[int] = []

    def ours(speculation: bool = True) -> SystemRun:
        run = run_flashback_calls(spec, scenario, results, speculation)
        if not lengths:
            lengths.extend(s.output_tokens for s in run.steps)
        return run

    def chat_hf() -> SystemRun:
        from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
        gen = lengths or [scenario.generate] * scenario.steps
        pipe = transformers.pipeline("text-generation", model=lm.model, tokenizer=lm.tokenizer, max_new_tokens=gen[0],
                        do_sample=False, return_full_text=False)
        chat = ChatHuggingFace(llm=HuggingFacePipeline(pipeline=pipe), tokenizer=lm.tokenizer)

        class PerStep:  # the same number of tokens per step as ours
            def __init__(self):
                self.i = 0

            def invoke(self, history):
                g = gen[min(self.i, len(gen) - 1)]
                self.i += 1
                return chat.invoke(history, pipeline_kwargs={"max_new_tokens": g, "min_new_tokens": g})

        def usage(reply, history):
            return len(lm.encode(chat._to_chat_prompt(history))), 0
        run = run_langchain("ChatHuggingFace", PerStep(), lm, scenario, results, usage, tool_as_human=True)
        for s, g in zip(run.steps, gen):
            s.output_tokens = g
        return run

    systems: dict[str, Callable] = {"ChatFlashBack": ours}
    if no_speculation:
        systems["ChatFlashBack (no speculation)"] = lambda: ours(False)
    systems.update({"ideal": lambda: run_ideal(lm, scenario, results, lengths or None),
                    "ChatHuggingFace": chat_hf})
    if only:
        systems = {k: v for k, v in systems.items() if k in only or k.removesuffix(" (no speculation)") in only}
    return systems


def bench_agent(lm, spec: str, scenario: Scenario, only: list[str] | None = None,
                no_speculation: bool = False) -> dict:
    runs = []
    systems = build_systems(lm, spec, scenario, only, no_speculation)
    for name, fn in tqdm(list(systems.items()), desc="bench agent", unit="system"):
        try:
            runs.append(fn())
        except ImportError as exc:
            runs.append(SystemRun(name, error=f"not installed: {exc}"))
    return summarize(runs, scenario, lm)
