"""A LangChain agent (langchain.agents.create_agent) with two tools on the default model.

From step 2 on, every model call must read from the cache everything previously sent and generated:
cache_read(step n) >= input_tokens(step n-1) + output_tokens(step n-1).
"""

from __future__ import annotations

import time
from typing import Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool

from langchain_flashback.chat_models import ChatFlashBack

LOG = {"ERROR": 3, "WARN": 5, "INFO": 12}
TOOL_STEPS = 5  # model calls that must call a tool; the 6th answers in text


@tool
def count_lines(level: Literal["ERROR", "WARN", "INFO"]) -> str:
    """Count the log lines with the given level."""
    return f"{LOG[level]} lines"


@tool
def show_line(number: int) -> str:
    """Show one line of the log by its number."""
    return f"line {number}: 2024-01-01 12:00:{number % 60:02d} ERROR disk full on /dev/sda{number % 4}"


@pytest.mark.model
def test_agent_six_steps_reuse_whole_prefix():
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call

    @wrap_model_call
    def force_tools_then_answer(request, handler):
        """Require a tool call for the first steps (constrained decoding), then let the model answer."""
        done = sum(1 for m in request.messages if isinstance(m, AIMessage))
        return handler(request.override(tool_choice="any" if done < TOOL_STEPS else "none"))

    llm = ChatFlashBack(max_tokens=48)
    agent = create_agent(llm, [count_lines, show_line], middleware=[force_tools_then_answer],
                         system_prompt="You analyse server logs with the tools. Be brief.")
    t0 = time.perf_counter()
    result = agent.invoke({"messages": [HumanMessage("How many ERROR and WARN lines are there? Show line 7.")]},
                          {"recursion_limit": 40})
    seconds = time.perf_counter() - t0
    msgs = result["messages"]
    ai = [m for m in msgs if isinstance(m, AIMessage)]
    tools = [m for m in msgs if isinstance(m, ToolMessage)]
    assert len(ai) >= 6, f"only {len(ai)} model steps"
    assert all(m.tool_calls for m in ai[:TOOL_STEPS]) and not ai[-1].tool_calls
    assert len(tools) >= TOOL_STEPS
    assert all(t.status != "error" for t in tools), [t.content for t in tools]
    # tool call ids survived the round trip: every result answers a call the model made
    call_ids = {c["id"] for m in ai for c in m.tool_calls}
    assert {t.tool_call_id for t in tools} <= call_ids
    report = []
    for n in range(1, len(ai)):
        prev, cur = ai[n - 1].usage_metadata, ai[n].usage_metadata
        read = cur["input_token_details"]["cache_read"]
        report.append((n + 1, cur["input_tokens"], read, cur["output_tokens"]))
        assert read >= prev["input_tokens"] + prev["output_tokens"], (n + 1, report)
        assert cur["input_tokens"] > prev["input_tokens"] + prev["output_tokens"]  # the conversation grew
    print(f"\nagent: {len(ai)} steps in {seconds:.1f}s; (step, input, cache_read, output): {report}")
