"""tool_choice="none", the repeat-call guard and LlamaIndex's FunctionCallingLLM protocol through the
integrations (ChatFlashBack, FlashBack), on a tiny random model pushed to call a tool."""

from __future__ import annotations

import json

import pytest

from flashback_agents.constrained import ConstraintError


def call_text(name: str, args: dict) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


def push(engine, monkeypatch, text: str) -> None:
    """Make ``engine``'s model *want* to write ``text`` (a large bias on its next token at each step),
    in front of whatever the call's constraint adds (so a mask still wins)."""
    lm, prepare = engine.lm, engine.backend.prepare
    target = lm.encode(text) + [min(lm.eos_token_ids)]

    def pushed(ids, config, constraint):
        procs = prepare(ids, config, constraint)
        state = {"start": None}

        def pusher(input_ids, scores):
            if state["start"] is None:
                state["start"] = input_ids.shape[1]
            step = input_ids.shape[1] - state["start"]
            if step < len(target):
                scores = scores.clone()
                scores[:, target[step]] += 1000.0
            return scores

        return [pusher] + list(procs)

    monkeypatch.setattr(engine.backend, "prepare", pushed)
    monkeypatch.setattr(engine, "lazy_tool_grammar", False)  # the pushed call is the model's own text


# ---------------------------------------------------------------------------- LangChain
@pytest.fixture()
def lc_llm(tiny_dir_2k):
    pytest.importorskip("langchain_core")
    from langchain_flashback.chat_models import ChatFlashBack

    llm = ChatFlashBack(model=str(tiny_dir_2k), max_tokens=80)
    llm.engine.pool.clear()
    return llm


def _toggle():
    from langchain_core.tools import tool

    @tool
    def toggle(on: bool) -> str:
        """Turn something on or off."""
        return str(on)

    return toggle


def test_langchain_tool_choice_none_never_calls(lc_llm, monkeypatch):
    toggle = _toggle()
    push(lc_llm.engine, monkeypatch, call_text("toggle", {"on": True}))
    assert lc_llm.bind_tools([toggle]).invoke("turn it on").tool_calls  # pushed: under auto it calls
    bound = lc_llm.bind_tools([toggle], tool_choice="none")
    msg = bound.invoke("turn it on")
    assert msg.tool_calls == [] and "<tool_call>" not in msg.content
    assert msg.response_metadata["finish_reason"] != "tool_calls"
    chunks = list(bound.stream("turn it on"))
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    assert full.tool_calls == [] and full.tool_call_chunks == [] and "<tool_call>" not in full.content


def test_langchain_repeat_guard(lc_llm, tiny_dir_2k, monkeypatch):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    from langchain_flashback.chat_models import ChatFlashBack

    toggle = _toggle()
    push(lc_llm.engine, monkeypatch, call_text("toggle", {"on": True}))
    history = [HumanMessage("turn it on"),
               AIMessage("", tool_calls=[{"name": "toggle", "args": {"on": True}, "id": "c1"}]),
               ToolMessage("True", tool_call_id="c1")]
    allowed = lc_llm.bind_tools([toggle]).invoke(history, repeat_calls="allow")
    assert [c["args"] for c in allowed.tool_calls] == [{"on": True}]
    assert allowed.response_metadata["repeat_calls_forbidden"] == 0
    guarded = ChatFlashBack(model=str(tiny_dir_2k), max_tokens=80, repeat_calls="forbid")
    assert guarded.engine is lc_llm.engine
    msg = guarded.bind_tools([toggle]).invoke(history)
    assert msg.tool_calls == [] and msg.response_metadata["repeat_calls_forbidden"] == 1
    assert msg.response_metadata["tokens_discarded"] > 0
    per_call = lc_llm.bind_tools([toggle]).invoke(history, repeat_calls="forbid")  # a call's kwarg wins
    assert per_call.tool_calls == [] and per_call.response_metadata["repeat_calls_forbidden"] == 1
    with pytest.raises(ConstraintError, match="allow"):
        ChatFlashBack(model=str(tiny_dir_2k), repeat_calls="never").bind_tools([toggle]).invoke(history)


# ---------------------------------------------------------------------------- LlamaIndex
@pytest.fixture()
def li():
    pytest.importorskip("llama_index.core")
    from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
    from llama_index.core.tools import FunctionTool

    from llama_index.llms.flashback import FlashBack

    def lamp(on: bool) -> str:
        """Switch the lamp."""
        return "ok"

    return {"FlashBack": FlashBack, "ChatMessage": ChatMessage, "MessageRole": MessageRole,
            "ToolCallBlock": ToolCallBlock, "tool": FunctionTool.from_defaults(lamp)}


def test_llamaindex_tool_choice_none_never_calls(tiny_lm_2k, li, monkeypatch):
    llm = li["FlashBack"](tiny_lm_2k, max_tokens=80)
    llm.engine.pool.clear()
    push(llm.engine, monkeypatch, call_text("lamp", {"on": True}))
    tools = [li["tool"]]
    assert llm.get_tool_calls_from_response(llm.chat_with_tools(tools, user_msg="lamp on"))  # auto: it calls
    resp = llm.chat_with_tools(tools, user_msg="lamp on", tool_choice="none")
    assert llm.get_tool_calls_from_response(resp, error_on_no_tool_call=False) == []
    assert "<tool_call>" not in (resp.message.content or "")
    default_none = li["FlashBack"](tiny_lm_2k, max_tokens=80, tool_choice="none")  # the field applies too
    resp = default_none.chat_with_tools(tools, user_msg="lamp on")
    assert default_none.get_tool_calls_from_response(resp, error_on_no_tool_call=False) == []


def test_llamaindex_repeat_guard(tiny_lm_2k, li, monkeypatch):
    ChatMessage, ToolCallBlock = li["ChatMessage"], li["ToolCallBlock"]
    llm = li["FlashBack"](tiny_lm_2k, max_tokens=80, repeat_calls="forbid")
    llm.engine.pool.clear()
    push(llm.engine, monkeypatch, call_text("lamp", {"on": True}))
    history = [ChatMessage(role="user", content="lamp on"),
               ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="c1", tool_name="lamp",
                                                                   tool_kwargs={"on": True})]),
               ChatMessage(role="tool", content="ok", additional_kwargs={"tool_call_id": "c1"})]
    resp = llm.chat_with_tools([li["tool"]], chat_history=history)
    assert llm.get_tool_calls_from_response(resp, error_on_no_tool_call=False) == []
    assert resp.raw["usage"]["repeat_calls_forbidden"] == 1
    allowed = llm.chat_with_tools([li["tool"]], chat_history=history, repeat_calls="allow")  # per call
    assert [c.tool_kwargs for c in llm.get_tool_calls_from_response(allowed)] == [{"on": True}]
    assert allowed.raw["usage"]["repeat_calls_forbidden"] == 0


def test_llamaindex_follows_the_function_calling_protocol(tiny_lm_2k, li):
    FlashBack, user = li["FlashBack"], li["ChatMessage"](role="user", content="lamp on")
    tools = [li["tool"]]
    required = FlashBack(tiny_lm_2k, max_tokens=64, tool_choice="required")
    prep = required._prepare_chat_with_tools_compat  # the path chat_with_tools and agents take
    assert prep(tools, user_msg="lamp on")["tool_choice"] == "auto"  # tool_required=False: a call is optional
    assert prep(tools, user_msg="lamp on", tool_required=True)["tool_choice"] == "required"
    assert prep(tools, user_msg="lamp on", tool_choice="lamp")["tool_choice"] == "lamp"  # explicit wins
    assert FlashBack(tiny_lm_2k, tool_choice="none")._prepare_chat_with_tools(tools)["tool_choice"] == "none"
    assert FlashBack(tiny_lm_2k)._prepare_chat_with_tools(tools)["tool_choice"] == "auto"
    # plain chat(tools=...): the field is the default; tool_required, when given, decides
    assert required._chat_args([user], {"tools": tools})[1]["tool_choice"] == "required"
    assert required._chat_args([user], {"tools": tools, "tool_required": False})[1]["tool_choice"] == "auto"
    plain = FlashBack(tiny_lm_2k, max_tokens=64)
    assert plain._chat_args([user], {"tools": tools})[1]["tool_choice"] is None
    resp = plain.chat([user], tools=tools, tool_required=True)  # honoured: the reply is a valid call
    calls = plain.get_tool_calls_from_response(resp)
    assert [c.tool_name for c in calls] == ["lamp"] and isinstance(calls[0].tool_kwargs["on"], bool)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:inspect")  # the workflow inspects pydantic objects
async def test_function_agent_can_end_under_a_required_default(tiny_lm_2k, li, monkeypatch):
    """FunctionAgent calls (a)stream_chat_with_tools with tool_required=False: each step may answer in
    text, so the agent ends, even with tool_choice="required" as the LLM's default."""
    from llama_index.core.agent.workflow import FunctionAgent

    llm = li["FlashBack"](tiny_lm_2k, max_tokens=16, tool_choice="required")
    engine = llm.engine
    engine.pool.clear()
    push(engine, monkeypatch, "All done.")
    seen: list = []
    stream, achat = engine.astream_chat, engine.achat

    def spy_stream(messages, **kwargs):
        seen.append(kwargs.get("tool_choice"))
        return stream(messages, **kwargs)

    async def spy_achat(messages, **kwargs):
        seen.append(kwargs.get("tool_choice"))
        return await achat(messages, **kwargs)

    monkeypatch.setattr(engine, "astream_chat", spy_stream)
    monkeypatch.setattr(engine, "achat", spy_achat)
    agent = FunctionAgent(tools=[li["tool"]], llm=llm)
    result = await agent.run("Switch the lamp on.", max_iterations=3)
    assert seen == ["auto"]  # one step, a call optional (normalised to free decoding by the engine)
    assert "All done" in str(result)


# ---------------------------------------------------------------------------- two calls in one reply
TWO_CALLS = call_text("lamp", {"room": "hall"}) + call_text("lamp", {"room": "kitchen"})


def _lamp(made: list):
    def lamp(room: str) -> str:
        """Switch on the lamp of a room."""
        made.append(room)
        return f"The {room} lamp is on."
    return lamp


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_langchain_agent_runs_both_calls_of_one_reply(lc_llm, tiny_dir_2k, monkeypatch):
    """A reply with two calls (parallel calls, as the agent adapter is trained to make for two entities):
    create_agent runs both, sends both results, and the guard stops the model repeating them."""
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    from langchain_flashback.chat_models import ChatFlashBack

    made: list = []
    llm = ChatFlashBack(model=str(tiny_dir_2k), max_tokens=256)  # room for two calls of the tiny tokenizer
    assert llm.engine is lc_llm.engine
    push(llm.engine, monkeypatch, TWO_CALLS)
    agent = create_agent(llm, [tool(_lamp(made))])
    out = agent.invoke({"messages": [("user", "Switch on the hall and kitchen lamps.")]}, {"recursion_limit": 8})
    assert made == ["hall", "kitchen"]
    replies = [m for m in out["messages"] if m.type == "ai"]
    assert [[c["args"] for c in m.tool_calls] for m in replies] == [[{"room": "hall"}, {"room": "kitchen"}], []]
    assert len({c["id"] for c in replies[0].tool_calls}) == 2
    assert [m.type for m in out["messages"]].count("tool") == 2
    assert replies[-1].response_metadata["repeat_calls_forbidden"] == 2  # both calls were repeats


@pytest.mark.filterwarnings("ignore::DeprecationWarning:inspect")
async def test_function_agent_runs_both_calls_of_one_reply(tiny_lm_2k, li, monkeypatch):
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.tools import FunctionTool

    made: list = []
    llm = li["FlashBack"](tiny_lm_2k, max_tokens=256)
    llm.engine.pool.clear()
    push(llm.engine, monkeypatch, TWO_CALLS)
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(_lamp(made))], llm=llm)
    result = await agent.run("Switch on the hall and kitchen lamps.", max_iterations=4)
    assert made == ["hall", "kitchen"]
    assert [c.tool_kwargs for c in result.tool_calls] == [{"room": "hall"}, {"room": "kitchen"}]
    assert result.raw["usage"]["repeat_calls_forbidden"] == 2
