"""LlamaIndex integration: FlashBack (FunctionCallingLLM), FlashBack query-engine prompts, agents.

Unit tests run on the tiny random Llama (conftest ``tiny_lm``); tests marked ``model`` run on the
default model and are kept few and short.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock  # noqa: E402
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from flashback_agents.context import common_prefix  # noqa: E402
from llama_index.llms.flashback import (  # noqa: E402
    FLASHBACK_REFINE_PROMPT,
    FLASHBACK_TEXT_QA_PROMPT,
    FlashBack,
    flashback_query_engine,
    split_documents,
    to_flashback_messages,
)


def user(text: str, **kw) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text, **kw)


def add(a: int, b: int) -> int:
    """Add two integers and return the sum."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers and return the product."""
    return a * b


TOOLS = [FunctionTool.from_defaults(add), FunctionTool.from_defaults(multiply)]
# short descriptions: the tiny model's window is 512 tokens and its byte-level tokenizer is verbose
_FLAG = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}
SHORT_TOOLS = [{"type": "function", "function": {"name": n, "description": "", "parameters": _FLAG}}
               for n in ("lamp", "fan")]  # OpenAI-style dicts are accepted as tools too


@pytest.fixture()
def tiny_llm(tiny_lm):
    llm = FlashBack(tiny_lm, max_tokens=12)
    llm.engine.pool.clear()
    return llm


# ---------------------------------------------------------------------------- basics
def test_namespace_import_and_metadata(tiny_llm, tiny_lm):
    import llama_index.core
    import llama_index.llms.flashback as pkg

    assert pkg.FlashBack is FlashBack and llama_index.core.__name__ == "llama_index.core"
    md = tiny_llm.metadata
    assert md.is_chat_model and md.is_function_calling_model
    assert md.context_window == tiny_lm.max_positions and md.num_output == 12
    assert md.model_name == tiny_lm.name
    assert FlashBack(tiny_lm).engine is tiny_llm.engine  # process-wide engine: one pool per model


def test_flashbackllm_is_a_deprecated_alias(tiny_lm):
    import pytest

    from llama_index.llms.flashback import FlashBackLLM

    with pytest.warns(DeprecationWarning, match="use llama_index.llms.flashback.FlashBack") as record:
        old = FlashBackLLM(tiny_lm, max_tokens=4)
    assert record[0].filename == __file__  # points at the caller's line
    assert isinstance(old, FlashBack) and old.engine is FlashBack(tiny_lm, max_tokens=4).engine


def test_message_conversion():
    msgs = [
        ChatMessage(role="system", content="sys A"),
        ChatMessage(role="system", content="sys B"),
        user("Q?", additional_kwargs={"documents": ["d1", "d2"]}),
        ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="call_1", tool_name="add",
                                                            tool_kwargs={"a": 1, "b": 2})]),
        ChatMessage(role="tool", content="3", additional_kwargs={"tool_call_id": "call_1"}),
        ChatMessage(role="tool", content="orphan", additional_kwargs={"tool_call_id": "call_gone"}),
        ChatMessage(role="assistant", content="ok", additional_kwargs={"tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "multiply", "arguments": '{"a": 2, "b": 3}'}}]}),
    ]
    out = to_flashback_messages(msgs)
    assert [m.role for m in out] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert out[0].content == "sys A\n\nsys B"
    assert out[1].documents == ["d1", "d2"]
    assert out[2].tool_calls[0].name == "add" and out[2].tool_calls[0].arguments == {"a": 1, "b": 2}
    assert out[3].tool_call_id == "call_1" and out[4].tool_call_id is None  # orphan id dropped, content kept
    assert out[5].tool_calls[0].arguments == {"a": 2, "b": 3} and out[5].tool_calls[0].id == "c2"


def test_clear_errors(tiny_llm):
    with pytest.raises(TypeError, match="unexpected arguments"):
        tiny_llm.chat([user("hi")], bogus=1)
    with pytest.raises(ValueError, match="role"):
        to_flashback_messages([ChatMessage(role="user", content="x"), ChatMessage.model_construct(role="robot")])
    with pytest.raises(ValueError, match="not one of the available tools"):
        tiny_llm.chat([user("hi")], tools=SHORT_TOOLS, tool_choice="divide")
    with pytest.raises(ValueError, match="Expected at least one tool call"):
        from llama_index.core.base.llms.types import ChatResponse
        tiny_llm.get_tool_calls_from_response(ChatResponse(message=ChatMessage(role="assistant", content="no")))


# ---------------------------------------------------------------------------- usage / streaming
def test_usage_is_exact_and_next_turn_is_pure_append(tiny_llm):
    first = [user("Hello there")]
    r1 = tiny_llm.chat(first)
    u1 = r1.raw["usage"]
    ids1 = tiny_llm.render_ids(first)
    assert u1["prompt_tokens"] == len(ids1) and u1["cached_tokens"] == 0 and u1["computed_tokens"] == len(ids1)
    assert u1["completion_tokens"] == len(r1.raw["output_ids"]) > 0
    second = first + [r1.message, user("And again")]
    r2 = tiny_llm.chat(second)
    u2 = r2.raw["usage"]
    ids2 = tiny_llm.render_ids(second)
    # the reply came back as the exact generated ids: everything before the new user turn is reused
    assert ids2[: len(ids1) + len(r1.raw["output_ids"])] == ids1 + r1.raw["output_ids"]
    assert u2["cached_tokens"] == u1["prompt_tokens"] + u1["completion_tokens"]
    assert u2["computed_tokens"] == len(ids2) - u2["cached_tokens"]


def test_stream_equals_chat_and_token_counting_handler(tiny_lm):
    counter = TokenCountingHandler()
    llm = FlashBack(tiny_lm, max_tokens=16, callback_manager=CallbackManager([counter]))
    msgs = [user("Count to five")]
    full = llm.chat(msgs)
    chunks = list(llm.stream_chat(msgs))
    assert "".join(c.delta or "" for c in chunks) == full.message.content == chunks[-1].message.content
    assert chunks[-1].raw["output_ids"] == full.raw["output_ids"]
    assert chunks[-1].raw["usage"]["cached_tokens"] == full.raw["usage"]["prompt_tokens"]  # 2nd call: cached
    assert len(counter.llm_token_counts) == 2
    for event, resp in zip(counter.llm_token_counts, (full, chunks[-1])):
        assert event.prompt_token_count == resp.raw["usage"]["prompt_tokens"]
        assert event.completion_token_count == resp.raw["usage"]["completion_tokens"]
    # completion API: chat-wrapped; formatted=True completes raw text
    c = llm.complete("Count to five")
    assert c.text == full.message.content
    assert "".join(x.delta or "" for x in llm.stream_complete("Count to five")) == c.text
    raw = llm.complete("Once upon a time", formatted=True)
    assert raw.raw["usage"]["prompt_tokens"] == len(tiny_lm.encode("Once upon a time"))


async def test_async_forms_do_not_block_the_loop(tiny_llm):
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.002)
            ticks += 1

    task = asyncio.create_task(ticker())
    msgs = [user("Tell me a story")]
    r = await tiny_llm.achat(msgs, max_tokens=24)
    before = ticks
    deltas = [c.delta async for c in await tiny_llm.astream_chat(msgs, max_tokens=24)]
    c = await tiny_llm.acomplete("Tell me a story", max_tokens=24)
    task.cancel()
    assert before > 0 and ticks > before
    assert "".join(d or "" for d in deltas) == r.message.content == c.text


# ---------------------------------------------------------------------------- tools
def test_required_tool_call_is_constrained(tiny_llm):
    resp = tiny_llm.chat_with_tools(SHORT_TOOLS, user_msg="lamp on", tool_required=True, max_tokens=64)
    calls = tiny_llm.get_tool_calls_from_response(resp)
    assert len(calls) == 1 and calls[0].tool_name in ("lamp", "fan")
    assert set(calls[0].tool_kwargs) == {"on"} and isinstance(calls[0].tool_kwargs["on"], bool)
    assert calls[0].tool_id.startswith("call_")
    assert resp.raw["finish_reason"] == "tool_calls"
    named = tiny_llm.chat_with_tools(SHORT_TOOLS, user_msg="x", tool_choice="fan", max_tokens=64)
    assert tiny_llm.get_tool_calls_from_response(named)[0].tool_name == "fan"
    # the tool result goes back as a marked block: the next call computes only the new tokens
    one = SHORT_TOOLS[:1]
    tiny_llm.engine.pool.clear()
    first = tiny_llm.chat_with_tools(one, user_msg="lamp on", tool_required=True, max_tokens=64)
    call_id = tiny_llm.get_tool_calls_from_response(first)[0].tool_id
    history = [user("lamp on"), first.message,
               ChatMessage(role="tool", content="ok", additional_kwargs={"tool_call_id": call_id})]
    nxt = tiny_llm.chat_with_tools(one, chat_history=history, max_tokens=4)
    u0, u = first.raw["usage"], nxt.raw["usage"]
    assert u["cached_tokens"] == u0["prompt_tokens"] + u0["completion_tokens"]
    left, right = tiny_llm.engine.lm.marker_ids
    tail = tiny_llm.render_ids(history, tools=one)[u["cached_tokens"]:]
    assert u["computed_tokens"] == len(tail) and tail.count(left) == 1 and tail.count(right) == 1


# ---------------------------------------------------------------------------- query engine prompts
def test_templates_put_question_first_and_mark_each_document(tiny_llm):
    ctx = "Alpha fact.\n\nBeta fact."
    assert split_documents(ctx) == ["Alpha fact.", "Beta fact."]
    msgs = FLASHBACK_TEXT_QA_PROMPT.format_messages(llm=tiny_llm, context_str=ctx, query_str="Which facts?")
    assert msgs[-1].content.endswith("Question: Which facts?")
    # retrieval order (best first) is kept: the default model copies from the first document it reads
    assert msgs[-1].additional_kwargs["documents"] == ["Alpha fact.", "Beta fact."]
    last = FLASHBACK_TEXT_QA_PROMPT.model_copy(update={"best_last": True})  # the best match next to the answer
    assert last.format_messages(llm=tiny_llm, context_str=ctx, query_str="Which facts?")[-1] \
        .additional_kwargs["documents"] == ["Beta fact.", "Alpha fact."]
    ids = tiny_llm.render_ids(msgs)
    left, right = tiny_llm.engine.lm.marker_ids
    assert ids.count(left) == 2 and ids.count(right) == 2
    q = tiny_llm.engine.lm.encode("Which facts?")
    first_mark = ids.index(left)
    assert any(ids[i:i + len(q)] == q for i in range(first_mark))  # the question comes before the evidence
    # any other LLM (or plain .format()) gets the documents inline, after the question
    text = FLASHBACK_TEXT_QA_PROMPT.format(context_str=ctx, query_str="Which facts?")
    assert text.index("Which facts?") < text.index("Alpha fact.") < text.index("Beta fact.")
    refine = FLASHBACK_REFINE_PROMPT.format_messages(llm=tiny_llm, query_str="Q", existing_answer="A",
                                                     context_msg="Gamma.")
    assert [m.role.value for m in refine] == ["user", "assistant", "user"]
    assert refine[-1].additional_kwargs["documents"] == ["Gamma."]
    assert set(FLASHBACK_TEXT_QA_PROMPT.template_vars) >= {"query_str", "context_str"}


def test_query_engine_appends_retrieved_nodes(tiny_llm):
    from llama_index.core import Document, PromptHelper, VectorStoreIndex, get_response_synthesizer
    from llama_index.core.embeddings import MockEmbedding

    docs = [Document(text="The lighthouse keeper is named Orvo."), Document(text="The ferry leaves at noon.")]
    index = VectorStoreIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8))
    # LlamaIndex reserves more room than the tiny model's 512-token window has: widen its prompt helper
    helper = PromptHelper(context_window=4096, num_output=12)
    qe = index.as_query_engine(llm=tiny_llm, similarity_top_k=2,
                               response_synthesizer=get_response_synthesizer(llm=tiny_llm, prompt_helper=helper))
    qe.update_prompts({"response_synthesizer:text_qa_template": FLASHBACK_TEXT_QA_PROMPT,
                       "response_synthesizer:refine_template": FLASHBACK_REFINE_PROMPT})
    assert qe.get_prompts()["response_synthesizer:text_qa_template"] is not None
    for engine in (qe, flashback_query_engine(index, llm=tiny_llm, similarity_top_k=2, prompt_helper=helper)):
        tiny_llm.engine.pool.clear()
        response = engine.query("Who keeps the lighthouse?")
        assert len(response.source_nodes) == 2
        (entry,) = tiny_llm.engine.pool._entries
        ids = entry.ctx.token_ids
        left, right = tiny_llm.engine.lm.marker_ids
        assert ids.count(left) == 2 and ids.count(right) == 2  # each retrieved node marked, after the question
        q = tiny_llm.engine.lm.encode("Who keeps the lighthouse?")
        assert any(ids[i:i + len(q)] == q for i in range(ids.index(left)))


# ---------------------------------------------------------------------------- default model
@pytest.mark.model
def test_chroma_query_engine_answers_from_retrieved_text(tmp_path, default_lm):
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.llms.flashback import chroma_vector_store, offline_embed_model

    corpus = [
        "The Quillfeather Observatory on Marrow Island was founded in 1911 by the astronomer Edda Vantreel.",
        "The official mascot of the Quillfeather Observatory is a grey heron named Pemberwick.",
        "Marrow Island ferries run twice a day from the port of Saltmere.",
        "Bread in Saltmere is baked with seaweed flour.",
    ]
    store = chroma_vector_store(tmp_path / "chroma", collection_name="flashback-test")
    index = VectorStoreIndex.from_documents([Document(text=t) for t in corpus],
                                            storage_context=StorageContext.from_defaults(vector_store=store),
                                            embed_model=offline_embed_model())
    llm = FlashBack(default_lm, max_tokens=24)
    qe = flashback_query_engine(index, llm=llm, similarity_top_k=2)
    response = qe.query("What is the name of the Quillfeather Observatory's mascot?")
    assert any("Pemberwick" in n.node.get_content() for n in response.source_nodes)
    assert "Pemberwick" in str(response)


@pytest.mark.model
async def test_function_agent_each_step_computes_only_new_tokens(default_lm):
    from llama_index.core.agent.workflow import AgentInput, AgentOutput, FunctionAgent, ToolCallResult

    class EveryStepCalls(FlashBack):
        """A call at every agent step (FunctionAgent passes tool_required=False: the field tool_choice
        no longer forces agent steps), so that each step's cache reuse is measured."""

        def _prepare_chat_with_tools(self, tools, *args, tool_required=False, **kwargs):
            return super()._prepare_chat_with_tools(tools, *args, tool_required=True, **kwargs)

    llm = EveryStepCalls(default_lm, max_tokens=48)
    llm.engine.pool.clear()
    agent = FunctionAgent(tools=TOOLS, llm=llm,
                          system_prompt="You are a calculator. Use the tools for every arithmetic step.")
    handler = agent.run("Compute ((3 + 4) * 5 + 6) * 2 with the tools.", max_iterations=5,
                        early_stopping_method="generate")
    steps, tool_results = [], []
    pending_input = None
    async for ev in handler.stream_events():
        if isinstance(ev, AgentInput):
            pending_input = ev.input
        elif isinstance(ev, AgentOutput) and ev.raw and ev.tool_calls and pending_input is not None:
            steps.append((llm.render_ids(pending_input, tools=TOOLS), ev.raw["usage"], ev.raw["output_ids"]))
            pending_input = None
        elif isinstance(ev, ToolCallResult):
            tool_results.append(ev)
    await handler
    assert len(tool_results) >= 4 and len(steps) >= 4
    assert {r.tool_name for r in tool_results} <= {"add", "multiply"}
    left, right = llm.engine.lm.marker_ids
    for (ids, usage, out), (next_ids, next_usage, _) in zip(steps, steps[1:]):
        assert usage["prompt_tokens"] == len(ids)
        # the previous prompt and the generated call are reused as they are: a pure append
        assert next_ids[: len(ids) + len(out)] == ids + out
        assert next_usage["cached_tokens"] == len(ids) + len(out)
        assert next_usage["computed_tokens"] == len(next_ids) - len(ids) - len(out)
        # ... and what is computed is the new tool-result message (marked) + the generation prompt
        tail = next_ids[len(ids) + len(out):]
        assert tail.count(left) == 1 and tail.count(right) == 1 and next_usage["computed_tokens"] == len(tail)


@pytest.mark.model
async def test_react_agent_history_rewrite_costs_only_the_rewritten_tail(default_lm):
    from llama_index.core.agent.workflow import AgentInput, AgentOutput, ReActAgent
    from llama_index.core.memory import ChatMemoryBuffer

    llm = FlashBack(default_lm, max_tokens=16)
    llm.engine.pool.clear()
    agent = ReActAgent(tools=TOOLS, llm=llm)
    memory = ChatMemoryBuffer.from_defaults(token_limit=6000)
    calls: list[tuple[list[int], dict, list[int]]] = []
    first_of_turn: list[int] = []
    for question in ("What is 2 + 2?", "And what is 3 + 3?"):
        first_of_turn.append(len(calls))
        handler = agent.run(question, memory=memory, max_iterations=3, early_stopping_method="generate")
        pending = None
        async for ev in handler.stream_events():
            if isinstance(ev, AgentInput):
                pending = ev.input
            elif isinstance(ev, AgentOutput) and ev.raw and pending is not None:
                calls.append((llm.render_ids(pending), ev.raw["usage"], ev.raw["output_ids"]))
                pending = None
        await handler
    assert len(calls) >= 2
    seen: list[list[int]] = []
    for ids, usage, out in calls:
        common = max((common_prefix(ids, s) for s in seen), default=0)
        assert usage["prompt_tokens"] == len(ids)
        assert usage["cached_tokens"] == common
        assert usage["computed_tokens"] == len(ids) - common
        seen.append(ids + out)
    # turn 2 re-sends turn 1 rewritten (ReAct stores "Thought: ... Answer: ..." instead of what the model
    # said): the whole turn-1 prompt is still reused, only the rewritten reply and the new question are computed
    assert first_of_turn[1] < len(calls)
    turn1_first_prompt = calls[0][0]
    turn1_last_prompt, _, turn1_last_out = calls[first_of_turn[1] - 1]
    turn2_ids, turn2_usage, _ = calls[first_of_turn[1]]
    assert len(turn1_first_prompt) <= turn2_usage["cached_tokens"] < len(turn1_last_prompt) + len(turn1_last_out)
    print("react calls:", [(len(i), u["cached_tokens"], u["computed_tokens"], len(o)) for i, u, o in calls],
          "turn 2 starts at", first_of_turn[1])
