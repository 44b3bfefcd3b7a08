"""The server backend's wire protocol: addresses, request payloads, error mapping and SSE parsing for two dialects.

The two dialects are llama.cpp's native ``/completion`` (``cache_prompt``, ``return_tokens``,
``timings.cache_n``) and OpenAI ``/v1/completions`` (vLLM, SGLang, others:
``usage.prompt_tokens_details.cached_tokens``). Everything here is pure: no connection, no state
beyond the :class:`StreamState` one reply accumulates.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

from ...generation import GenerationConfig
from .errors import (ServerContextError, ServerError, ServerModelError, ServerRequestError, ServerStreamError,
                     ServerUnreachableError)

__all__ = ["ServerInfo", "Prepared", "StreamState", "PROBE_TEXT", "split_url", "cache_advice",
           "build_payload", "http_error", "stream_events", "read_event", "finish_reason", "cache_figures"]

#: text tokenized both here and on the server at connect time: the same ids means the same tokenizer
PROBE_TEXT = "Hello world! The log says: ERROR 503 at 12:04 (disk /var/tmp full).\n<|im_start|>user\nok"


def cache_advice(flavor: str) -> str:
    return {"vllm": "start vLLM with --enable-prompt-tokens-details",
            "sglang": "start SGLang with --enable-cache-report"}.get(
        flavor, "use a server that reports usage.prompt_tokens_details.cached_tokens (vLLM: "
                "--enable-prompt-tokens-details, SGLang: --enable-cache-report) or llama.cpp (timings.cache_n)")


# --------------------------------------------------------------------------- server description
@dataclass
class ServerInfo:
    """What the connect-time probe found out about a server."""

    url: str                 # as given
    base_url: str            # scheme://host:port (+ path prefix), without /v1
    api_url: str             # base_url + /v1
    flavor: str              # "llama.cpp" | "vllm" | "sglang" | "openai"
    model_id: str
    n_ctx: int | None = None
    n_vocab: int | None = None
    model_path: str | None = None
    markers: str = "text"    # "ids": the server has our marker tokens; "text": sent as ordinary tokens
    marker_wire: dict[int, list[int]] = field(default_factory=dict)
    tokenizer_spec: str = ""
    tokenizer_checked: bool = False


def split_url(url: str) -> tuple[str, str]:
    """(base URL without ``/v1``, API URL with it) of a server address."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ServerError(f"{url!r} is not a server address; expected http(s)://HOST:PORT/v1.")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    base = f"{parts.scheme}://{parts.netloc}{path}"
    return base, base + "/v1"


# --------------------------------------------------------------------------- requests
@dataclass
class Prepared:
    """What a constraint adds around one request (built once per call, before any request)."""

    prefix_ids: list[int] = field(default_factory=list)   # appended to the prompt (e.g. "<tool_call>")
    prefix_text: str = ""
    suffix_text: str = ""                                  # appended to the reply (e.g. "</tool_call>")
    suffix_ids: list[int] = field(default_factory=list)
    schema: dict | None = None                             # JSON schema the generated part must follow
    banned_ids: list[int] = field(default_factory=list)    # tokens the reply may not contain (logit bias)


def build_payload(info: ServerInfo, prompt: Any, config: GenerationConfig, prepared: Prepared,
                  warn_once: Callable[[str, str], None]) -> tuple[str, dict]:
    """(url, JSON body) of a streamed completion request for this server flavour."""
    ignore_eos = (not config.stop_at_eos) or (config.min_new_tokens > 0
                                              and config.min_new_tokens >= config.max_new_tokens)
    if config.min_new_tokens and not ignore_eos and info.flavor == "llama.cpp":
        warn_once("min_tokens", "llama.cpp has no min_tokens; min_new_tokens is honoured only when it "
                                "equals max_new_tokens (EOS ignored).")
    if info.flavor == "llama.cpp":
        return info.base_url + "/completion", _llama_body(prompt, config, prepared, ignore_eos)
    return info.api_url + "/completions", _openai_body(info, prompt, config, prepared, ignore_eos)


def _llama_body(prompt: Any, config: GenerationConfig, prepared: Prepared, ignore_eos: bool) -> dict:
    body: dict[str, Any] = {
        "prompt": prompt, "n_predict": config.max_new_tokens, "stream": True, "cache_prompt": True,
        "return_tokens": True, "temperature": config.temperature, "top_p": config.top_p,
        "top_k": config.top_k, "min_p": 0.0, "repeat_penalty": 1.0, "stop": list(config.stop),
        "ignore_eos": ignore_eos, "n_keep": 0}
    if config.seed is not None:
        body["seed"] = int(config.seed)
    if prepared.banned_ids:
        body["logit_bias"] = [[int(t), False] for t in prepared.banned_ids]  # false: never sampled
    if prepared.schema is not None:
        # llguidance (llama.cpp's JSON-schema engine): compact JSON, no indentation tokens
        body["json_schema"] = {**prepared.schema, "x-guidance": {
            "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
    return body


def _openai_body(info: ServerInfo, prompt: Any, config: GenerationConfig, prepared: Prepared,
                 ignore_eos: bool) -> dict:
    body: dict[str, Any] = {"model": info.model_id, "prompt": prompt, "max_tokens": config.max_new_tokens,
                            "stream": True, "stream_options": {"include_usage": True},
                            "temperature": config.temperature, "top_p": config.top_p}
    if config.stop:
        body["stop"] = list(config.stop)
    if config.seed is not None:
        body["seed"] = int(config.seed)
    if config.top_k:
        body["top_k"] = config.top_k
    if ignore_eos:
        body["ignore_eos"] = True
    elif config.min_new_tokens:
        body["min_tokens"] = config.min_new_tokens
    if info.flavor == "vllm":
        body["return_token_ids"] = True
    if prepared.banned_ids:
        body["logit_bias"] = {str(int(t)): -100 for t in prepared.banned_ids}
    if prepared.schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": prepared.schema}}
        if info.flavor == "sglang":
            body["json_schema"] = json.dumps(prepared.schema)
    return body


def http_error(info: ServerInfo, url: str, status: int, text: str, wire_len: int) -> ServerError:
    """Map an HTTP error answer (or an error event) to the right :class:`ServerError`."""
    try:
        err = json.loads(text).get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    msg = err.get("message") if isinstance(err, dict) else str(err)
    msg = msg or text[:500]
    low = msg.lower()
    etype = str(err.get("type", "")) if isinstance(err, dict) else ""
    if "exceed_context" in etype or "context size" in low or "context length" in low or \
            "maximum context" in low or "too long" in low:
        limit = err.get("n_ctx") if isinstance(err, dict) else None
        return ServerContextError(wire_len + 1, int(limit or info.n_ctx or 0), url)
    if status == 404 and "model" in low:
        return ServerModelError(f"The server at {url} does not serve model {info.model_id!r}: {msg}")
    if status == 503:
        return ServerUnreachableError(f"The server at {url} is not ready (HTTP 503): {msg}")
    return ServerRequestError(f"The server at {url} refused the request (HTTP {status}): {msg}")


# --------------------------------------------------------------------------- streamed replies
@dataclass
class StreamState:
    """What one streamed reply has delivered so far."""

    raw: str = ""                      # the reply text (including a constraint's prefix text)
    gen_ids: list[int] = field(default_factory=list)
    got_ids: bool = False              # the server sent the generated ids (else they are re-tokenized)
    final: dict | None = None          # llama.cpp: the last event (``stop: true``: timings, stop type)
    usage_block: dict | None = None    # OpenAI dialect: the ``usage`` object
    finish: str | None = None          # OpenAI dialect: ``finish_reason``
    first_token_at: float | None = None

    def complete(self, llama: bool) -> bool:
        """The server said the reply is finished (a stream that ends before this was cut)."""
        return self.final is not None if llama else (self.finish is not None or self.usage_block is not None)


def stream_events(lines: Iterable[str], url: str) -> Iterator[dict]:
    """The JSON events of a server-sent-events stream, up to ``[DONE]``; a malformed one is an error."""
    for line in lines:
        if not line.startswith("data:"):
            if line.startswith("error:"):
                raise ServerRequestError(f"The server at {url} failed mid-stream: {line[6:].strip()}")
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            ev = json.loads(data)
        except ValueError:
            ev = None
        if not isinstance(ev, dict):
            raise ServerStreamError(
                f"The server at {url} sent a malformed stream event ({data[:120]!r}); the call failed, "
                "the next call starts a fresh request. Check that the address is a llama.cpp, vLLM or "
                "SGLang server.")
        yield ev


def read_event(ev: dict, state: StreamState, llama: bool) -> str:
    """Record one event in ``state``; the text it adds."""
    if llama:
        text = ev.get("content", "") or ""
        _add_ids(state, ev.get("tokens"))
        if ev.get("stop"):
            state.final = ev
    else:
        if ev.get("usage"):
            state.usage_block = ev["usage"]
        choices = ev.get("choices") or []
        text = ""
        if choices:
            ch = choices[0]
            text = ch.get("text", "") or ""
            _add_ids(state, ch.get("token_ids"))
            if ch.get("finish_reason"):
                state.finish = ch["finish_reason"]
    if text:
        if state.first_token_at is None:
            state.first_token_at = time.perf_counter()
        state.raw += text
    return text


def _add_ids(state: StreamState, toks: Any) -> None:
    if isinstance(toks, list):
        state.got_ids = True
        state.gen_ids += [int(t) for t in toks]


def finish_reason(state: StreamState, llama: bool, n_ctx: int | None, cancelled: bool,
                  stop: Iterable[str]) -> tuple[str | None, str | None]:
    """(finish reason, stop string that ended the reply) of a finished stream."""
    finish, stop_string = state.finish, None
    final = state.final
    if llama and final is not None:
        stop_type = final.get("stop_type", "")
        if stop_type == "word":
            finish, stop_string = "stop", final.get("stopping_word") or None
        elif stop_type == "eos":
            finish = "stop"
        else:
            used = int(final.get("tokens_evaluated", 0)) + int(final.get("tokens_predicted", 0))
            finish = "context" if n_ctx and used >= n_ctx else "length"
    elif finish is not None and finish not in ("stop", "length"):
        finish = "stop"
    if cancelled:
        finish = finish or "stop"
    if finish == "stop" and stop_string is None and not llama and stop:
        for s in stop:  # OpenAI servers do not say which stop string hit; assume one did if present
            if s in state.raw:
                stop_string = s
    return finish, stop_string


def cache_figures(state: StreamState, n_wire: int) -> tuple[int | None, int | None, float | None, float | None]:
    """(cached, computed, prefill seconds, decode seconds) as the server reported them (None: not reported)."""
    cached: int | None = None
    computed: int | None = None
    prefill = decode = None
    if state.final is not None:
        timings = state.final.get("timings") or {}
        if "cache_n" in timings:
            cached = int(timings["cache_n"])
            computed = int(timings.get("prompt_n", n_wire - cached))
        if "prompt_ms" in timings:
            prefill = float(timings["prompt_ms"]) / 1000
            decode = float(timings.get("predicted_ms", 0.0)) / 1000
    if state.usage_block is not None and cached is None:
        details = state.usage_block.get("prompt_tokens_details") or {}
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            cached = int(details["cached_tokens"])
            computed = int(state.usage_block.get("prompt_tokens", n_wire)) - cached
    return cached, computed, prefill, decode
