"""Fault suite for the server backend (issue 16): a llama.cpp look-alike on 127.0.0.1 that dies
mid-stream, stalls, trickles, sends malformed SSE, answers HTTP 500, or restarts with an empty
cache. Each fault gives a clear ``ServerError`` (or a correct, recomputed answer) within the
timeout, never a hang, and the conversation continues on the next call.

Runs on the tiny model's tokenizer (no real model, no llama.cpp build needed).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

httpx = pytest.importorskip("httpx")

from flashback_agents.backends.server import (ServerError, ServerRequestError, ServerStreamError,  # noqa: E402
                                              ServerUnreachableError)
from flashback_agents.engines import clear_server_engines, server_engine  # noqa: E402
from flashback_agents.generation import GenerationConfig  # noqa: E402
from flashback_agents.layout import Message  # noqa: E402

REPLY = "Hello there"


class FakeLlama:
    """A llama.cpp ``/completion`` server whose next replies can be told to fail in given ways."""

    def __init__(self, tokenizer_dir: str, port: int = 0):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.faults: list[str] = []      # consumed one per completion request
        self.cached: list[int] = []      # the prompt the server's prefix cache holds
        self.release = threading.Event()  # frees handlers stalled by "stall"
        self.requests = 0
        self.conns: list = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                fake.conns.append(self.connection)

            def _json(self, obj, status=200):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._json({"object": "list", "data": [{"id": "tiny", "owned_by": "llamacpp",
                                                            "meta": {"n_vocab": len(fake.tok), "n_ctx": 2048}}]})
                else:
                    self._json({"error": {"code": 404, "message": "not found"}}, 404)

            def _chunk(self, raw: bytes):
                self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
                self.wfile.flush()

            def _event(self, obj):
                self._chunk(f"data: {json.dumps(obj)}\n\n".encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                if self.path == "/tokenize":
                    self._json({"tokens": fake.tok.encode(body["content"], add_special_tokens=False)})
                    return
                fake.requests += 1
                fault = fake.faults.pop(0) if fake.faults else "ok"
                prompt = list(body["prompt"])
                if fault == "http500":
                    self._json({"error": {"code": 500, "message": "internal error: slot crashed", "type": "server"}}, 500)
                    return
                if fault == "stall":  # accepts, then says nothing
                    fake.release.wait(30)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                ids = fake.tok.encode(REPLY, add_special_tokens=False)
                if fault == "trickle":  # a token now and then, forever (each read is within the timeout)
                    while not fake.release.is_set():
                        self._event({"content": "a", "tokens": [ids[0]], "stop": False})
                        time.sleep(0.1)
                    return
                if fault == "malformed":
                    self._chunk(b"data: {this is not json\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if fault == "wrong-shape":
                    self._event({"content": 5, "tokens": "abc", "stop": False})
                    self.wfile.write(b"0\r\n\r\n")
                    return
                if fault == "error-event":
                    self._event({"error": {"code": 500, "message": "decode failed"}})
                    self.wfile.write(b"0\r\n\r\n")
                    return
                self._event({"content": fake.tok.decode(ids[:1]), "tokens": ids[:1], "stop": False})
                if fault == "kill":  # the process dies: half a chunk, then the socket closes
                    self.wfile.write(b"40\r\ndata: {\"content\": \"lo")
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if fault == "no-final":
                    self.wfile.write(b"0\r\n\r\n")
                    return
                text = fake.tok.decode(ids[1:])
                self._event({"content": text, "tokens": ids[1:], "stop": False})
                common = 0
                while common < min(len(prompt), len(fake.cached)) and prompt[common] == fake.cached[common]:
                    common += 1
                fake.cached = prompt + ids
                self._event({"content": "", "tokens": [], "stop": True, "stop_type": "eos",
                             "tokens_evaluated": len(prompt), "tokens_predicted": len(ids),
                             "timings": {"cache_n": common, "prompt_n": len(prompt) - common,
                                         "prompt_ms": 1.0, "predicted_ms": 1.0}})
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        """Like a killed process: the listening socket and every open connection go away."""
        import socket

        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass


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
