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
from tqdm.auto import tqdm

from ..kvcache import forward
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


@dataclass
class StepRecord:
    step: int
    seconds: float
    tokens_computed: int
    tokens_reused: int


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
    return out


@torch.inference_mode()
def run_ideal(lm, scenario: Scenario, results: list[str]) -> SystemRun:
    """The floor: one DynamicCache, prefill only the new tokens, G greedy decode steps."""
    from transformers.cache_utils import DynamicCache

    from ..layout import Layout, Message

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
        for _ in range(scenario.generate - 1):
            gen.append(tok)
            out = forward(model, torch.tensor([[tok]]), cache, logits_to_keep=1)
            tok = int(out.logits[0, -1].argmax())
        gen.append(tok)
        held = ids + gen[:-1]  # the last sampled token is fed with the next prefill
        run.steps.append(StepRecord(step + 1, time.perf_counter() - t0, len(new), len(ids) - len(new)))
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
        run.steps.append(StepRecord(step + 1, dt, computed, reused))
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
        run.steps.append(StepRecord(step + 1, dt, computed, reused))
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
               "steps": [asdict(s) for s in r.steps]}
        if r.steps and ideal:
            row["vs_ideal_total"] = r.total / ideal.total
            row["vs_ideal_last"] = r.last / ideal.last
        if r.steps and hf:
            row["speedup_vs_chathf_total"] = hf.total / r.total
            row["speedup_vs_chathf_last"] = hf.last / r.last
        rows.append(row)
    return {"model": lm.name, "dtype": str(lm.dtype), "threads": torch.get_num_threads(),
            "scenario": asdict(scenario), "systems": rows}


def build_systems(lm, spec: str, scenario: Scenario, only: list[str] | None = None) -> dict[str, Callable]:
    """Name -> zero-argument runner, for each system whose library is installed."""
    results = tool_results(lm, scenario)
    G = scenario.generate
    systems: dict[str, Callable] = {"ideal": lambda: run_ideal(lm, scenario, results)}

    def chat_hf() -> SystemRun:
        from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
        from transformers import pipeline

        pipe = pipeline("text-generation", model=lm.model, tokenizer=lm.tokenizer, max_new_tokens=G,
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

    def chat_fb() -> SystemRun:
        from langchain_flashback import ChatFlashBack

        chat = ChatFlashBack(model=spec, max_tokens=G, min_tokens=G, temperature=0.0)

        def usage(reply, history):
            meta = reply.usage_metadata or {}
            reused = (meta.get("input_token_details") or {}).get("cache_read", 0)
            return meta.get("input_tokens", 0) - reused, reused
        # the replies are free text (no tool call ids), so tool results go in as human messages, as for
        # ChatHuggingFace: the same text and token counts for both LangChain systems
        return run_langchain("ChatFlashBack", chat, lm, scenario, results, usage, tool_as_human=True)

    def li_fb() -> SystemRun:
        from llama_index.llms.flashback import FlashBack

        llm = FlashBack(model=spec, max_tokens=G, min_tokens=G, temperature=0.0)

        def usage(resp, history):
            u = (resp.raw or {}).get("usage", {})
            cached = u.get("cached_tokens", u.get("cache_read", 0))
            return u.get("prompt_tokens", 0) - cached, cached
        return run_llamaindex("LlamaIndex FlashBackLLM", llm, lm, scenario, results, usage)

    systems.update({"ChatHuggingFace": chat_hf, "LlamaIndex HuggingFaceLLM": li_hf,
                    "ChatFlashBack": chat_fb, "LlamaIndex FlashBackLLM": li_fb})
    if only:
        systems = {k: v for k, v in systems.items() if k in only}
    return systems


def bench_agent(lm, spec: str, scenario: Scenario, only: list[str] | None = None) -> dict:
    runs = []
    systems = build_systems(lm, spec, scenario, only)
    for name, fn in tqdm(list(systems.items()), desc="bench agent", unit="system"):
        try:
            runs.append(fn())
        except ImportError as exc:
            runs.append(SystemRun(name, error=f"not installed: {exc}"))
    return summarize(runs, scenario, lm)
