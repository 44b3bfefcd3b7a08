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
           "build_payload", "http_error", "stream_events", "read_event", "finish_reason", "cache_figures",
           "bad_answer", "load_json", "checked_int", "token_list"]

#: text tokenized both here and on the server at connect time: the same ids means the same tokenizer
PROBE_TEXT = "Hello world! The log says: ERROR 503 at 12:04 (disk /var/tmp full).\n<|im_start|>user\nok"


#: the advice every malformed answer ends with
CHECK_SERVER = "Check that the address is a llama.cpp, vLLM or SGLang server (a current version)."


# --------------------------------------------------------------------------- validating answers
# A server answer is untrusted input: each value we use is checked here, so a wrong one is our
# ServerError naming the endpoint and the field, never a KeyError/TypeError/RecursionError from deep inside.
def bad_answer(where: str, what: str, error: type[ServerError] = ServerError) -> ServerError:
    """The error for an answer of the wrong shape from ``where`` (e.g. ``GET http://h:p/v1/models``)."""
    retry = " The call failed; the next call starts a fresh request." if issubclass(error, ServerStreamError) else ""
    return error(f"The server's answer to {where} has an unexpected shape: {what}.{retry} {CHECK_SERVER}")


def load_json(text: str, where: str, error: type[ServerError] = ServerError) -> Any:
    """``text`` parsed as JSON; no JSON, or JSON nested past Python's recursion limit, is our error."""
    try:
        return json.loads(text)
    except RecursionError:
        raise bad_answer(where, "its JSON is nested too deep to read", error) from None
    except ValueError:
        raise bad_answer(where, f"it is not JSON ({text[:80]!r})", error) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to us


def checked_int(value: Any, where: str, name: str, minimum: int = 1,
          error: type[ServerError] = ServerError) -> int | None:
    """``value`` as an integer >= ``minimum`` the server reports (None stays None: not reported)."""
    if value is None:
        return None
    if not _is_int(value) or value < minimum:
        raise bad_answer(where, f"{name} must be an integer >= {minimum}, the server sent {value!r:.80}", error)
    return value


def token_list(value: Any, where: str, name: str = "tokens", error: type[ServerError] = ServerError) -> list[int]:
    """Token ids as a server lists them: ints, or llama.cpp's ``{"id": ..., "piece": ...}`` (``with_pieces``)."""
    if not isinstance(value, list):
        raise bad_answer(where, f"{name} must be a list of token ids, the server sent {value!r:.80}", error)
    ids = [t.get("id") if isinstance(t, dict) else t for t in value]
    for tid, raw in zip(ids, value):
        if not _is_int(tid) or tid < 0:
            raise bad_answer(where, f"{name} must hold token ids (integers >= 0), the server sent {raw!r:.80}", error)
    return ids


def _typed(obj: dict, key: str, kind: type, where: str, error: type[ServerError]) -> Any:
    """``obj[key]`` if it is a ``kind`` (or absent/null: None); another type is a malformed answer."""
    value = obj.get(key)
    if value is None:
        return None
    if kind is int:
        ok = _is_int(value) and value >= 0
    elif kind is float:  # a duration or a count: any JSON number >= 0 (NaN is not)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise bad_answer(where, f"{key!r} must be {_KIND_NAMES[kind]}, the server sent {value!r:.80}", error)
    return value


_KIND_NAMES = {str: "a string", list: "a list", dict: "an object", bool: "true or false",
               int: "an integer >= 0", float: "a number >= 0"}


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
    except (ValueError, AttributeError, RecursionError):  # not JSON (or too deep): the raw text is the message
        err = {}
    msg = err.get("message") if isinstance(err, dict) else str(err)
    msg = str(msg or text[:500])[:500]
    low = msg.lower()
    etype = str(err.get("type", "")) if isinstance(err, dict) else ""
    if "exceed_context" in etype or "context size" in low or "context length" in low or \
            "maximum context" in low or "too long" in low:
        limit = err.get("n_ctx") if isinstance(err, dict) else None
        limit = limit if _is_int(limit) and limit > 0 else info.n_ctx
        return ServerContextError(wire_len + 1, int(limit or 0), url)
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
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python can parse
            ev = None
        if not isinstance(ev, dict):
            raise ServerStreamError(
                f"The server at {url} sent a malformed stream event (not a JSON object: {data[:120]!r}); the call "
                f"failed, the next call starts a fresh request. {CHECK_SERVER}")
        yield ev


def read_event(ev: dict, state: StreamState, llama: bool, where: str = "the completion request") -> str:
    """Record one event in ``state``; the text it adds. Every field used is type-checked here, so a
    wrong one is a :class:`ServerStreamError` naming it, and later steps (finish, cache figures) can trust it."""
    def get(obj: dict, key: str, kind: type) -> Any:
        return _typed(obj, key, kind, f"{where} (stream event)", ServerStreamError)

    if llama:
        text = get(ev, "content", str) or ""
        _add_ids(state, ev.get("tokens"), where, "tokens")
        if get(ev, "stop", bool):
            for key, kind in (("stop_type", str), ("stopping_word", str), ("tokens_evaluated", int),
                              ("tokens_predicted", int), ("timings", dict)):
                get(ev, key, kind)
            timings = ev.get("timings") or {}
            for key, kind in (("cache_n", int), ("prompt_n", int), ("prompt_ms", float), ("predicted_ms", float)):
                get(timings, key, kind)
            state.final = ev
    else:
        usage = get(ev, "usage", dict)
        if usage:
            get(usage, "prompt_tokens", int)
            details = get(usage, "prompt_tokens_details", dict) or {}
            get(details, "cached_tokens", int)
            state.usage_block = usage
        choices = get(ev, "choices", list) or []
        text = ""
        if choices:
            ch = choices[0]
            if not isinstance(ch, dict):
                raise bad_answer(f"{where} (stream event)", f"choices[0] must be an object, the server sent "
                                 f"{ch!r:.80}", ServerStreamError)
            text = get(ch, "text", str) or ""
            _add_ids(state, ch.get("token_ids"), where, "token_ids")
            finish = get(ch, "finish_reason", str)
            if finish:
                state.finish = finish
    if text:
        if state.first_token_at is None:
            state.first_token_at = time.perf_counter()
        state.raw += text
    return text


def _add_ids(state: StreamState, toks: Any, where: str, name: str) -> None:
    if toks is not None:  # absent: the server does not send ids (they are re-tokenized)
        state.gen_ids += token_list(toks, f"{where} (stream event)", name, ServerStreamError)
        state.got_ids = True


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
            used = int(final.get("tokens_evaluated") or 0) + int(final.get("tokens_predicted") or 0)
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
    if state.final is not None:  # fields type-checked by read_event; null counts as not reported
        timings = state.final.get("timings") or {}
        if timings.get("cache_n") is not None:
            cached = int(timings["cache_n"])
            prompt_n = timings.get("prompt_n")
            computed = int(prompt_n) if prompt_n is not None else n_wire - cached
        if timings.get("prompt_ms") is not None:
            prefill = float(timings["prompt_ms"]) / 1000
            decode = float(timings.get("predicted_ms") or 0.0) / 1000
    if state.usage_block is not None and cached is None:
        details = state.usage_block.get("prompt_tokens_details") or {}
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            cached = int(details["cached_tokens"])
            prompt_tokens = state.usage_block.get("prompt_tokens")
            computed = int(prompt_tokens if prompt_tokens is not None else n_wire) - cached
    return cached, computed, prefill, decode
