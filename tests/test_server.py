"""The server backend: the append layout on llama.cpp's prefix cache (xllamacpp), over HTTP.

A real llama.cpp server (the default GGUF, one CPU thread) runs in a child process for this module;
error paths run against a small fake server in a thread. Every server started here is stopped.
"""

from __future__ import annotations

import json
import warnings

import pytest

pytest.importorskip("xllamacpp")
pytest.importorskip("httpx")

from fake_llama import FakeLlama  # noqa: E402

from flashback_agents.backends.server import (ServerCacheReportError, ServerCacheReportWarning,  # noqa: E402
                                              ServerContextError, ServerModelError, ServerStreamError,
                                              ServerUnreachableError, load_server_tokenizer)
from flashback_agents.engines import clear_server_engines  # noqa: E402  # noqa: E402
from flashback_agents.engines import shared_engine
from flashback_agents.context import ContextOverflowError  # noqa: E402
from flashback_agents.generation import GenerationConfig  # noqa: E402
from flashback_agents.layout import Message  # noqa: E402
from flashback_agents.llamacpp import ServeConfig, ServerProcess, free_port  # noqa: E402

READ_LOG = {"type": "function", "function": {
    "name": "read_log", "description": "Read one line of the service log by its number.",
    "parameters": {"type": "object", "properties": {"line": {"type": "integer"}}, "required": ["line"]}}}

LOG_LINES = [
    "12:00:01 INFO api started on port 8080",
    "12:00:07 WARN db pool at 80% capacity",
    "12:01:13 ERROR db connection refused (retry 1)",
    "12:01:14 ERROR db connection refused (retry 2)",
    "12:02:40 INFO api health check ok",
    "12:03:02 ERROR disk /var/tmp full",
]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    proc = ServerProcess(ServeConfig(port=free_port(), threads=1, ctx_size=4096, cache_ram_mib=256), log_path=log)
    url = proc.start()
    try:
        yield url
    finally:
        clear_server_engines()
        proc.stop()


# --------------------------------------------------------------------------- the agent loop on the server
@pytest.mark.slow
def test_six_step_tool_conversation_reuses_the_server_cache(server_url):
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_flashback import ChatFlashBack
    from langchain_flashback.chat_models import to_flashback_messages

    llm = ChatFlashBack(model=server_url, max_tokens=24)
    engine = llm.engine
    assert type(engine).__name__ == "ServerChatEngine"
    assert engine.backend.info.flavor == "llama.cpp" and engine.backend.info.tokenizer_checked
    assert engine.backend.info.markers == "text"  # the stock GGUF has no marker tokens: sent as text
    calling = llm.bind_tools([READ_LOG], tool_choice="any")
    messages = [SystemMessage("You are a log analysis agent. Read the log line by line."),
                HumanMessage("Read lines 1 to 5 of the log, then say which component fails.")]
    usages, conversations = [], []
    for step in range(6):
        conversations.append(to_flashback_messages(messages))
        model = calling if step < 5 else llm.bind_tools([READ_LOG], tool_choice="none")
        reply = model.invoke(messages)
        usages.append(reply.usage_metadata)
        messages.append(reply)
        if step < 5:
            assert len(reply.tool_calls) == 1 and reply.tool_calls[0]["name"] == "read_log"
            line = reply.tool_calls[0]["args"].get("line", step + 1)
            text = LOG_LINES[int(line) % len(LOG_LINES)] if isinstance(line, int) else "no such line"
            messages.append(ToolMessage(text, tool_call_id=reply.tool_calls[0]["id"]))
        else:
            assert isinstance(reply.content, str) and not reply.tool_calls
    # Append layout: from step 2 on the server found the whole previous prompt (and more) in its cache.
    for prev, cur in zip(usages, usages[1:]):
        assert cur["input_token_details"]["cache_read"] >= prev["input_tokens"], (prev, cur)
        assert cur["input_tokens"] > prev["input_tokens"]

    # The same conversations rendered with the evidence first (prepend) on the same server: each new
    # tool result lands before the question, so the previous prompt is never all in the cache.
    backend, tools = engine.backend, [READ_LOG]
    config = GenerationConfig(max_new_tokens=1)
    prepend = []
    for msgs in conversations:
        ids = engine.layout.render(msgs, tools=tools, pattern="prepend")
        run = backend.start(ids, config, backend.prepare(ids, config, None))
        for _ in run:
            pass
        prepend.append(run.usage)
    for prev, cur in zip(prepend[1:], prepend[2:]):  # from the 2nd tool result on, evidence is inserted early
        assert cur.cache_read < prev.input_tokens, (prev, cur)
    for k in range(2, 6):
        assert prepend[k].cache_read < usages[k]["input_token_details"]["cache_read"]


@pytest.mark.slow
def test_markers_are_sent_as_text_tokens_the_server_knows(server_url):
    engine = shared_engine(server_url)
    backend = engine.backend
    ids = engine.layout.render([Message("user", "q"), Message("evidence", "a retrieved line")])
    left, right = engine.lm.marker_ids
    assert left in ids and right in ids
    wire = backend.to_wire(ids)
    vocab = backend.info.n_vocab
    assert max(wire) < vocab and left not in wire and right not in wire
    assert backend.wire_length(ids) == len(wire)
    assert backend.tokenize_on_server("<MARK_L>") == backend.info.marker_wire[left]


@pytest.mark.slow
def test_streaming_and_llamaindex_report_server_cache(server_url):
    from langchain_flashback import ChatFlashBack
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.flashback import FlashBack

    llm = ChatFlashBack(model=server_url, max_tokens=8)
    chunks = list(llm.stream("Name a colour."))
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    assert full.usage_metadata["input_tokens"] > 0
    assert "cache_read" in full.usage_metadata["input_token_details"]

    li = FlashBack(model=server_url, max_tokens=8)
    msgs = [ChatMessage(role="user", content="Say hello.")]
    first = li.chat(msgs)
    usage1 = first.raw["usage"]
    second = li.chat(msgs + [first.message, ChatMessage(role="user", content="Again.")])
    usage2 = second.raw["usage"]
    assert usage2["prompt_tokens_details"]["cached_tokens"] >= usage1["prompt_tokens"]
    assert li.metadata.context_window == 4096


@pytest.mark.slow
def test_context_overflow_is_a_clear_server_error(server_url):
    engine = shared_engine(server_url)
    with pytest.raises(ServerContextError, match="context window is 4096") as info:
        engine.chat([Message("user", "word " * 5000)])
    assert isinstance(info.value, ContextOverflowError)
    body = json.dumps({"error": {"code": 400, "message": "the request exceeds the available context size",
                                 "type": "exceed_context_size_error", "n_prompt_tokens": 5000, "n_ctx": 4096}})
    assert isinstance(engine.backend.http_error(400, body, 5000), ServerContextError)
    assert engine.chat([Message("user", "Hi")], config=GenerationConfig(max_new_tokens=2)).usage.input_tokens > 0


# --------------------------------------------------------------------------- error paths (fake server)
def test_unreachable_server():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerUnreachableError, match="Cannot reach the model server"):
        shared_engine(url)


@pytest.fixture()
def fake():
    f = FakeLlama(load_server_tokenizer("smollm2-135m-instruct")[0], model_id="smollm2-135m-instruct", reply="Hello")
    try:
        yield f
    finally:
        clear_server_engines()
        f.stop()


def test_wrong_model_is_refused(fake):
    fake.wrong_tokens = True
    with pytest.raises(ServerModelError, match="wrong model"):
        shared_engine(fake.url)


def test_missing_cache_figures_warn_or_fail(fake):
    from flashback_agents.engines import server_engine

    fake.timings = False
    engine = shared_engine(fake.url)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reply = engine.chat([Message("user", "hi")])
    assert reply.text == "Hello" and reply.usage.cache_read == 0
    assert any(issubclass(w.category, ServerCacheReportWarning) and "did not report" in str(w.message)
               for w in caught)
    strict = server_engine(fake.url, require_cache_report=True)
    with pytest.raises(ServerCacheReportError, match="cached_tokens"):
        strict.chat([Message("user", "hi")])


def test_dropped_stream_fails_cleanly_and_next_call_works(fake):
    engine = shared_engine(fake.url)
    engine.chat([Message("user", "hi")])
    fake.faults.append("kill")
    with pytest.raises(ServerStreamError, match="dropped mid-stream"):
        list(engine.stream_chat([Message("user", "hi")]))
    reply = engine.chat([Message("user", "hi")])
    assert reply.text == "Hello" and reply.finish_reason == "stop"
    assert fake.last_cache_n and reply.usage.cache_read == fake.last_cache_n  # the server's figure, passed on
    assert reply.usage.computed == reply.usage.input_tokens - fake.last_cache_n


def test_serve_command_rejects_a_missing_model(tmp_path):
    from typer.testing import CliRunner

    from flashback_agents.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "nope.gguf")])
    assert result.exit_code == 2
    assert "GGUF file not found" in result.output


# --------------------------------------------------------------------------- GGUF export with the markers
@pytest.mark.model
def test_exported_gguf_loads_in_llama_cpp_with_single_token_markers(tmp_path, default_lm):
    """A merged model (here: the default model + marker rows) written as GGUF: llama.cpp loads it, the
    markers are single tokens with our ids, and greedy output equals the base GGUF's (q/k permutation)."""
    import httpx
    import torch
    from transformers import AutoModelForCausalLM

    from flashback_agents.export_gguf import base_gguf_for, export_gguf

    cfg = default_lm.model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    merged = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    merged.load_state_dict(default_lm.model.state_dict(), strict=False)
    merged.tie_weights()
    merged.save_pretrained(tmp_path / "merged")
    default_lm.tokenizer.save_pretrained(tmp_path / "merged")
    out = export_gguf(tmp_path / "merged", tmp_path / "model.gguf", base_gguf_for(None), dtype="f16")

    prompt = default_lm.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    greedy = {}
    for name, model in (("base", "smollm2-135m-instruct"), ("export", str(out))):
        with ServerProcess(ServeConfig(model=model, port=free_port(), threads=1, ctx_size=1024)) as url:
            base = url[: -len("/v1")]
            r = httpx.post(base + "/completion", json={"prompt": prompt, "n_predict": 8, "temperature": 0,
                                                      "return_tokens": True}, timeout=120).json()
            greedy[name] = r["tokens"]
            if name == "export":
                toks = httpx.post(base + "/tokenize", json={"content": "<MARK_L>doc<MARK_R>",
                                                            "parse_special": True}).json()["tokens"]
                left, right = default_lm.marker_ids
                assert toks[0] == left and toks[-1] == right and len(toks) == 3
                engine = shared_engine(url)  # the backend sees the markers in the vocabulary: ids sent as is
                assert engine.backend.info.markers == "ids"
                ids = engine.layout.render([Message("user", "q"), Message("evidence", "doc")])
                assert engine.backend.to_wire(ids) == ids
                clear_server_engines()
    assert greedy["export"] == greedy["base"]
