"""The shared chat service (flashback_agents.chat): prefix reuse, tool calls, constraints, errors."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from flashback_agents.chat import ChatEngine, ChatReply, normalize_tool_choice, parse_tool_calls
from flashback_agents.constrained import GRAMMARS, GrammarCache, tool_call_schema
from flashback_agents.engines import EngineSettings, local_engine, shared_engine
from flashback_agents.context import ContextOverflowError
from flashback_agents.generation import GenerationConfig
from flashback_agents.layout import LayoutError, Message, ToolCall

# Bounded argument types, so that even the random tiny model finishes a constrained call quickly.
TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Add two digits.",
                                      "parameters": {"type": "object",
                                                     "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                                                    "b": {"type": "integer", "minimum": 0, "maximum": 9}},
                                                     "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "echo", "description": "Echo a word.",
                                      "parameters": {"type": "object",
                                                     "properties": {"w": {"enum": ["hello", "bye"]}},
                                                     "required": ["w"]}}},
]


def cfg(n: int = 12) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n)


@pytest.fixture(scope="module")
def engine(tiny_lm_2k):
    return local_engine(tiny_lm_2k)


def test_shared_engine_is_per_arguments(tiny_lm_2k):
    a = shared_engine(tiny_lm_2k)
    assert shared_engine(tiny_lm_2k) is a
    b = shared_engine(tiny_lm_2k, max_cached_bytes=1 << 20)
    assert b is not a and b.lm is a.lm
    assert b.layout is a.layout  # one reply memo per model
    assert a.model_name == tiny_lm_2k.name


def test_chat_usage_and_pure_append_next_step(engine):
    msgs = [Message("user", "Count the errors in the log.")]
    ids = engine.layout.render(msgs)
    r1 = engine.chat(msgs, config=cfg(8))
    assert isinstance(r1, ChatReply)
    assert r1.usage.input_tokens == len(ids)
    assert r1.usage.output_tokens == len(r1.token_ids) > 0
    assert r1.usage.cache_read + r1.usage.computed == len(ids)
    msgs2 = msgs + [Message("assistant", r1.text, tool_calls=r1.tool_calls), Message("user", "And warnings?")]
    r2 = engine.chat(msgs2, config=cfg(8))
    # everything sent and generated before is reused: previous prompt + previous reply
    assert r2.usage.cache_read >= r1.usage.input_tokens + r1.usage.output_tokens
    assert r2.usage.computed == r2.usage.input_tokens - r2.usage.cache_read


def test_reply_memo_renders_generated_ids(engine):
    msgs = [Message("user", "say something")]
    r = engine.chat(msgs, config=cfg(6))
    rendered = engine.layout.render_message(Message("assistant", r.text, tool_calls=r.tool_calls))
    body = r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids  # EOS becomes the turn end
    gp = engine.layout.generation_prompt()
    assert rendered[len(gp):len(gp) + len(body)] == body


def test_stream_equals_chat_greedy(engine):
    msgs = [Message("user", "Write a log line.")]
    whole = engine.chat(msgs, config=cfg(16))
    run = engine.stream_chat(msgs, config=cfg(16))
    deltas = list(run)
    assert "".join(deltas) == whole.text
    assert run.reply.token_ids == whole.token_ids
    assert run.reply.usage.cache_read == whole.usage.input_tokens  # second time: all cached


@pytest.mark.parametrize("choice", ["any", "required", "echo"])
def test_required_tool_call_is_always_valid(engine, choice):
    """Even a random model produces a valid call when one is required (xgrammar constraint)."""
    r = engine.chat([Message("user", "use a tool")], tools=TOOLS, tool_choice=choice, config=cfg(4))
    assert r.finish_reason == "tool_calls"
    assert len(r.tool_calls) == 1
    call = r.tool_calls[0]
    assert call.id.startswith("call_")
    if choice == "echo":
        assert call.name == "echo" and call.arguments["w"] in ("hello", "bye")
    else:
        assert call.name in ("add", "echo")
        if call.name == "add":
            assert isinstance(call.arguments["a"], int) and isinstance(call.arguments["b"], int)
    assert r.text == ""  # markup removed from the content
    assert r.raw_text.startswith("<tool_call>") and r.raw_text.endswith("</tool_call>")


def test_tool_round_trip_reuses_cache(engine):
    msgs = [Message("user", "add 2 and 3")]
    r1 = engine.chat(msgs, tools=TOOLS, tool_choice="add", config=cfg())
    call = r1.tool_calls[0]
    msgs2 = msgs + [Message("assistant", r1.text, tool_calls=[ToolCall(call.name, call.arguments, call.id)]),
                    Message("tool", "5", tool_call_id=call.id, name=call.name)]
    r2 = engine.chat(msgs2, tools=TOOLS, config=cfg(6))
    assert r2.usage.cache_read >= r1.usage.input_tokens + r1.usage.output_tokens


def test_streamed_tool_call_hides_markup(engine):
    msgs = [Message("user", "echo hello")]
    run = engine.stream_chat(msgs, tools=TOOLS, tool_choice="echo", config=cfg())
    deltas = list(run)
    assert "".join(deltas) == "" and run.reply.tool_calls[0].name == "echo"


def test_response_schema_gives_valid_json(engine):
    schema = {"type": "object", "properties": {"level": {"type": "string", "enum": ["ERROR", "INFO"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["level", "count"]}
    r = engine.chat([Message("user", "summarize")], response_schema=schema, config=cfg(2))
    data = json.loads(r.text)
    assert data["level"] in ("ERROR", "INFO") and isinstance(data["count"], int)


def test_parse_tool_calls():
    text, calls = parse_tool_calls('Sure.<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    assert text == "Sure." and calls[0].name == "add" and calls[0].arguments == {"a": 1, "b": 2}
    text, calls = parse_tool_calls('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', allowed={"add"})
    assert calls == [] and "nope" in text  # unknown tool: left as content
    text, calls = parse_tool_calls("<tool_call>{broken</tool_call>")
    assert calls == [] and text == "<tool_call>{broken</tool_call>"
    raw = '<tool_call>{"name": "add", "arguments": {"a": "x</tool_call>y"}}</tool_call>tail'
    text, calls = parse_tool_calls(raw)
    assert calls[0].arguments == {"a": "x</tool_call>y"} and text == "tail"


def test_tool_choice_errors():
    with pytest.raises(ValueError, match="requires tools"):
        normalize_tool_choice("any", [])
    with pytest.raises(ValueError, match="'mul' is not one of"):
        normalize_tool_choice("mul", TOOLS)
    assert normalize_tool_choice({"type": "function", "function": {"name": "add"}}, TOOLS) == "add"
    assert normalize_tool_choice("auto", TOOLS) is None
    assert normalize_tool_choice("required", TOOLS) == "any"
    schema = tool_call_schema(TOOLS)
    assert [b["properties"]["name"]["const"] for b in schema["anyOf"]] == ["add", "echo"]


def test_grammar_cache_is_bounded(tiny_lm_2k):
    cache = GrammarCache(max_entries=2)
    for i in range(3):
        cache.get(tiny_lm_2k, "json", {"type": "object", "properties": {f"k{i}": {"type": "integer"}}})
    assert len(cache._grammars) == 2
    g = GRAMMARS.get(tiny_lm_2k, "tool_call", tool_call_schema(TOOLS))
    assert GRAMMARS.get(tiny_lm_2k, "tool_call", tool_call_schema(TOOLS)) is g


def test_orphan_tool_result_is_a_clear_error(engine):
    with pytest.raises(LayoutError, match="no earlier assistant message made a call"):
        engine.chat([Message("user", "hi"), Message("tool", "5", tool_call_id="call_x")], config=cfg())


def test_overflow_is_clear_and_pool_stays_usable(tiny_lm_2k):
    eng = local_engine(tiny_lm_2k, max_context_tokens=64)
    with pytest.raises(ContextOverflowError, match="Context overflow"):
        eng.chat([Message("user", "word " * 200)], config=cfg())
    r = eng.chat([Message("user", "hi")], config=cfg(4))
    assert r.usage.input_tokens < 64 and len(r.token_ids) > 0
    # the window filling up during decoding ends the reply with finish_reason "context"
    r = eng.chat([Message("user", "hi")], config=GenerationConfig(max_new_tokens=500, stop_at_eos=False))
    assert r.finish_reason == "context"
    assert eng.chat([Message("user", "hi")], config=cfg(4)).usage.cache_read > 0


def test_concurrent_conversations_match_sequential(engine):
    convs = [[Message("user", f"question number {i}")] for i in range(3)]
    seq = [engine.chat(c, config=cfg(10)).token_ids for c in convs]
    out: dict[int, list[int]] = {}

    def work(i):
        out[i] = engine.chat(convs[i], config=cfg(10)).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out[i] for i in range(3)] == seq


async def test_async_forms_do_not_block_the_loop(engine):
    msgs = [Message("user", "async please")]
    expected = engine.chat(msgs, config=cfg(20))
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    engine.pool.clear()  # force real compute so there is time to tick
    reply = await engine.achat(msgs, config=cfg(20))
    run = engine.astream_chat(msgs, config=cfg(20))
    deltas = [d async for d in run]
    done.set()
    await task
    assert reply.token_ids == expected.token_ids
    assert "".join(deltas) == expected.text and run.reply.token_ids == expected.token_ids
    assert ticks > 2


def test_complete_reuses_prefix(engine):
    r1 = engine.complete("2024-01-01 ERROR disk full", cfg(5))
    r2 = engine.complete("2024-01-01 ERROR disk full\n2024-01-02 INFO ok", cfg(5))
    assert r2.usage.cache_read >= len(engine.lm.encode("2024-01-01 ERROR disk full")) - 1
    assert r1.tool_calls == [] and r1.usage.output_tokens == len(r1.token_ids)
    assert "".join(engine.stream_complete("2024-01-01", cfg(5))) == engine.complete("2024-01-01", cfg(5)).text


@pytest.mark.model
def test_default_model_tool_call_and_memo(default_lm):
    eng = shared_engine()
    msgs = [Message("user", "What is 2 plus 3? Use the add tool.")]
    t0 = time.perf_counter()
    r1 = eng.chat(msgs, tools=TOOLS, tool_choice="any", config=cfg(64))
    assert r1.tool_calls and r1.tool_calls[0].name in ("add", "echo")
    call = r1.tool_calls[0]
    msgs2 = msgs + [Message("assistant", r1.text, tool_calls=r1.tool_calls),
                    Message("tool", "5", tool_call_id=call.id, name=call.name)]
    r2 = eng.chat(msgs2, tools=TOOLS, config=cfg(24))
    assert r2.usage.cache_read >= r1.usage.input_tokens + r1.usage.output_tokens
    assert r2.usage.computed == r2.usage.input_tokens - r2.usage.cache_read
    assert time.perf_counter() - t0 < 120


# ---------------------------------------------------------------- lazy call grammar (tool_choice="auto")
def test_auto_grammar_leaves_text_free_and_constrains_an_opened_call(tiny_lm_2k):
    import xgrammar as xgr

    compiled = GRAMMARS.get(tiny_lm_2k, "tool_call_auto", tool_call_schema(TOOLS))
    free = xgr.GrammarMatcher(compiled)
    assert free.accept_string("Any prose at all, 42 { not json")
    bad = xgr.GrammarMatcher(compiled)
    assert not bad.accept_string('Sure. <tool_call>{"name": "add", "arguments": {"a": "seven"}}')
    bad = xgr.GrammarMatcher(compiled)
    assert not bad.accept_string('<tool_call>{"name": "mul", ')
    good = xgr.GrammarMatcher(compiled)
    assert good.accept_string('Sure. <tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>')


def test_auto_call_opened_by_the_model_parses(tiny_lm_2k):
    """Force the random model to open a call: the lazy grammar makes the rest a valid call of a bound tool."""
    import torch

    from flashback_agents.constrained import tool_call_processor
    from flashback_agents.context import CachedContext
    from flashback_agents.generation import generate

    opener = tiny_lm_2k.encode("<tool_call>")

    def force_opener(ids, scores):
        step = ids.shape[1] - start
        if step < len(opener):
            out = torch.full_like(scores, float("-inf"))
            out[:, opener[step]] = 0.0
            return out
        return scores

    ctx = CachedContext(tiny_lm_2k)
    ctx.append("hello")
    start = len(ctx)
    result = generate(ctx, GenerationConfig(max_new_tokens=80),
                      [force_opener, tool_call_processor(tiny_lm_2k, TOOLS, auto=True)])
    text, calls = parse_tool_calls(result.text, {"add", "echo"})
    assert len(calls) == 1 and calls[0].name in {"add", "echo"}, result.text
    if calls[0].name == "add":
        assert set(calls[0].arguments) == {"a", "b"} and all(0 <= v <= 9 for v in calls[0].arguments.values())
    else:
        assert calls[0].arguments["w"] in ("hello", "bye")


def test_lazy_calls_need_a_textual_opening_tag(tiny_lm_2k):
    from types import SimpleNamespace

    from flashback_agents.constrained import lazy_calls_supported

    assert lazy_calls_supported(tiny_lm_2k)  # Hermes <tool_call> is plain text
    special = SimpleNamespace(grammar_affixes=lambda: (tiny_lm_2k.tokenizer.eos_token, ""))
    assert not lazy_calls_supported(tiny_lm_2k, special)  # a special-token opener would be masked: stay free
    empty = SimpleNamespace(grammar_affixes=lambda: ("", ""))
    assert not lazy_calls_supported(tiny_lm_2k, empty)


def test_auto_tool_choice_keeps_the_callers_max_tokens(engine):
    """The lazy call grammar is no required constraint: max_tokens is not raised to the constrained floor."""
    reply = engine.chat([Message("user", "hi")], tools=TOOLS, config=GenerationConfig(max_new_tokens=3,
                                                                                     stop_at_eos=False))
    assert len(reply.token_ids) <= 3
    forced = engine.chat([Message("user", "hi")], tools=TOOLS, tool_choice="any", config=cfg(3))
    assert forced.tool_calls  # a required call is still completed past a small max_tokens


def test_chat_engine_receives_its_backend(tiny_lm_2k):
    """ChatEngine builds no backend itself (engines does): without one it says what to call instead."""
    with pytest.raises(TypeError, match="local_engine"):
        ChatEngine(tiny_lm_2k)
    engine = local_engine(tiny_lm_2k, max_context_tokens=64)
    assert engine.pool is engine.backend.pool and engine.kv_store is None and engine.max_context_tokens == 64


def test_engine_settings_are_read_whole_from_an_integrations_fields():
    class Fields:  # what a LangChain / LlamaIndex model carries: settings among other fields
        model, adapter, timeout, on_overflow, streaming = "m", None, 3.0, "error", True

    s = EngineSettings.from_fields(Fields(), model="other")
    assert (s.model, s.adapter, s.timeout, s.on_overflow, s.max_cached_bytes) == ("other", None, 3.0, "error", None)


def test_the_budget_guard_comes_with_its_processor():
    """generation imports no grammar code: a processor that must complete carries its guard's constructor."""
    from flashback_agents.generation import budget_guard

    class Plain:
        pass

    class Required:
        def close_guard(self, stop_ids):
            return ("guard", tuple(stop_ids))

    assert budget_guard([Plain()], [2]) is None
    assert budget_guard([Plain(), Required()], [2, 3]) == ("guard", (2, 3))
    assert budget_guard([Required(), Required()], [2]) is None  # ambiguous: no guard, as before
    assert budget_guard([Required()], []) is None
