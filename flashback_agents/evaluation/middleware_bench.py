"""The frameworks' own context editing over our engine, measured (issue 19, part 4).

One LangChain ``create_agent`` over ``ChatFlashBack`` per way of keeping the history short: the
engine's own compaction only, ``ContextEditingMiddleware`` + ``ClearToolUsesEdit`` (with and without
``clear_at_least``), ``SummarizationMiddleware`` (the summary written by the same model); and a
LlamaIndex ``FunctionAgent`` with a token-limited ``Memory``. Every model call records the prompt
tokens, what came from the cache, what was computed, and whether an earlier message had changed
(an *edit*): ``recomputed`` is what was computed beyond the messages new since the previous call.

    python -m flashback_agents.evaluation.middleware_bench [--steps 24] [--json out.json]
"""

from __future__ import annotations

import asyncio
import argparse
import itertools
import json
import time
from dataclasses import asdict, dataclass, field

from ..models import DEFAULT_MODEL, load_model
from .agent_bench import QUESTION, SYSTEM, Scenario, tool_results


@dataclass
class CallCost:
    step: int
    seconds: float
    input: int
    cache_read: int
    output: int
    compacted: bool = False  # the engine compacted at this call

    @property
    def computed(self) -> int:
        return self.input - self.cache_read


@dataclass
class Run:
    name: str
    calls: list[CallCost] = field(default_factory=list)
    summary_s: float = 0.0  # time spent writing summaries (SummarizationMiddleware)
    summary_calls: int = 0

    def report(self) -> dict:
        edits = [c for p, c in zip(self.calls, self.calls[1:]) if c.cache_read < p.input + p.output]
        appends = len(self.calls) - 1 - len(edits)
        return {"system": self.name, "calls": len(self.calls),
                "total_s": round(sum(c.seconds for c in self.calls) + self.summary_s, 2),
                "edits": len(edits), "pure_appends": appends,
                "edit_steps": [c.step for c in edits],
                "tokens_computed": sum(c.computed for c in self.calls),
                "computed_per_edit": round(sum(c.computed for c in edits) / len(edits)) if edits else 0,
                "mean_edit_s": round(sum(c.seconds for c in edits) / len(edits), 2) if edits else 0,
                "mean_append_s": round(sum(c.seconds for p, c in zip(self.calls, self.calls[1:])
                                           if c.cache_read >= p.input + p.output) / max(1, appends), 2),
                "summary_calls": self.summary_calls, "summary_s": round(self.summary_s, 2),
                "last_prompt": self.calls[-1].input if self.calls else 0,
                "per_call": [asdict(c) | {"computed": c.computed} for c in self.calls]}


def _search_tool(results: list[str]):
    from langchain_core.tools import tool
    from pydantic import BaseModel, Field

    class Args(BaseModel):
        pattern: str = Field(max_length=32, description="regular expression")

    counter = itertools.count()

    @tool("search_logs", args_schema=Args)
    def search_logs(pattern: str) -> str:
        """Search the log file with a regular expression."""
        return results[next(counter) % len(results)]

    return search_logs


def run_langchain(name: str, llm, middleware: list, results: list[str], steps: int) -> Run:
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call
    from langchain_core.messages import HumanMessage

    run = Run(name)
    done = [0]

    @wrap_model_call
    def force(request, handler):  # a tool call at every step, like `bench long`
        done[0] += 1
        return handler(request.override(tool_choice="search_logs" if done[0] <= steps else "none"))

    @wrap_model_call
    def record(request, handler):
        t0 = time.perf_counter()
        response = handler(request)
        dt = time.perf_counter() - t0
        ai = response.result[-1]
        u, meta = ai.usage_metadata, ai.response_metadata
        run.calls.append(CallCost(len(run.calls) + 1, dt, u["input_tokens"], u["input_token_details"]["cache_read"],
                                  u["output_tokens"], bool(meta.get("compacted"))))
        return response

    agent = create_agent(llm, [_search_tool(results)], system_prompt=SYSTEM, middleware=[force, *middleware, record])
    try:
        agent.invoke({"messages": [HumanMessage(QUESTION)]}, {"recursion_limit": 4 * steps + 8})
    except Exception as exc:  # noqa: BLE001 - report what ran
        run.name += f" (stopped: {type(exc).__name__})"
    return run


def run_llamaindex(lm, spec: str, results: list[str], turns: int, budget: int, token_limit: int,
                   flush: int) -> Run:
    from llama_index.core.agent.workflow import AgentInput, AgentOutput, FunctionAgent
    from llama_index.core.memory import Memory
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.flashback import FlashBack

    counter = itertools.count()

    def search_logs(pattern: str) -> str:
        """Search the log file with a regular expression."""
        return results[next(counter) % len(results)]

    llm = FlashBack(spec, max_tokens=24, tool_choice="required", max_context_tokens=budget)
    llm.engine.pool.clear()
    memory = Memory.from_defaults(token_limit=token_limit, chat_history_token_ratio=0.7, token_flush_size=flush)
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(search_logs)], llm=llm, system_prompt=SYSTEM)
    run = Run(f"LlamaIndex FunctionAgent + Memory(token_limit={token_limit}, flush={flush})")

    async def turn(t: int) -> None:
        # two tool calls per turn, then the agent stops ("force": no extra tool-less model call, which
        # would render another system block); the question is long so that the memory has to flush
        question = f"Turn {t}: {QUESTION} " + "Check the disk, network and auth components, each node. " * 8
        handler = agent.run(question, memory=memory, max_iterations=2, early_stopping_method="force")
        t0 = time.perf_counter()
        async for ev in handler.stream_events():
            if isinstance(ev, AgentInput):
                t0 = time.perf_counter()
            elif isinstance(ev, AgentOutput) and ev.raw:
                u = ev.raw["usage"]
                run.calls.append(CallCost(len(run.calls) + 1, time.perf_counter() - t0, u["prompt_tokens"],
                                          u["cached_tokens"], len(ev.raw["output_ids"]),
                                          bool(ev.raw.get("compacted"))))
        try:
            await handler
        except Exception:  # noqa: BLE001, S110 - max_iterations reached
            pass

    for t in range(turns):
        asyncio.run(turn(t))
    return run


def main(argv: list[str] | None = None) -> dict:
    from langchain.agents.middleware import (
        ClearToolUsesEdit,
        ContextEditingMiddleware,
        SummarizationMiddleware,
    )
    from langchain_flashback import ChatFlashBack

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--tool-tokens", type=int, default=256)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--only", default="", help="comma-separated subset: engine,clear,clear_at_least,summary,llamaindex")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    lm = load_model(DEFAULT_MODEL, adapter=None)
    results = tool_results(lm, Scenario(args.steps, args.tool_tokens, 24))
    only = set(filter(None, args.only.split(",")))
    trigger = int(args.budget * 0.6)  # approximate tokens (chars / 4): about 0.75 of the budget in real tokens

    def llm():
        chat = ChatFlashBack(max_tokens=24, max_context_tokens=args.budget, on_overflow="evict")
        chat.engine.pool.clear()
        return chat

    runs: list[Run] = []
    if not only or "engine" in only:
        runs.append(run_langchain("engine compaction only (evict)", llm(), [], results, args.steps))
    if not only or "clear" in only:
        mw = ContextEditingMiddleware(edits=[ClearToolUsesEdit(trigger=trigger, keep=3)])
        runs.append(run_langchain(f"ClearToolUsesEdit(trigger={trigger}, keep=3)", llm(), [mw], results, args.steps))
    if not only or "clear_at_least" in only:
        mw = ContextEditingMiddleware(edits=[ClearToolUsesEdit(trigger=trigger, keep=3, clear_at_least=trigger // 2)])
        runs.append(run_langchain(f"ClearToolUsesEdit(trigger={trigger}, keep=3, clear_at_least={trigger // 2})",
                                  llm(), [mw], results, args.steps))
    if not only or "summary" in only:
        chat = llm()
        summarizer = ChatFlashBack(max_tokens=96, max_context_tokens=args.budget, on_overflow="evict")
        run = Run("")

        def summarize(messages) -> str:
            from langchain_core.messages import HumanMessage

            t0 = time.perf_counter()
            text = "\n".join(f"{m.type}: {str(m.content)[:400]}" for m in messages)[-6000:]
            out = summarizer.invoke([HumanMessage("Summarise these agent steps in a few lines:\n" + text)])
            run.summary_s += time.perf_counter() - t0
            run.summary_calls += 1
            return str(out.content)

        mw = SummarizationMiddleware(chat, trigger=("tokens", trigger), keep=("messages", 6), summarizer=summarize)
        got = run_langchain(f"SummarizationMiddleware(trigger=tokens {trigger}, keep 6 messages)", chat, [mw],
                            results, args.steps)
        got.summary_s, got.summary_calls = run.summary_s, run.summary_calls
        runs.append(got)
    if not only or "llamaindex" in only:
        runs.append(run_llamaindex(lm, DEFAULT_MODEL, results, turns=max(4, args.steps // 3), budget=args.budget,
                                   token_limit=600, flush=200))
    out = {"model": lm.name, "steps": args.steps, "tool_tokens": args.tool_tokens, "budget": args.budget,
           "systems": [r.report() for r in runs]}
    for s in out["systems"]:
        print(f"{s['system']:<70} calls {s['calls']:3d} total {s['total_s']:7.1f}s edits {s['edits']:3d} "
              f"appends {s['pure_appends']:3d} computed {s['tokens_computed']:6d} per edit {s['computed_per_edit']:5d} "
              f"edit {s['mean_edit_s']:.2f}s append {s['mean_append_s']:.2f}s summaries {s['summary_calls']} "
              f"({s['summary_s']:.1f}s) last prompt {s['last_prompt']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
