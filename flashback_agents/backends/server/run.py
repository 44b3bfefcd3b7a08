"""One completion on an OpenAI-compatible server: stream the reply, then fill :class:`ChatUsage` from
the server's cache report (``cache_read`` = prompt tokens the server did not compute).

:class:`ServerRun` is what :meth:`ServerBackend.start <flashback_agents.backends.server.backend.ServerBackend.start>`
returns; it reads the backend through its public methods (``payload``, ``open_stream``, ``http_error``,
``warn_once``, ``to_wire``). httpx is the optional dependency, imported where it is used.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Iterator

from ...generation import GenerationConfig, GenerationResult
from ..base import BackendRun, ChatUsage
from .errors import (ServerCacheReportError, ServerContextError, ServerStreamError,
                     ServerUnreachableError)
from .protocol import Prepared, StreamState, cache_advice, cache_figures, finish_reason, read_event, stream_events

if TYPE_CHECKING:
    from .backend import ServerBackend

__all__ = ["ServerRun"]


class ServerRun(BackendRun):
    """One streamed completion on the server. Closing the stream (cancel) stops the server's decoding."""

    def __init__(self, backend: ServerBackend, ids: list[int], config: GenerationConfig, prepared: Prepared):
        super().__init__(ids, config)
        self.backend, self.prepared = backend, prepared

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._iter()
        except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as exc:  # under read_event's checks
            raise ServerStreamError(f"The server at {self.backend.url} sent a reply of an unexpected shape "
                                    f"({type(exc).__name__}: {exc}); the call failed, the next call starts a fresh "
                                    "request. Check that the address is a llama.cpp, vLLM or SGLang server.") from exc

    def _iter(self) -> Iterator[str]:
        import httpx

        b = self.backend
        wire = b.to_wire(self.ids) + self.prepared.prefix_ids
        if b.info.n_ctx and len(wire) + 1 > b.info.n_ctx:
            raise ServerContextError(len(wire) + 1, int(b.info.n_ctx), b.url)
        url, body = b.payload(wire, self.config, self.prepared)
        llama = b.info.flavor == "llama.cpp"
        state = StreamState()
        t0 = time.perf_counter()
        try:
            cancelled = yield from self._stream(url, body, wire, state, llama)
        except httpx.ConnectError as exc:
            raise ServerUnreachableError(f"Cannot reach the model server at {b.url} ({exc}); start it again "
                                         "(or check the address): the next call reconnects.") from exc
        except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as exc:  # a safety net, as above
            raise ServerStreamError(f"The server at {b.url} sent a stream event of an unexpected shape "
                                    f"({type(exc).__name__}: {exc}); the call failed, the next call starts a fresh "
                                    "request. Check that the address is a llama.cpp, vLLM or SGLang server.") from exc
        except httpx.TimeoutException as exc:
            raise ServerStreamError(f"The model server at {b.url} timed out mid-request ({exc}); the call "
                                    "failed, the next call starts a fresh request.") from exc
        except httpx.TransportError as exc:  # RemoteProtocolError, ReadError: the connection dropped
            raise ServerStreamError(f"The connection to the model server at {b.url} dropped mid-stream after "
                                    f"{len(state.raw)} characters ({type(exc).__name__}: {exc}); the call failed, "
                                    "the next call starts a fresh request.") from exc
        seconds = time.perf_counter() - t0
        if not cancelled and not state.complete(llama):
            raise ServerStreamError(f"The stream from {b.url} ended before the server finished the reply; "
                                    "the call failed, the next call starts a fresh request.")
        self._finish(wire, state, llama, cancelled, seconds, t0)

    def _stream(self, url: str, body: dict, wire: list[int], state: StreamState, llama: bool):
        """Send the request and yield the reply's text as it streams; True when cancelled midway."""
        import httpx

        b, prep = self.backend, self.prepared
        limit = self.timeout if self.timeout is not None else b.timeout
        deadline = None if limit is None else time.monotonic() + limit
        with b.open_stream(url, body, timeout=self.timeout) as r:
            if r.status_code >= 400:
                r.read()
                raise b.http_error(r.status_code, r.text, len(wire))
            if prep.prefix_text:
                state.raw += prep.prefix_text
                yield prep.prefix_text
            for ev in stream_events(r.iter_lines(), f"{b.url} (POST {url})"):
                if deadline is not None and time.monotonic() > deadline:
                    raise httpx.ReadTimeout(f"no complete reply within {limit:g} s")
                if "error" in ev:
                    err = ev["error"]
                    code = err.get("code") if isinstance(err, dict) else None
                    raise b.http_error(code if isinstance(code, int) and 400 <= code < 600 else 500,
                                       json.dumps(ev), len(wire))
                text = read_event(ev, state, llama, f"POST {url}")
                if text:
                    yield text
                if self._cancelled.is_set():
                    return True  # leaving the block closes the connection: the server stops decoding
        return False

    def _finish(self, wire: list[int], state: StreamState, llama: bool, cancelled: bool, seconds: float,
                t0: float) -> None:
        """Set ``result`` and ``usage`` from a finished (or cancelled) stream."""
        b, prep = self.backend, self.prepared
        finish, stop_string = finish_reason(state, llama, b.info.n_ctx, cancelled, self.config.stop)
        eos = b.lm.tokenizer.eos_token_id
        gen_ids = state.gen_ids
        if not state.got_ids:  # no generated ids from the server: re-tokenize (a cache miss on the reply at worst)
            gen_ids = b.lm.encode(state.raw[len(prep.prefix_text):])
        if gen_ids and finish == "stop" and stop_string is None and (
                gen_ids[-1] == eos or gen_ids[-1] in self._special_ids()):
            gen_ids = gen_ids[:-1]  # the end-of-generation token (llama.cpp may pick any EOG token)
        raw = state.raw
        token_ids = list(prep.prefix_ids) + gen_ids
        if prep.suffix_text and not cancelled and finish == "stop":
            raw += prep.suffix_text
            token_ids += prep.suffix_ids
        if finish == "stop" and stop_string is None and eos is not None and not cancelled:
            token_ids.append(int(eos))  # the end-of-turn token, as the in-process engine reports it
        self.result = GenerationResult(text=raw, token_ids=token_ids, finish_reason=finish or "stop",
                                       seconds=seconds, stop_string=stop_string)
        self.usage = self._usage(wire, state, len(gen_ids), seconds, t0)

    def _special_ids(self) -> set[int]:
        return set(getattr(self.backend.lm.tokenizer, "all_special_ids", []) or [])

    def _usage(self, wire: list[int], state: StreamState, n_out: int, seconds: float, t0: float) -> ChatUsage:
        b = self.backend
        cached, computed, prefill, decode = cache_figures(state, len(wire))
        if cached is None:
            msg = (f"The server at {b.url} ({b.info.flavor}) did not report how many prompt tokens came from its "
                   f"cache, so cache_read cannot be measured; {cache_advice(b.info.flavor)}.")
            if b.require_cache_report:
                raise ServerCacheReportError(msg)
            b.warn_once("cache", msg + " cache_read is reported as 0.")
            cached, computed = 0, len(wire)
        if prefill is None:
            prefill = (state.first_token_at - t0) if state.first_token_at is not None else seconds
            decode = seconds - prefill
        return ChatUsage(input_tokens=len(wire), output_tokens=n_out, cache_read=cached, computed=computed,
                         prefill_seconds=prefill, decode_seconds=decode)
