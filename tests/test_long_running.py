"""Long-running agents through the integrations: compaction keeps going, and re-sent history is a pure append."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage, trim_messages

from langchain_flashback import ChatFlashBack


# a short, bounded argument keeps each constrained call to a few tokens
read_page = {"type": "function", "function": {
    "name": "read_page", "description": "Read one page of the log file.",
    "parameters": {"type": "object", "properties": {"page": {"type": "string", "maxLength": 6}},
                   "required": ["page"]}}}


def _page(i: int, words: int) -> str:
    return " ".join(f"p{i}l{j} ERROR disk full on node{j % 7}" for j in range(words))


def _run_agent(llm, steps: int, words: int):
    bound = llm.bind_tools([read_page], tool_choice="read_page")
    history = [SystemMessage("You read log pages one by one."), HumanMessage("Read every page.")]
    records = []
    for i in range(steps):
        ai = bound.invoke(history)
        assert isinstance(ai, AIMessage) and ai.tool_calls, f"step {i + 1}: no tool call"
        meta, usage = ai.response_metadata, ai.usage_metadata
        records.append((usage["input_tokens"], usage["output_tokens"],
                        usage["input_token_details"]["cache_read"], meta["compacted"], meta["tokens_recomputed"],
                        meta["tokens_evicted"]))
        history += [ai, ToolMessage(_page(i, words), tool_call_id=ai.tool_calls[0]["id"], name="read_page")]
    return records


def _check_records(records):
    compactions = 0
    for n in range(1, len(records)):
        prev_in, prev_out = records[n - 1][0], records[n - 1][1]
        _, _, cache_read, compacted, recomputed, evicted = records[n]
        if not compacted:  # a pure append: all of the previous prompt and reply came from the cache
            assert cache_read == prev_in + prev_out, (n + 1, records[n - 1], records[n])
        else:  # exactly the cached tail after the first evicted block is recomputed, once
            compactions += 1
            assert evicted > 0
            assert cache_read + recomputed <= prev_in + prev_out
            assert recomputed > 0 or cache_read == prev_in + prev_out
    return compactions


def test_tiny_agent_keeps_running_under_evict(long_dir):
    llm = ChatFlashBack(model=str(long_dir), max_tokens=48, max_context_tokens=1500, on_overflow="evict")
    records = _run_agent(llm, steps=9, words=12)
    assert _check_records(records) >= 1
    assert all(r[0] <= 1500 for r in records)


def test_error_mode_refuses_and_pool_stays_usable(tiny_model_dir):
    llm = ChatFlashBack(model=str(tiny_model_dir), max_tokens=8, max_context_tokens=300, on_overflow="error")
    with pytest.raises(Exception, match="Context overflow"):
        llm.invoke([HumanMessage("word " * 400)])
    assert llm.invoke([HumanMessage("hello")]).usage_metadata["input_tokens"] > 0


def test_trim_messages_rewrite_recomputes_only_the_changed_tail(tiny_model_dir):
    llm = ChatFlashBack(model=str(tiny_model_dir), max_tokens=6, max_context_tokens=2048, on_overflow="error")
    engine = llm.engine
    history = [SystemMessage("sys"), HumanMessage("q0")]
    for i in range(6):
        ai = llm.invoke(history)
        history += [ai, HumanMessage(f"question number {i + 1} " + "x " * 20)]
    before = llm.invoke(history)
    trimmed = trim_messages(history, max_tokens=6, token_counter=len, strategy="last", include_system=True,
                            start_on="human")
    assert len(trimmed) < len(history)
    from langchain_flashback.chat_models import to_flashback_messages

    new_ids = engine.layout.render(to_flashback_messages(trimmed))
    best = max(_lcp(ctx_ids, new_ids) for ctx_ids in [e.ctx.token_ids for e in engine.pool._entries])
    after = llm.invoke(trimmed)
    u = after.usage_metadata
    assert u["input_token_details"]["cache_read"] == best
    assert after.response_metadata["computed_tokens"] == u["input_tokens"] - best
    assert before.usage_metadata["input_tokens"] > u["input_tokens"]


def _lcp(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.model
def test_sixty_step_tool_conversation_on_default_model():
    llm = ChatFlashBack(max_tokens=32, max_context_tokens=4096, on_overflow="evict")
    records = _run_agent(llm, steps=60, words=16)
    assert len(records) == 60
    assert _check_records(records) >= 2
