"""ChatFlashBack / FlashBackLLM / FlashBackRetriever on a tiny random model (fast, no real model)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import pytest
from langchain_core.documents import Document
from langchain_core.messages import (AIMessage, ChatMessage, FunctionMessage, HumanMessage, SystemMessage,
                                     ToolMessage)
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict
from flashback_agents.engines import shared_engine
from flashback_agents.context import ContextOverflowError
from flashback_agents.layout import LayoutError
from langchain_flashback.chat_models import ChatFlashBack, to_flashback_messages
from langchain_flashback.llms import FlashBackLLM
from langchain_flashback.retrievers import FlashBackRetriever, create_rag_chain, rag_messages


@pytest.fixture(scope="module")
def tiny_spec(tiny_dir_2k) -> str:
    """Path of the tiny random Llama with a 2048-token window (tiny_dir_2k, conftest.py) used as
    ChatFlashBack's model spec."""
    return str(tiny_dir_2k)


@pytest.fixture
def llm(tiny_spec) -> ChatFlashBack:
    return ChatFlashBack(model=tiny_spec, max_tokens=12)


@tool
def pick_level(level: Literal["ERROR", "INFO"]) -> str:
    """Pick a log level."""
    return level


@tool
def toggle(on: bool) -> str:
    """Turn something on or off."""
    return str(on)


class Verdict(BaseModel):
    """A verdict about a log."""

    level: Literal["ERROR", "INFO"] = Field(description="the level")
    ok: bool


class VerdictDict(TypedDict):
    """A verdict about a log."""

    level: Literal["ERROR", "INFO"]
    ok: bool


VERDICT_SCHEMA = {"title": "Verdict", "description": "A verdict about a log.", "type": "object",
                  "properties": {"level": {"type": "string", "enum": ["ERROR", "INFO"]}, "ok": {"type": "boolean"}},
                  "required": ["level", "ok"]}


# ----------------------------------------------------------------------------- conversion
def test_message_conversion():
    msgs = to_flashback_messages([
        SystemMessage("sys"), HumanMessage("q", additional_kwargs={"documents": ["d1", Document(page_content="d2")]}),
        AIMessage("", tool_calls=[{"name": "pick_level", "args": {"level": "ERROR"}, "id": "call_1"}]),
        ToolMessage("ERROR", tool_call_id="call_1"),
        ToolMessage("bad", tool_call_id="call_1", status="error"),
        ChatMessage(role="user", content="again"),
        HumanMessage([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]),
    ])
    assert [m.role for m in msgs] == ["system", "user", "assistant", "tool", "tool", "user", "user"]
    assert msgs[1].documents == ["d1", "d2"]
    assert msgs[2].tool_calls[0].id == "call_1" and msgs[2].tool_calls[0].arguments == {"level": "ERROR"}
    assert msgs[3].name == "pick_level"  # name recovered from the matching call
    assert msgs[4].content == "Error: bad"
    assert msgs[6].content == "ab"


@pytest.mark.parametrize("bad, needle", [
    (ChatMessage(role="critic", content="x"), "ChatMessage with role 'critic'"),
    (FunctionMessage(name="f", content="x"), "FunctionMessage"),
])
def test_unknown_message_types_are_clear_errors(llm, bad, needle):
    with pytest.raises(ValueError, match=needle):
        llm.invoke([HumanMessage("hi"), bad])


def test_image_content_is_a_clear_error(llm):
    with pytest.raises(ValueError, match="content block of type 'image'"):
        llm.invoke([HumanMessage([{"type": "image", "url": "http://x/y.png"}])])


def test_orphan_tool_message_is_a_clear_error(llm):
    with pytest.raises(LayoutError, match="call id 'call_zzz'"):
        llm.invoke([HumanMessage("hi"), ToolMessage("5", tool_call_id="call_zzz")])


def test_overflow_error_then_pool_still_usable(tiny_spec):
    small = ChatFlashBack(model=tiny_spec, max_tokens=4, max_context_tokens=64)
    with pytest.raises(ContextOverflowError, match="needs .* tokens but the limit is 64"):
        small.invoke("word " * 200)
    assert isinstance(small.invoke("hi"), AIMessage)


# ----------------------------------------------------------------------------- generation
def test_invoke_usage_and_metadata(llm):
    r = llm.invoke("Hello")
    u = r.usage_metadata
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    assert 0 <= u["input_token_details"]["cache_read"] <= u["input_tokens"]
    assert r.response_metadata["model_provider"] == "flashback"
    assert r.response_metadata["model_name"]
    again = llm.invoke("Hello")
    assert again.usage_metadata["input_token_details"]["cache_read"] == u["input_tokens"]
    assert again.content == r.content


def test_stream_equals_invoke_and_usage_once(llm):
    whole = llm.invoke("Write a log line")
    chunks = list(llm.stream("Write a log line"))
    assert [c.chunk_position for c in chunks].count("last") == 1 and chunks[-1].chunk_position == "last"
    assert sum(1 for c in chunks if c.usage_metadata) == 1
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    assert full.content == whole.content
    assert full.usage_metadata["output_tokens"] == whole.usage_metadata["output_tokens"]
    streaming = ChatFlashBack(model=llm.model, max_tokens=12, streaming=True)
    assert streaming.invoke("Write a log line").content == whole.content


async def test_async_equals_sync(llm):
    whole = llm.invoke("async line")
    assert (await llm.ainvoke("async line")).content == whole.content
    full = None
    async for c in llm.astream("async line"):
        full = c if full is None else full + c
    assert full.content == whole.content and full.chunk_position == "last"


def test_batch_matches_sequential(llm):
    prompts = ["first conversation", "second one", "third"]
    seq = [llm.invoke(p).content for p in prompts]
    shared_engine(llm.model).pool.clear()
    assert [m.content for m in llm.batch(prompts)] == seq
    shared_engine(llm.model).pool.clear()
    assert [m.content for m in asyncio.run(llm.abatch(prompts))] == seq


def test_stop_sequence(llm):
    base = llm.invoke("stop test").content
    if len(base) > 3:
        stop = base[2:4]
        cut = llm.invoke("stop test", stop=[stop]).content
        assert stop not in cut and base.startswith(cut)


# ----------------------------------------------------------------------------- tools
def test_bind_tools_any_and_round_trip(llm):
    m = llm.bind_tools([pick_level, toggle], tool_choice="any")
    r1 = m.invoke("pick one")
    assert len(r1.tool_calls) == 1 and r1.tool_calls[0]["name"] in ("pick_level", "toggle")
    call = r1.tool_calls[0]
    assert call["id"].startswith("call_")
    result = (pick_level if call["name"] == "pick_level" else toggle).invoke(call)
    assert result.tool_call_id == call["id"]  # ids survive the round trip
    r2 = llm.bind_tools([pick_level, toggle]).invoke([HumanMessage("pick one"), r1, result])
    u1, u2 = r1.usage_metadata, r2.usage_metadata
    assert u2["input_token_details"]["cache_read"] >= u1["input_tokens"] + u1["output_tokens"]


def test_tool_choice_by_name_and_streaming_chunks(llm):
    m = llm.bind_tools([pick_level, toggle], tool_choice="toggle")
    r = m.invoke("turn it on")
    assert r.tool_calls[0]["name"] == "toggle" and isinstance(r.tool_calls[0]["args"]["on"], bool)
    chunks = list(m.stream("turn it on"))
    assert any(c.tool_call_chunks for c in chunks)
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    assert full.tool_calls[0]["name"] == "toggle"
    assert full.tool_calls[0]["args"] == r.tool_calls[0]["args"]


def test_bind_tools_rejects_unknown_choice(llm):
    with pytest.raises(ValueError, match="'nope' is not one of"):
        llm.bind_tools([toggle], tool_choice="nope")


def test_tool_schemas_render_deterministically(llm):
    a = llm.bind_tools([pick_level, toggle])
    b = llm.bind_tools([pick_level, toggle])
    assert a.kwargs["tools"] == b.kwargs["tools"]
    eng = shared_engine(llm.model)
    msgs = to_flashback_messages([HumanMessage("x")])
    assert eng.layout.render(msgs, tools=a.kwargs["tools"]) == eng.layout.render(msgs, tools=b.kwargs["tools"])


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
@pytest.mark.parametrize("schema", [Verdict, VerdictDict, VERDICT_SCHEMA], ids=["pydantic", "typeddict", "json"])
def test_structured_output(llm, schema, method):
    out = llm.with_structured_output(schema, method=method).invoke("judge this log")
    if schema is Verdict:
        assert isinstance(out, Verdict)
    else:
        assert set(out) == {"level", "ok"} and out["level"] in ("ERROR", "INFO")


def test_structured_output_include_raw(llm):
    out = llm.with_structured_output(Verdict, include_raw=True).invoke("judge")
    assert isinstance(out["raw"], AIMessage) and isinstance(out["parsed"], Verdict) and out["parsing_error"] is None


# ----------------------------------------------------------------------------- LLM, retriever, RAG
def test_flashback_llm(tiny_spec):
    llm = FlashBackLLM(model=tiny_spec, max_tokens=8)
    text = llm.invoke("2024-01-01 ERROR disk")
    assert "".join(llm.stream("2024-01-01 ERROR disk")) == text
    assert asyncio.run(llm.ainvoke("2024-01-01 ERROR disk")) == text
    res = llm.generate(["2024-01-01 ERROR disk full"])
    assert res.generations[0][0].text is not None
    eng = shared_engine(tiny_spec)
    r = eng.complete("2024-01-01 ERROR disk full and more", None)
    assert r.usage.cache_read > 0  # same pool as the chat model


@dataclass
class _Hit:
    text: str
    id: str
    score: float
    metadata: dict = field(default_factory=dict)


class _FakeRetriever:
    def __init__(self):
        self.docs = [_Hit("disk full on node 3", "d1", 0.9, {"source": "a.log"}),
                     _Hit("server started", "d2", 0.5)]

    def retrieve(self, query: str, k: int = 4):
        return self.docs[:k]


def test_retriever_and_rag_chain(llm):
    retriever = FlashBackRetriever(retriever=_FakeRetriever(), k=2)
    docs = retriever.invoke("why did it fail?")
    assert [d.page_content for d in docs] == ["disk full on node 3", "server started"]
    assert docs[0].metadata == {"source": "a.log", "id": "d1", "score": 0.9} and docs[0].id == "d1"
    assert [d.id for d in asyncio.run(retriever.ainvoke("x"))] == ["d1", "d2"]
    # append layout: question first, each document marked after it
    msgs = to_flashback_messages(rag_messages("why?", docs))
    eng = shared_engine(llm.model)
    ids = eng.layout.render(msgs)
    left, right = eng.lm.marker_ids
    q = eng.layout.render(msgs[:1] + [msgs[1].__class__("user", "why?")], add_generation_prompt=False)
    assert ids[:len(q)] == q and ids.count(left) == 2 and ids.count(right) == 2
    chain = create_rag_chain(llm, retriever, return_documents=True)
    out = chain.invoke({"question": "why did it fail?"})
    assert isinstance(out["answer"], str) and len(out["documents"]) == 2
    assert out["message"].usage_metadata["input_tokens"] == len(eng.layout.render(
        to_flashback_messages(rag_messages("why did it fail?", docs))))
    assert isinstance(create_rag_chain(llm, retriever).invoke("why?"), str)
