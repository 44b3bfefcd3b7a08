"""Every answer the server backend reads is checked: malformed ones and silent servers are our errors.

The start-up checks obey the user's ``timeout`` (a server that never answers ``/v1/models``, or
stays "loading" with HTTP 503, fails within it), and each malformed answer (``/v1/models``,
``/props``, ``/tokenize``, a stream event) is a :class:`FlashBackError` naming the endpoint and the
field, never a raw KeyError/TypeError/ValueError/RecursionError. The fake server is
``tests/fake_llama.py`` (its ``answers`` replace one endpoint's answer); the tiny model's tokenizer
renders, so no real model or llama.cpp build is needed.

The fault suite (issue 16): a fake that dies mid-stream, stalls, trickles, sends malformed SSE, answers
HTTP 500, or restarts with an empty cache. Each fault gives a clear ``ServerError`` (or a correct,
recomputed answer) within the timeout, never a hang, and the conversation continues on the next call.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Callable

import pytest

httpx = pytest.importorskip("httpx")

from fake_llama import FakeLlama  # noqa: E402

from flashback_agents.backends.server import (ServerBackend, ServerContextError, ServerError,  # noqa: E402
                                              ServerRequestError, ServerStreamError, ServerUnreachableError)
from flashback_agents.backends.server.protocol import ServerInfo, http_error, split_url, token_list  # noqa: E402
from flashback_agents.engines import clear_server_engines, server_engine  # noqa: E402
from flashback_agents.errors import FlashBackError  # noqa: E402
from flashback_agents.generation import GenerationConfig  # noqa: E402
from flashback_agents.layout import Message  # noqa: E402
from flashback_agents.testing import run_in_thread  # noqa: E402

DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON that json.loads cannot parse (RecursionError)
TIMEOUT = 1.0
REPLY = "Hello there"


@pytest.fixture()
def fake(tiny_model_dir):
    f = FakeLlama(str(tiny_model_dir))
    try:
        yield f
    finally:
        clear_server_engines()
        f.stop()


def engine_for(fake, tiny_model_dir, timeout=2.0):
    return server_engine(fake.url, tokenizer=str(tiny_model_dir), timeout=timeout, connect_timeout=1.0)


def bounded(fn, deadline=8.0):
    """(seconds, result or exception) of ``fn``; fails instead of hanging past ``deadline``."""
    t0 = time.monotonic()
    finished, value = run_in_thread(fn, deadline)
    assert finished, f"hung for more than {deadline} s"
    return time.monotonic() - t0, value


CONV = [Message("system", "You answer."), Message("user", "hi")]
CFG = GenerationConfig(max_new_tokens=8)


def next_step_works(engine, fake, msgs=CONV):
    reply = engine.chat(msgs, config=CFG)
    assert reply.text == REPLY and reply.finish_reason == "stop"
    return reply


@pytest.fixture()
def silent_url():
    """An address whose listening socket takes connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        sock.close()


# --------------------------------------------------------------------------- the timeout bounds start-up
def test_server_that_never_answers_fails_within_the_timeout(silent_url, tiny_model_dir):
    seconds, err = bounded(lambda: server_engine(silent_url, tokenizer=str(tiny_model_dir), timeout=TIMEOUT),
                           deadline=TIMEOUT + 5)
    assert isinstance(err, ServerUnreachableError) and isinstance(err, FlashBackError), repr(err)
    msg = str(err)
    assert "did not answer GET" in msg and "/v1/models" in msg and "within 1 s" in msg, msg
    assert "Check the URL" in msg and "finished loading" in msg and "raise timeout=" in msg, msg
    assert seconds < TIMEOUT + 5


def test_chatflashback_timeout_bounds_the_start_up(silent_url, tiny_model_dir, monkeypatch):
    from langchain_flashback import ChatFlashBack

    monkeypatch.setenv("FLASHBACK_TOKENIZER", str(tiny_model_dir))
    llm = ChatFlashBack(model=silent_url, adapter=None, max_tokens=8, timeout=TIMEOUT)
    seconds, err = bounded(lambda: llm.invoke("hi"), deadline=TIMEOUT + 5)
    assert isinstance(err, ServerUnreachableError) and "raise timeout=" in str(err), repr(err)
    assert seconds < TIMEOUT + 5


def test_llamaindex_timeout_bounds_the_start_up(silent_url, tiny_model_dir, monkeypatch):
    from llama_index.llms.flashback import FlashBack

    monkeypatch.setenv("FLASHBACK_TOKENIZER", str(tiny_model_dir))
    seconds, err = bounded(lambda: FlashBack(model=silent_url, adapter=None, max_tokens=8, timeout=TIMEOUT),
                           deadline=TIMEOUT + 5)
    assert isinstance(err, ServerUnreachableError) and "raise timeout=" in str(err), repr(err)
    assert seconds < TIMEOUT + 5


LOADING = (503, json.dumps({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}))


@pytest.mark.parametrize("kwargs, knob", [({"timeout": TIMEOUT}, "timeout"),
                                          ({"timeout": 30.0, "startup_wait": TIMEOUT}, "startup_wait")])
def test_server_loading_forever_fails_within_the_timeout(fake, tiny_model_dir, kwargs, knob):
    fake.answers["/v1/models"] = LOADING
    seconds, err = bounded(lambda: ServerBackend(fake.url, tokenizer=str(tiny_model_dir), **kwargs),
                           deadline=TIMEOUT + 5)
    assert isinstance(err, ServerUnreachableError), repr(err)
    msg = str(err)
    assert "still loading" in msg and "HTTP 503" in msg and f"raise {knob}=" in msg, msg
    assert TIMEOUT * 0.9 < seconds < TIMEOUT + 5


def test_server_that_finishes_loading_within_the_timeout_connects(fake, tiny_model_dir):
    fake.answers["/v1/models"] = LOADING
    threading.Timer(0.6, lambda: fake.answers.pop("/v1/models")).start()
    engine = engine_for(fake, tiny_model_dir, timeout=4.0)
    assert engine.backend.info.n_ctx == 2048 and engine.backend.info.tokenizer_checked
    next_step_works(engine, fake)


# --------------------------------------------------------------------------- malformed start-up answers
def models(entry: dict | None = None, **meta: Any) -> Callable[[Any], str]:
    """A /v1/models answer: the fake's own, with ``meta`` fields (or the whole entry) replaced."""
    def body(f: Any) -> str:
        e = entry if entry is not None else {"id": f.model_id, "owned_by": "llamacpp",
                                             "meta": {"n_vocab": len(f.tok), "n_ctx": 2048, **meta}}
        return json.dumps({"object": "list", "data": [e]})
    return body


def props(settings: Any = None, **fields: Any) -> str:
    return json.dumps({"default_generation_settings": {"n_ctx": 2048} if settings is None else settings, **fields})


STARTUP = [  # (id, path, answer body or a function of the fake, what the message must say)
    ("models-not-json", "/v1/models", "<html>hi</html>", "not JSON"),
    ("models-deep", "/v1/models", DEEP, "nested too deep"),
    ("models-data-object", "/v1/models", '{"data": {"id": "tiny"}}', "lists no model"),
    ("models-entry-string", "/v1/models", '{"data": ["tiny"]}', "lists no model"),
    ("models-id-number", "/v1/models", models({"id": 5, "owned_by": "llamacpp"}), "data[0].id"),
    ("models-meta-list", "/v1/models", models({"id": "tiny", "meta": [1]}), "data[0].meta must be an object"),
    ("n_ctx-string", "/v1/models", models(n_ctx="2048"), "n_ctx (the server's context size)"),
    ("n_ctx-negative", "/v1/models", models(n_ctx=-5), "n_ctx (the server's context size)"),
    ("n_ctx-zero", "/v1/models", models(n_ctx=0), "n_ctx (the server's context size)"),
    ("n_ctx-bool", "/v1/models", models(n_ctx=True), "n_ctx (the server's context size)"),
    ("n_ctx-float", "/v1/models", models(n_ctx=2048.5), "n_ctx (the server's context size)"),
    ("n_vocab-string", "/v1/models", models(n_vocab="abc"), "n_vocab"),
    ("n_vocab-negative", "/v1/models", models(n_vocab=-1), "n_vocab"),
    ("vllm-max_model_len-string", "/v1/models", models({"id": "tiny", "owned_by": "vllm", "max_model_len": "big"}),
     "max_model_len"),
    ("props-list", "/props", "[1, 2]", "expected a JSON object"),
    ("props-not-json", "/props", "nope", "not JSON"),
    ("props-deep", "/props", DEEP, "nested too deep"),
    ("props-settings-list", "/props", props([1]), "default_generation_settings must be an object"),
    ("props-n_ctx-string", "/props", props({"n_ctx": "4096"}), "default_generation_settings.n_ctx"),
    ("props-n_ctx-negative", "/props", props({"n_ctx": -1}), "default_generation_settings.n_ctx"),
    ("props-model_path-number", "/props", props(model_path=5), "model_path must be a string"),
    ("tokenize-strings", "/tokenize", '{"tokens": ["a", "b"]}', "token ids"),
    ("tokenize-nulls", "/tokenize", '{"tokens": [null]}', "token ids"),
    ("tokenize-a-string", "/tokenize", '{"tokens": "abc"}', "must be a list of token ids"),
    ("tokenize-floats", "/tokenize", '{"tokens": [1.5]}', "token ids"),
    ("tokenize-bools", "/tokenize", '{"tokens": [true]}', "token ids"),
    ("tokenize-negative", "/tokenize", '{"tokens": [-3]}', "token ids"),
    ("tokenize-piece-without-id", "/tokenize", '{"tokens": [{"piece": "a"}]}', "token ids"),
    ("tokenize-list", "/tokenize", "[1, 2]", "expected a JSON object"),
    ("tokenize-not-json", "/tokenize", "oops", "not JSON"),
    ("tokenize-deep", "/tokenize", DEEP, "nested too deep"),
]


@pytest.mark.parametrize("path, body, needle", [c[1:] for c in STARTUP], ids=[c[0] for c in STARTUP])
def test_malformed_start_up_answer_is_a_clear_server_error(fake, tiny_model_dir, path, body, needle):
    fake.answers[path] = (200, body(fake) if callable(body) else body)
    seconds, err = bounded(lambda: engine_for(fake, tiny_model_dir))
    assert isinstance(err, FlashBackError), repr(err)
    msg = str(err)
    assert needle in msg and path in msg and "llama.cpp" in msg, msg
    assert "max_context_tokens" not in msg  # a bad n_ctx is the server's answer, not the user's setting


def test_tokenize_pieces_form_is_accepted():
    assert token_list([{"id": 3, "piece": "a"}, 4], "POST u/tokenize") == [3, 4]  # llama.cpp with_pieces


# --------------------------------------------------------------------------- malformed stream events
def sse(*events: Any) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


FINAL = {"content": "", "stop": True, "stop_type": "eos", "tokens_evaluated": 3, "tokens_predicted": 1}
STREAM = [
    ("event-deep", sse(DEEP), "malformed stream event"),
    ("event-list", sse("[1, 2]"), "malformed stream event"),
    ("event-string", sse('"hi"'), "malformed stream event"),
    ("content-number", sse({"content": 5, "stop": False}), "'content' must be a string"),
    ("tokens-strings", sse({"content": "a", "tokens": ["x"], "stop": False}), "token ids"),
    ("tokens-string", sse({"content": "a", "tokens": "abc", "stop": False}), "list of token ids"),
    ("stop-string", sse({"content": "a", "stop": "yes"}), "'stop' must be true or false"),
    ("stop_type-number", sse({**FINAL, "stop_type": 3}), "'stop_type' must be a string"),
    ("tokens_evaluated-string", sse({**FINAL, "tokens_evaluated": "3"}), "'tokens_evaluated' must be an integer"),
    ("timings-list", sse({**FINAL, "timings": [1]}), "'timings' must be an object"),
    ("cache_n-string", sse({**FINAL, "timings": {"cache_n": "7"}}), "'cache_n' must be an integer"),
    ("prompt_ms-negative", sse({**FINAL, "timings": {"cache_n": 1, "prompt_ms": -2}}), "'prompt_ms' must be a number"),
]


@pytest.mark.parametrize("body, needle", [c[1:] for c in STREAM], ids=[c[0] for c in STREAM])
def test_malformed_stream_event_is_a_clear_error_and_the_next_call_works(fake, tiny_model_dir, body, needle):
    engine = engine_for(fake, tiny_model_dir)
    fake.answers["/completion"] = (200, body)
    seconds, err = bounded(lambda: engine.chat(CONV, config=CFG))
    assert isinstance(err, ServerStreamError) and isinstance(err, FlashBackError), repr(err)
    msg = str(err)
    assert needle in msg and "/completion" in msg and "the next call starts a fresh request" in msg, msg
    del fake.answers["/completion"]
    next_step_works(engine, fake)


def test_error_event_with_a_malformed_code_keeps_the_servers_message(fake, tiny_model_dir):
    engine = engine_for(fake, tiny_model_dir)
    fake.answers["/completion"] = (200, sse({"error": {"code": "abc", "message": "slot failed"}}))
    seconds, err = bounded(lambda: engine.chat(CONV, config=CFG))
    assert isinstance(err, ServerRequestError) and "slot failed" in str(err), repr(err)


# --------------------------------------------------------------------------- error answers (no server)
def test_http_error_of_any_shape_is_a_server_error():
    base, api = split_url("http://127.0.0.1:9/v1")
    info = ServerInfo(url=api, base_url=base, api_url=api, flavor="vllm", model_id="m", n_ctx=100)
    assert isinstance(http_error(info, "u", 400, DEEP, 1), ServerRequestError)
    err = http_error(info, "u", 400, json.dumps({"error": {"message": "maximum context length", "n_ctx": "x"}}), 120)
    assert isinstance(err, ServerContextError) and err.limit == 100
    err = http_error(info, "u", 500, json.dumps({"error": {"message": ["not", "a", "string"]}}), 1)
    assert isinstance(err, ServerRequestError) and "HTTP 500" in str(err)


# --------------------------------------------------------------------------- faults (issue 16)
@pytest.mark.parametrize("fault, error, needle", [
    ("kill", ServerStreamError, "dropped mid-stream"),
    ("http500", ServerRequestError, "HTTP 500"),
    ("malformed", ServerStreamError, "malformed stream event"),
    ("wrong-shape", ServerStreamError, "unexpected shape"),
    ("error-event", ServerRequestError, "decode failed"),
    ("no-final", ServerStreamError, "ended before the server finished"),
])
def test_fault_is_a_clear_error_and_the_conversation_continues(fake, tiny_model_dir, fault, error, needle):
    engine = engine_for(fake, tiny_model_dir)
    first = next_step_works(engine, fake)
    fake.faults.append(fault)
    msgs = CONV + [Message("assistant", first.text), Message("user", "again")]
    seconds, value = bounded(lambda: engine.chat(msgs, config=CFG))
    assert isinstance(value, error), repr(value)
    assert needle in str(value), str(value)
    reply = next_step_works(engine, fake, msgs)  # the next call is a normal, correct step
    assert reply.usage.cache_read > 0


@pytest.mark.parametrize("fault", ["stall", "trickle"])
def test_slow_server_past_the_timeout_fails_within_it(fake, tiny_model_dir, fault):
    engine = engine_for(fake, tiny_model_dir, timeout=0.8)
    fake.faults.append(fault)
    seconds, value = bounded(lambda: engine.chat(CONV, config=GenerationConfig(max_new_tokens=500)))
    assert isinstance(value, ServerStreamError) and "timed out" in str(value), repr(value)
    assert seconds < 4
    fake.release.set()
    next_step_works(engine, fake)


def test_per_call_timeout_from_langchain(fake, tiny_model_dir, monkeypatch):
    from langchain_flashback import ChatFlashBack

    monkeypatch.setenv("FLASHBACK_TOKENIZER", str(tiny_model_dir))
    llm = ChatFlashBack(model=fake.url, adapter=None, max_tokens=8, timeout=0.5)
    assert llm.invoke("hi").content == REPLY
    fake.faults.append("stall")
    seconds, value = bounded(lambda: llm.invoke("hi"))
    assert isinstance(value, ServerStreamError) and seconds < 3, (seconds, value)
    fake.release.set()
    assert llm.invoke("hi").content == REPLY


def test_server_killed_then_restarted_with_an_empty_cache(fake, tiny_model_dir):
    engine = engine_for(fake, tiny_model_dir)
    first = next_step_works(engine, fake)
    msgs = CONV + [Message("assistant", first.text), Message("user", "more")]
    warm = engine.chat(msgs, config=CFG)
    assert warm.usage.cache_read > 0
    port = fake.port
    fake.stop()  # killed
    seconds, value = bounded(lambda: engine.chat(msgs, config=CFG))
    assert isinstance(value, ServerUnreachableError) and "start it again" in str(value), repr(value)
    restarted = FakeLlama(str(tiny_model_dir), port=port)  # same address, empty cache
    try:
        reply = engine.chat(msgs, config=CFG)
        assert reply.text == REPLY  # correct, recomputed by the server
        assert reply.usage.cache_read == 0 and reply.usage.computed == reply.usage.input_tokens
        again = engine.chat(msgs + [Message("assistant", reply.text), Message("user", "ok")], config=CFG)
        assert again.usage.cache_read >= reply.usage.input_tokens  # and caching again from the next step
    finally:
        restarted.stop()


def test_stream_abandoned_mid_way_closes_the_connection(fake, tiny_model_dir):
    engine = engine_for(fake, tiny_model_dir)
    fake.faults.append("trickle")
    run = engine.stream_chat(CONV, config=GenerationConfig(max_new_tokens=500))
    it = iter(run)
    next(it)
    seconds, _ = bounded(run.close)
    assert seconds < 3
    fake.release.set()
    next_step_works(engine, fake)


def test_every_server_error_is_a_server_error():
    for cls in (ServerStreamError, ServerRequestError, ServerUnreachableError):
        assert issubclass(cls, ServerError)
