"""``eval agents``, its runners: one question through a real LangChain v1 agent or a LlamaIndex
``FunctionAgent`` (at most ``max_steps`` model calls), recorded as a :class:`RunRecord`. The
frameworks are optional dependencies, imported inside the runner that needs them."""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Sequence
from typing import Any, Callable

from .agent_questions import Question, tool_functions
from .agent_scoring import MAX_STEPS, RunRecord


def _call(name: Any, args: Any) -> dict:
    return {"name": str(name), "args": dict(args) if isinstance(args, dict) else args}


def _bound(question: Question, tools: Sequence[Callable[..., Any]] | None) -> Sequence[Callable[..., Any]]:
    """The functions an agent binds: ``tools`` when given, else the question's tools from :mod:`.agent_tools`."""
    return tool_functions(question.tools) if tools is None else tools


def langchain_recursion_limit(max_steps: int = MAX_STEPS) -> int:
    """LangGraph ``recursion_limit`` for at most ``max_steps`` model calls (model, tools, ..., model):
    the last model step may end the run, a call it makes raises ``GraphRecursionError``."""
    return 2 * max_steps


def run_langchain(question: Question, llm: Any, *, max_steps: int = MAX_STEPS, system_prompt: str | None = None,
                  adapter_label: str = "", tools: Sequence[Callable[..., Any]] | None = None) -> RunRecord:
    """``question`` through ``langchain.agents.create_agent(llm, tools)``; ``tools``: the functions to bind
    (default: the question's tools from :mod:`.agent_tools`)."""
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool as as_tool
    from langgraph.errors import GraphRecursionError

    rec = RunRecord(question.id, question.category, "langchain", adapter_label)
    t0 = time.perf_counter()
    state: dict = {}
    limited = False
    try:
        agent = create_agent(llm, [as_tool(fn) for fn in _bound(question, tools)],
                             system_prompt=system_prompt)
        for state in agent.stream({"messages": [("user", question.text)]},
                                  {"recursion_limit": langchain_recursion_limit(max_steps)}, stream_mode="values"):
            pass
    except GraphRecursionError:
        limited = True
    except Exception as exc:  # noqa: BLE001 - a failed run is a result, not a crash of the evaluation
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.seconds = time.perf_counter() - t0
    replies = [m for m in (state or {}).get("messages", []) if isinstance(m, AIMessage)]
    rec.steps = len(replies)
    rec.calls = [_call(tc["name"], tc["args"]) for m in replies for tc in m.tool_calls]
    rec.calls += [_call(tc.get("name"), tc.get("args")) for m in replies for tc in m.invalid_tool_calls]
    last = replies[-1] if replies else None
    rec.ended = (not limited and rec.error is None and last is not None and not last.tool_calls
                 and not last.invalid_tool_calls and rec.steps <= max_steps)
    if limited:
        rec.error = f"no final answer within {max_steps} model calls (GraphRecursionError)"
    if last is not None:
        rec.answer = last.text if isinstance(last.text, str) else str(last.text)
    return rec


async def _llamaindex_run(question: Question, llm: Any, max_steps: int, system_prompt: str | None,
                          rec: RunRecord, tools: Sequence[Callable[..., Any]]) -> None:
    from llama_index.core.agent.workflow import AgentOutput, FunctionAgent
    from llama_index.core.base.llms.types import ChatResponse
    from llama_index.core.tools import FunctionTool

    steps: list[list[Any]] = []  # the calls of each model reply
    last_text = ""
    limited = False
    try:
        agent = FunctionAgent(tools=[FunctionTool.from_defaults(fn) for fn in tools],
                              llm=llm, system_prompt=system_prompt)
        handler = agent.run(user_msg=question.text, max_iterations=max_steps)
        try:
            async for ev in handler.stream_events():
                if isinstance(ev, AgentOutput):
                    # read the calls off the reply message: the agent later appends the run's earlier
                    # calls to the final AgentOutput's tool_calls (the same object as the streamed one)
                    steps.append(list(llm.get_tool_calls_from_response(ChatResponse(message=ev.response),
                                                                       error_on_no_tool_call=False) or []))
                    last_text = ev.response.content or ""
            await handler
        except Exception as exc:  # WorkflowRuntimeError("Max iterations of N reached! ...")
            if "Max iterations" not in str(exc):
                raise
            limited = True
    except Exception as exc:  # noqa: BLE001 - a failed run is a result
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.steps = len(steps)
    rec.calls = [_call(tc.tool_name, tc.tool_kwargs) for calls in steps for tc in calls]
    # the limit is checked on the max_steps-th reply before it is read: a final reply there still ended
    rec.ended = rec.error is None and bool(steps) and not steps[-1] and rec.steps <= max_steps
    if limited and not rec.ended:
        rec.error = f"no final answer within {max_steps} model calls (max_iterations)"
    rec.answer = last_text


def run_llamaindex(question: Question, llm: Any, *, max_steps: int = MAX_STEPS, system_prompt: str | None = None,
                   adapter_label: str = "", tools: Sequence[Callable[..., Any]] | None = None) -> RunRecord:
    """``question`` through LlamaIndex ``FunctionAgent(tools, llm).run(max_iterations=max_steps)``;
    ``tools`` as in :func:`run_langchain`."""
    rec = RunRecord(question.id, question.category, "llamaindex", adapter_label)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # workflows lists an agent's methods with inspect.getmembers, which touches pydantic's deprecated
        # attributes (PydanticDeprecatedSince20/211, attributed to inspect): not ours, and noise
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="inspect")
        asyncio.run(_llamaindex_run(question, llm, max_steps, system_prompt, rec, _bound(question, tools)))
    rec.seconds = time.perf_counter() - t0
    return rec


RUNNERS: dict[str, Callable[..., RunRecord]] = {"langchain": run_langchain, "llamaindex": run_llamaindex}
