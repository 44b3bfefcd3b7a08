"""A llama.cpp ``/completion`` look-alike on 127.0.0.1 for the server-backend tests (one for all of them).

It tokenizes with a real tokenizer, keeps a prefix cache of the last prompt (reporting ``cache_n`` as
llama.cpp does), and its next replies can be told to fail: ``faults`` takes "kill" (half a chunk,
then the socket closes), "http500", "stall", "trickle", "malformed", "wrong-shape", "error-event",
"no-final". ``answers`` maps a path ("/v1/models", "/props", "/tokenize", "/completion") to the
(status, body) it answers instead, every time: a malformed server (``tests/test_server_answers.py``).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeLlama:
    """A llama.cpp ``/completion`` server whose next replies can be told to fail in given ways."""

    def __init__(self, tokenizer: Any, port: int = 0, model_id: str = "tiny", reply: str = "Hello there"):
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tok, self.model_id, self.reply = tokenizer, model_id, reply
        self.wrong_tokens = False        # /tokenize answers other ids (a different model)
        self.timings = True              # the final event reports cache figures
        self.last_cache_n: int | None = None
        self.faults: list[str] = []      # consumed one per completion request
        self.cached: list[int] = []      # the prompt the server's prefix cache holds
        self.release = threading.Event()  # frees handlers stalled by "stall"
        self.requests = 0
        self.answers: dict[str, tuple[int, str]] = {}  # path -> (status, raw body) instead of the normal answer
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

            def _answer(self) -> bool:
                """Send the canned answer for this path, if there is one (the body as it is: not JSON, say)."""
                if self.path not in fake.answers:
                    return False
                status, body = fake.answers[self.path]
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/event-stream" if self.path == "/completion"
                                 else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return True

            def do_GET(self):
                if self._answer():
                    return
                if self.path == "/v1/models":
                    self._json({"object": "list", "data": [{"id": fake.model_id, "owned_by": "llamacpp",
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
                if self._answer():
                    return
                if self.path == "/tokenize":
                    ids = fake.tok.encode(body["content"], add_special_tokens=False)
                    self._json({"tokens": [i + 1 for i in ids] if fake.wrong_tokens else ids})
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
                ids = fake.tok.encode(fake.reply, add_special_tokens=False)
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
                fake.last_cache_n = common
                final = {"content": "", "tokens": [], "stop": True, "stop_type": "eos",
                         "tokens_evaluated": len(prompt), "tokens_predicted": len(ids)}
                if fake.timings:
                    final["timings"] = {"cache_n": common, "prompt_n": len(prompt) - common,
                                        "prompt_ms": 1.0, "predicted_ms": 1.0}
                self._event(final)
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
