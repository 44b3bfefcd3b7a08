"""The frameworks' own context editing over our engine (issue 19, part 4).

LangChain v1 agents shrink their history with middleware (``ContextEditingMiddleware`` +
``ClearToolUsesEdit`` rewrites each request; ``SummarizationMiddleware`` replaces old messages by a
summary in the agent's state); LlamaIndex agents with a token-limited ``Memory`` (old messages flushed
out of the chat history). Each such edit changes the history in the middle: the engine must then reuse
everything before the first changed message, compute only the tail after it, once (the next call
without a new edit is a pure append again). :func:`edit_costs` measures that per model call.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_flashback import ChatFlashBack
from langchain_flashback.chat_models import to_flashback_messages
from pydantic import BaseModel, Field

from flashback_agents.context import common_prefix


class _Page(BaseModel):
    page: str = Field(max_length=6, description="page number")  # bounded: the tiny model's calls stay short


_PAGES = itertools.count(1)


@tool(args_schema=_Page)
def read_page(page: str) -> str:
    """Read one page of the server log."""
    n = next(_PAGES)  # every result differs (the tiny model asks for the same page every time)
    return " ".join(f"p{n}l{j} ERROR disk full on node{j % 7}" for j in range(14))


@dataclass
class Call:
    """One model call as the engine saw it."""

    ids: list[int]  # the rendered prompt
    prefix: int  # tokens of the messages before the first one that differs from the previous call's
    input: int
    cache_read: int
    output: int
    new: int  # tokens of the messages appended since the previous call (computed in any case)

    @property
    def computed(self) -> int:
        return self.input - self.cache_read

    @property
    def recomputed(self) -> int:
        """Tokens computed again because an earlier message changed (0 for a pure append)."""
        return self.computed - self.new


def _same(a: BaseMessage, b: BaseMessage) -> bool:
    return (a.type == b.type and a.content == b.content and getattr(a, "tool_calls", None) == getattr(b, "tool_calls", None)
            and getattr(a, "tool_call_id", None) == getattr(b, "tool_call_id", None))


def edit_costs(requests: list[tuple[list[BaseMessage], AIMessage]], render) -> list[Call]:
    """Per model call: (messages sent, reply) -> what was reused, appended and recomputed.

    ``render(messages, gen)``: the token ids our layout gives those messages."""
    calls: list[Call] = []
    prev: list[BaseMessage] = []
    held = 0  # tokens the engine held after the previous call (its prompt and reply)
    for msgs, reply in requests:
        k = 0
        while k < min(len(msgs), len(prev)) and _same(msgs[k], prev[k]):
            k += 1
        ids = render(msgs, True)
        # messages new since the previous call: the suffix of messages it did not see
        seen = {m.id for m in prev if m.id}
        n_new = 0
        while n_new < len(msgs) and msgs[len(msgs) - 1 - n_new].id not in seen:
            n_new += 1
        if prev:  # + what the layout adds after a held reply (the end-of-turn wrapper after its EOS)
            tail = len(render(prev, False)) - held
            new = len(ids) - len(render(msgs[:len(msgs) - n_new], False)) + tail
        else:
            new = len(ids)
        u = reply.usage_metadata
        calls.append(Call(ids, len(render(msgs[:k], False)), u["input_tokens"], u["input_token_details"]["cache_read"],
                          u["output_tokens"], new))
        prev = list(msgs) + [reply]
        held = u["input_tokens"] + u["output_tokens"]
    return calls


def check_costs(calls: list[Call]) -> list[int]:
    """Assert the engine's side of the bargain; return the indices of calls that followed an edit."""
    edits = []
    for n in range(1, len(calls)):
        c, p = calls[n], calls[n - 1]
        if c.prefix < len(p.ids) + p.output - 8:  # an earlier message changed: an edit
            edits.append(n)
            assert c.cache_read >= c.prefix, (n, c)  # everything before the first changed message reused
            assert c.computed <= len(c.ids) - c.prefix, (n, c)  # only the tail after it computed
        else:  # nothing changed: a pure append (the previous prompt and reply all reused)
            assert c.cache_read == p.input + p.output, (n, c, p)
            assert c.recomputed == 0, (n, c)
    return edits


def _lc_recorder():
    from langchain.agents.middleware import wrap_model_call

    seen: list[tuple[list[BaseMessage], AIMessage]] = []

    @wrap_model_call
    def record(request, handler):
        response = handler(request)
        seen.append((list(request.messages), response.result[-1]))
        return response

    return record, seen


def _force_tools(steps: int):
    from langchain.agents.middleware import wrap_model_call

    done = [0]  # model calls so far (a summary removes old AI messages from the state: count here)

    @wrap_model_call
    def force(request, handler):
        done[0] += 1
        return handler(request.override(tool_choice="any" if done[0] <= steps else "none"))

    return force


def run_lc_agent(llm: ChatFlashBack, middleware: list, steps: int, system: str = "You read log pages."):
    """A create_agent with one tool over ``llm``: ``steps`` forced tool calls, then an answer; returns
    the per-call costs, the edits, and the agent's final messages."""
    from langchain.agents import create_agent

    record, seen = _lc_recorder()
    agent = create_agent(llm, [read_page], system_prompt=system,
                         middleware=[_force_tools(steps), *middleware, record])
    result = agent.invoke({"messages": [HumanMessage("Read pages 1, 2, 3, ... in order.")]},
                          {"recursion_limit": 4 * steps + 8})
    engine = llm.engine
    tools = [convert_to_openai_tool(read_page)]
    sys = [m for m in result["messages"][:0]]  # noqa: F841 - the system prompt is added per request

    def render(msgs, gen):
        from langchain_core.messages import SystemMessage

        return engine.layout.render(to_flashback_messages([SystemMessage(system), *msgs]), tools=tools,
                                    add_generation_prompt=gen)

    calls = edit_costs(seen, render)
    for c, (msgs, _) in zip(calls, seen):
        assert c.input == len(c.ids), "the rendering here is not what the engine ran"
    return calls, check_costs(calls), result["messages"]


def _llm(model_dir) -> ChatFlashBack:
    llm = ChatFlashBack(model=str(model_dir), max_tokens=24, max_context_tokens=4096, on_overflow="evict")
    llm.engine.pool.clear()  # engines are shared per model: start each measurement with an empty pool
    return llm


# ---------------------------------------------------------------------------- LangChain
def test_clear_tool_uses_edit_recomputes_only_the_tail_each_time_it_moves(long_dir):
    from langchain.agents.middleware import ClearToolUsesEdit, ContextEditingMiddleware

    llm = _llm(long_dir)
    edit = ContextEditingMiddleware(edits=[ClearToolUsesEdit(trigger=600, keep=2)])
    calls, edits, _ = run_lc_agent(llm, [edit], steps=10)
    assert edits, "the edit never triggered"
    # the edit is re-applied to the full state at every call, so once triggered it clears one more
    # result per call: every call from then on is an edit, each recomputing the kept tail once
    assert edits == list(range(edits[0], len(calls) - 1)) or edits == list(range(edits[0], len(calls)))
    for n in edits:
        assert 0 < calls[n].recomputed <= len(calls[n].ids) - calls[n].prefix


def test_clear_tool_uses_edit_with_clear_at_least_is_one_edit_then_appends(long_dir):
    from langchain.agents.middleware import ClearToolUsesEdit, ContextEditingMiddleware

    llm = _llm(long_dir)
    edit = ContextEditingMiddleware(edits=[ClearToolUsesEdit(trigger=600, keep=2, clear_at_least=200)])
    calls, edits, _ = run_lc_agent(llm, [edit], steps=10)
    # the same oldest results are cleared at every call: one edit, pure appends after it
    assert len(edits) == 1, edits
    assert calls[edits[0]].recomputed > 0


def test_summarization_middleware_is_one_edit_per_summary(long_dir):
    from langchain.agents.middleware import SummarizationMiddleware

    llm = _llm(long_dir)
    summaries: list[int] = []

    def summarize(messages) -> str:  # a fixed summary (the tiny model cannot write one)
        summaries.append(len(messages))
        return "Pages 1 to 4 were read: disk full errors on every node."

    mw = SummarizationMiddleware(llm, trigger=("messages", 12), keep=("messages", 4), summarizer=summarize)
    calls, edits, messages = run_lc_agent(llm, [mw], steps=10)
    assert summaries and len(edits) == len(summaries), (edits, summaries)
    assert any("summary of the conversation" in str(m.content) for m in messages)
    for n in edits:  # the summary replaces the start of the history: everything after the system block
        assert calls[n].prefix < 600 and calls[n].recomputed > 0


# ---------------------------------------------------------------------------- LlamaIndex
def run_llamaindex_agent(llm, memory, turns: int, words: int = 4):
    """A FunctionAgent over ``llm`` with ``memory``, ``turns`` questions of 3 steps each; returns
    [(turn, rendered ids, usage, output ids)] per model call."""
    import asyncio

    from llama_index.core.agent.workflow import AgentInput, AgentOutput, FunctionAgent
    from llama_index.core.tools import FunctionTool

    def read_log_page(page: str) -> str:
        """Read one page of the server log."""
        return read_page.invoke({"page": page})

    tools = [FunctionTool.from_defaults(read_log_page)]
    agent = FunctionAgent(tools=tools, llm=llm, system_prompt="You read log pages.")
    calls: list[tuple[int, list[int], dict, list[int]]] = []

    async def turn(t: int) -> None:
        question = f"Read page {t}. " + "Look for disk errors on every node and report them. " * words
        handler = agent.run(question, memory=memory, max_iterations=3, early_stopping_method="generate")
        pending = None
        async for ev in handler.stream_events():
            if isinstance(ev, AgentInput):
                pending = ev.input
            elif isinstance(ev, AgentOutput) and ev.raw and pending is not None:
                calls.append((t, llm.render_ids(pending, tools=tools), ev.raw["usage"], ev.raw["output_ids"]))
                pending = None
        try:
            await handler
        except Exception:  # noqa: BLE001, S110 - max_iterations reached: the calls made are what we measure
            pass

    for t in range(turns):
        asyncio.run(turn(t))
    return calls


@pytest.mark.slow
def test_llamaindex_memory_flush_is_one_recompute_per_flush(long_dir):
    pytest.importorskip("llama_index.core")
    from llama_index.core.memory import Memory
    from llama_index.llms.flashback import FlashBack

    class EveryStepCalls(FlashBack):
        """A call at every agent step (FunctionAgent asks with tool_required=False, so the agent could end)."""

        def _prepare_chat_with_tools(self, tools, *args, tool_required=False, **kwargs):
            return super()._prepare_chat_with_tools(tools, *args, tool_required=True, **kwargs)

    llm = EveryStepCalls(str(long_dir), max_tokens=24, max_context_tokens=4096)
    llm.engine.pool.clear()
    memory = Memory.from_defaults(token_limit=300, chat_history_token_ratio=0.7, token_flush_size=100)
    calls = run_llamaindex_agent(llm, memory, turns=7)
    assert len(calls) >= 14
    held: list[list[int]] = []
    flushes, first_prompt = [], {}
    for t, ids, usage, out in calls:
        assert usage["prompt_tokens"] == len(ids)
        # whatever changed, everything before the first changed token is reused, the rest computed once
        best = max((common_prefix(ids, h) for h in held), default=0)
        assert usage["cached_tokens"] == best and usage["computed_tokens"] == len(ids) - best
        if t not in first_prompt:
            if t and best < len(first_prompt[t - 1]):  # the memory dropped old messages: a flush
                flushes.append(t)
            first_prompt[t] = ids
        else:  # within a turn: a pure append
            assert usage["cached_tokens"] == len(held[-1])
        held.append(ids + out)
    assert flushes, "the memory never flushed"
    assert len(flushes) < len(first_prompt) - 1, flushes  # a flush drops token_flush_size: not every turn


def test_a_reply_moved_by_an_edit_keeps_its_ids(tiny_lm):
    """After a summary moves a reply behind other messages, its ids stay those of the first render,
    even if the same text is generated again (with other ids) before the next call."""
    from flashback_agents import Layout, Message, ToolCall

    lay = Layout(tiny_lm)
    reply = Message("assistant", "", tool_calls=[ToolCall("read_page", {"page": "1"}, id="c1")])
    gen_a = lay.render_message(reply)[len(lay.generation_prompt()):-2] + [7]  # ids "generated" once
    lay.remember_reply(reply, gen_a, [1, 2, 3])
    moved = [Message("system", "s"), Message("user", "Here is a summary."), reply]
    first = lay.render(moved, add_generation_prompt=False)
    lay.remember_reply(reply, gen_a[:-1] + [8], [4, 5, 6])  # the same text again, other ids
    assert lay.render(moved, add_generation_prompt=False) == first
