"""Fault suite for the server backend (issue 16): a llama.cpp look-alike on 127.0.0.1 that dies
mid-stream, stalls, trickles, sends malformed SSE, answers HTTP 500, or restarts with an empty
cache. Each fault gives a clear ``ServerError`` (or a correct, recomputed answer) within the
timeout, never a hang, and the conversation continues on the next call.

Runs on the tiny model's tokenizer (no real model, no llama.cpp build needed).
"""

from __future__ import annotations

import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

from fake_llama import FakeLlama  # noqa: E402

from flashback_agents.backends.server import (ServerError, ServerRequestError, ServerStreamError,  # noqa: E402
                                              ServerUnreachableError)
from flashback_agents.engines import clear_server_engines, server_engine  # noqa: E402
from flashback_agents.generation import GenerationConfig  # noqa: E402
from flashback_agents.layout import Message  # noqa: E402

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
    out: dict = {}

    def target():
        try:
            out["v"] = fn()
        except BaseException as exc:  # noqa: BLE001
            out["v"] = exc

    t0 = time.monotonic()
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(deadline)
    assert not t.is_alive(), f"hung for more than {deadline} s"
    return time.monotonic() - t0, out["v"]


CONV = [Message("system", "You answer."), Message("user", "hi")]
CFG = GenerationConfig(max_new_tokens=8)


def next_step_works(engine, fake, msgs=CONV):
    reply = engine.chat(msgs, config=CFG)
    assert reply.text == REPLY and reply.finish_reason == "stop"
    return reply


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
