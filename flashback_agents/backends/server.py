"""OpenAI-compatible server backend: the append layout on llama.cpp, vLLM or SGLang prefix caches.

The engine renders conversations locally (tokenizer only, the same ``Layout`` code as in-process) and
sends the token ids as a *completion* prompt, so the server sees exactly the append layout: every step
extends the previous prompt, and the server's prefix cache computes only the new tail. The server's
own cache figures come back as ``cache_read``:

- llama.cpp (``llama-server``, or ``flashback-agents serve`` through xllamacpp): native ``/completion``
  with ``cache_prompt: true`` and ``return_tokens: true``; ``timings.cache_n`` / ``timings.prompt_n``.
- vLLM, SGLang, others: ``/v1/completions`` with the ids as ``prompt``;
  ``usage.prompt_tokens_details.cached_tokens`` (vLLM needs ``--enable-prompt-tokens-details``,
  SGLang ``--enable-cache-report``).

Markers: a stock model (e.g. the default GGUF) has no ``<MARK_L>``/``<MARK_R>`` tokens, and ids past
the server's vocabulary would be rejected. At connect time the backend asks the server to tokenize the
two markers: if each is one token with our id (an exported model, ``flashback-agents export --gguf``),
the ids are sent as they are; otherwise every marker id is replaced by the server's tokenization of the
marker *text* ("<MARK_L>" as ordinary tokens). Rendering is deterministic either way, so prefixes stay
prefixes.

Required tool calls are constrained on the server (its grammar support): the prompt is extended with
``<tool_call>``, the output is constrained by the call's JSON schema (llama.cpp ``json_schema``, OpenAI
``response_format``), and ``</tool_call>`` is appended to the reply; so the reply ids equal what the
server cached and the next step is still a pure extension.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from ..context import ContextOverflowError
from ..generation import GenerationConfig, GenerationResult
from ..layout import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from ..models import MARK_L, MARK_R, LoadedModel, ModelLoadError
from .base import Backend, BackendRun, ChatUsage, Constraint

__all__ = ["ServerError", "ServerUnreachableError", "ServerModelError", "ServerContextError",
           "ServerCacheReportError", "ServerCacheReportWarning", "ServerStreamError", "ServerRequestError",
           "ServerInfo", "ServerBackend", "is_server_spec",
           "load_server_tokenizer"]

_PROBE = "Hello world! The log says: ERROR 503 at 12:04 (disk /var/tmp full).\n<|im_start|>user\nok"


# --------------------------------------------------------------------------- errors
class ServerError(RuntimeError):
    """Something about the model server (not the conversation) went wrong; the message says what."""


class ServerUnreachableError(ServerError):
    """Nothing answers at the server address."""


class ServerModelError(ServerError):
    """The server runs a different model (tokenizer) than the one we render for, or none we can use."""


class ServerContextError(ServerError, ContextOverflowError):
    """The prompt does not fit the server's context window."""

    def __init__(self, needed: int, limit: int, url: str):
        self.needed, self.limit, self.over = needed, limit, needed - limit
        RuntimeError.__init__(
            self, f"Context overflow on the server {url}: the prompt needs {needed} tokens (plus at least one "
            f"to generate) but the server's context window is {limit} ({needed - limit} too many). Shorten "
            "the conversation, or restart the server with a larger context (llama.cpp: --ctx-size / "
            "`flashback-agents serve --ctx-size`; vLLM: --max-model-len).")


class ServerCacheReportError(ServerError):
    """The server did not report how many prompt tokens came from its cache (strict mode)."""


class ServerCacheReportWarning(UserWarning):
    """The server did not report cache figures; ``cache_read`` is 0 (not measured)."""


class ServerStreamError(ServerError):
    """The connection dropped (or the stream ended early) while a reply was streaming."""


class ServerRequestError(ServerError):
    """The server refused a request (HTTP error) for another reason; its message is included."""


def is_server_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.strip().lower().startswith(("http://", "https://"))


def _cache_advice(flavor: str) -> str:
    return {"vllm": "start vLLM with --enable-prompt-tokens-details",
            "sglang": "start SGLang with --enable-cache-report"}.get(
        flavor, "use a server that reports usage.prompt_tokens_details.cached_tokens (vLLM: "
                "--enable-prompt-tokens-details, SGLang: --enable-cache-report) or llama.cpp (timings.cache_n)")


# --------------------------------------------------------------------------- tokenizer-only model
@dataclass
class ServerTokenizerModel(LoadedModel):
    """A :class:`LoadedModel` with a tokenizer and no weights: rendering runs here, compute on the server."""

    context_window: int = 8192
    server_url: str = ""

    @property
    def max_positions(self) -> int:  # type: ignore[override]
        return self.context_window

    @property
    def eos_token_ids(self) -> set[int]:  # type: ignore[override]
        eos = self.tokenizer.eos_token_id
        return {int(eos)} if eos is not None else set()

    @property
    def device(self):  # type: ignore[override]
        import torch

        return torch.device("cpu")

    @property
    def dtype(self):  # type: ignore[override]
        import torch

        return torch.float32

    @property
    def fingerprint(self) -> str:  # type: ignore[override]
        if self._fingerprint is None:
            vocab = self.tokenizer.get_vocab()
            h = hashlib.sha256(f"server:{self.server_url}:{len(self.tokenizer)}:{self.marker_ids}".encode())
            h.update(json.dumps(sorted(vocab.items())[:: max(1, len(vocab) // 512)]).encode())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint


def load_server_tokenizer(spec: str) -> tuple[Any, str]:
    """The tokenizer for a model spec, without loading weights (nothing is downloaded).

    The default model (or its GGUF) uses the converted default model directory's tokenizer (the same
    ids the in-process engine uses); another .gguf file its embedded tokenizer; a directory or a Hub id
    (already in the local cache) its tokenizer files.
    """
    from transformers import AutoTokenizer

    from ..models import DEFAULT_MODEL, convert_gguf, default_gguf_path, is_default_spec

    spec = str(spec).strip()
    expanded = os.path.expanduser(spec)
    try:
        default_gguf = default_gguf_path()
    except ModelLoadError:
        default_gguf = None
    try:
        if is_default_spec(spec) or (default_gguf is not None and os.path.isfile(expanded)
                                                and Path(expanded).resolve() == default_gguf.resolve()):
            return AutoTokenizer.from_pretrained(str(convert_gguf(default_gguf_path()))), DEFAULT_MODEL
        if expanded.lower().endswith(".gguf"):
            if not os.path.isfile(expanded):
                raise ModelLoadError(f"GGUF file not found for the tokenizer: {expanded}")
            p = Path(expanded)
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name), p.stem
        if os.path.isdir(expanded):
            return AutoTokenizer.from_pretrained(expanded), Path(expanded).name
        return AutoTokenizer.from_pretrained(spec), spec
    except ModelLoadError:
        raise
    except Exception as exc:  # OSError / ValueError from transformers: say what to pass instead
        raise ModelLoadError(
            f"Could not load a tokenizer for {spec!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "Pass tokenizer= (or set FLASHBACK_TOKENIZER) to the served model's directory, .gguf file or a "
            "Hub id available offline.") from exc


def _add_marker_tokens_only(tokenizer: Any) -> tuple[int, int]:
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in (MARK_L, MARK_R) if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(MARK_L)), int(tokenizer.convert_tokens_to_ids(MARK_R))


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


def _split_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ServerError(f"{url!r} is not a server address; expected http(s)://HOST:PORT/v1.")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    base = f"{parts.scheme}://{parts.netloc}{path}"
    return base, base + "/v1"


# --------------------------------------------------------------------------- the backend
@dataclass
class _Prepared:
    prefix_ids: list[int] = field(default_factory=list)   # appended to the prompt (e.g. "<tool_call>")
    prefix_text: str = ""
    suffix_text: str = ""                                  # appended to the reply (e.g. "</tool_call>")
    suffix_ids: list[int] = field(default_factory=list)
    schema: dict | None = None                             # JSON schema the generated part must follow


class ServerBackend(Backend):
    """Runs rendered token ids on an OpenAI-compatible server with prefix caching."""

    def __init__(self, url: str, *, tokenizer: str | None = None, timeout: float = 600.0,
                 connect_timeout: float = 5.0, startup_wait: float = 60.0, api_key: str | None = None,
                 require_cache_report: bool = False, prompt_format: str = "ids"):
        import httpx

        if prompt_format not in ("ids", "text"):
            raise ValueError(f"prompt_format must be 'ids' or 'text', got {prompt_format!r}")
        base, api = _split_url(url)
        self.url = url
        self.require_cache_report = require_cache_report
        self.prompt_format = prompt_format
        #: seconds a whole reply may take (also each read's limit): a server that trickles forever still ends
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=httpx.Timeout(timeout, connect=connect_timeout), headers=headers)
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self.info = self._probe(url, base, api, startup_wait)
        self.lm = self._tokenizer_model(tokenizer)
        self._finish_probe()

    # ------------------------------------------------------------------ http helpers
    def _get(self, url: str) -> Any:
        import httpx

        try:
            r = self.client.get(url)
        except httpx.TransportError as exc:
            raise ServerUnreachableError(
                f"Cannot reach the model server at {self.url} ({type(exc).__name__}: {exc}). Start one with "
                "`flashback-agents serve --model PATH.gguf --port N` (llama.cpp), `vllm serve ...` or "
                "`python -m sglang.launch_server ...`, and check the host and port.") from exc
        return r

    def _post_json(self, url: str, payload: dict) -> Any | None:
        import httpx

        try:
            r = self.client.post(url, json=payload)
        except httpx.TransportError as exc:
            raise ServerUnreachableError(f"Lost the model server at {self.url} ({exc}).") from exc
        if r.status_code >= 400:
            return None
        try:
            return r.json()
        except ValueError:
            return None

    def _probe(self, url: str, base: str, api: str, startup_wait: float) -> ServerInfo:
        deadline = time.monotonic() + startup_wait
        while True:
            r = self._get(api + "/models")
            if r.status_code == 503 and time.monotonic() < deadline:  # llama.cpp: "Loading model"
                time.sleep(0.5)
                continue
            break
        if r.status_code >= 400:
            raise ServerError(f"The server at {url} answered GET /v1/models with HTTP {r.status_code}: "
                              f"{r.text[:300]}. Is it an OpenAI-compatible server (llama.cpp, vLLM, SGLang)?")
        try:
            data = r.json().get("data") or []
        except (ValueError, AttributeError):
            data = []
        if not isinstance(data, list) or not data or not isinstance(data[0], dict):
            raise ServerModelError(f"The server at {url} lists no model (GET /v1/models); is it an OpenAI-compatible "
                                   "server (llama.cpp, vLLM, SGLang) with a model loaded?")
        entry = data[0]
        owner = str(entry.get("owned_by", "")).lower()
        meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
        info = ServerInfo(url=url, base_url=base, api_url=api, flavor="openai", model_id=str(entry.get("id", "")),
                          n_vocab=meta.get("n_vocab"), n_ctx=meta.get("n_ctx") or entry.get("max_model_len"))
        props = None
        if owner in ("llamacpp", "llama.cpp") or "meta" in entry:
            info.flavor = "llama.cpp"
        elif owner in ("vllm", "sglang"):
            info.flavor = owner
        if info.flavor in ("llama.cpp", "openai"):
            pr = self._get(base + "/props")
            if pr.status_code == 200:
                try:
                    props = pr.json()
                except ValueError:
                    props = None
            if isinstance(props, dict) and "default_generation_settings" in props:
                info.flavor = "llama.cpp"
                slot_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
                info.n_ctx = slot_ctx or info.n_ctx  # per-slot window: what one request can use
                info.model_path = props.get("model_path")
        return info

    def _tokenizer_model(self, tokenizer: str | None) -> ServerTokenizerModel:
        info = self.info
        candidates = [tokenizer, os.environ.get("FLASHBACK_TOKENIZER")] if tokenizer else \
            [os.environ.get("FLASHBACK_TOKENIZER"), info.model_id, info.model_path]
        tried: list[str] = []
        tok, name = None, None
        for spec in candidates:
            if not spec:
                continue
            explicit = spec == tokenizer or spec == os.environ.get("FLASHBACK_TOKENIZER")
            try:
                tok, name = load_server_tokenizer(spec)
                info.tokenizer_spec = spec
                break
            except ModelLoadError as exc:
                if explicit:
                    raise
                tried.append(f"{spec!r} ({str(exc).splitlines()[0][:120]})")
        if tok is None:
            raise ServerModelError(
                f"Cannot tell which tokenizer the model on {self.url} uses (tried {', '.join(tried) or 'nothing'}). "
                "Pass tokenizer= (ChatEngine.shared / ServerBackend), --tokenizer, or set FLASHBACK_TOKENIZER to "
                "the served model's directory, .gguf file, or 'smollm2-135m-instruct' for the default GGUF.")
        self._base_vocab = len(tok)
        self._text_marker_ids = {MARK_L: list(tok.encode(MARK_L, add_special_tokens=False)),
                                 MARK_R: list(tok.encode(MARK_R, add_special_tokens=False))}
        marker_ids = _add_marker_tokens_only(tok)
        return ServerTokenizerModel(model=None, tokenizer=tok, marker_ids=marker_ids,
                                    name=name or info.model_id, context_window=int(info.n_ctx or 8192),
                                    server_url=info.base_url)

    def tokenize_on_server(self, text: str) -> list[int] | None:
        """The server's tokenization of ``text`` (special tokens parsed), or None if it has no endpoint."""
        payload = {"content": text, "add_special": False, "parse_special": True,
                   "model": self.info.model_id, "prompt": text, "add_special_tokens": False}
        data = self._post_json(self.info.base_url + "/tokenize", payload)
        toks = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(toks, list):
            return None
        return [int(t["id"]) if isinstance(t, dict) else int(t) for t in toks]

    def _finish_probe(self) -> None:
        info, lm = self.info, self.lm
        ours = lm.encode(_PROBE)
        theirs = self.tokenize_on_server(_PROBE)
        if theirs is not None:
            if theirs != ours:
                raise ServerModelError(
                    f"The model served at {self.url} ({info.model_id}) tokenizes text differently from the "
                    f"tokenizer {info.tokenizer_spec!r} used for rendering (server {theirs[:8]}..., ours "
                    f"{ours[:8]}...): wrong model. Pass the served model's tokenizer (tokenizer= / --tokenizer / "
                    "FLASHBACK_TOKENIZER) or point at the right server.")
            info.tokenizer_checked = True
        elif info.n_vocab is not None and int(info.n_vocab) < self._base_vocab:
            raise ServerModelError(f"The model served at {self.url} has {info.n_vocab} tokens but the tokenizer "
                                   f"{info.tokenizer_spec!r} has {self._base_vocab}: wrong model.")
        left, right = lm.marker_ids
        if theirs is not None and self.tokenize_on_server(MARK_L + MARK_R) == [left, right]:
            info.markers = "ids"
        else:
            info.markers = "text"
            wire = {}
            for token, tid in ((MARK_L, left), (MARK_R, right)):
                server_ids = self.tokenize_on_server(token) if theirs is not None else None
                wire[tid] = server_ids or self._text_marker_ids[token]
            info.marker_wire = wire

    # ------------------------------------------------------------------ rendering -> wire
    def to_wire(self, ids: list[int]) -> list[int]:
        """The prompt ids as the server gets them (marker ids replaced by marker text where needed)."""
        wire = self.info.marker_wire
        if not wire:
            return list(ids)
        out: list[int] = []
        for t in ids:
            rep = wire.get(t)
            if rep is None:
                out.append(t)
            else:
                out.extend(rep)
        return out

    def wire_length(self, ids: list[int]) -> int:
        wire = self.info.marker_wire
        return len(ids) + sum(len(wire[t]) - 1 for t in ids if t in wire) if wire else len(ids)

    # ------------------------------------------------------------------ Backend API
    def prepare(self, ids: list[int], config: GenerationConfig, constraint: Constraint | None) -> _Prepared:
        from ..constrained import ConstraintError, cap_strings

        if constraint is None:
            return _Prepared()
        if not isinstance(constraint.schema, dict):
            raise ConstraintError(f"response_schema must be a JSON schema dict, got {type(constraint.schema).__name__}.")
        schema = cap_strings(constraint.schema)
        try:  # validate here, before any request (xgrammar parses the schema without a tokenizer)
            import xgrammar as xgr

            xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        except ImportError:  # pragma: no cover - xgrammar is a dependency
            pass
        except Exception as exc:
            raise ConstraintError(f"Cannot build a grammar from this JSON schema: {exc}") from exc
        if constraint.kind == "json":
            return _Prepared(schema=schema)
        return _Prepared(prefix_ids=self.lm.encode(TOOL_CALL_OPEN), prefix_text=TOOL_CALL_OPEN,
                         suffix_text=TOOL_CALL_CLOSE, suffix_ids=self.lm.encode(TOOL_CALL_CLOSE), schema=schema)

    def start(self, ids: list[int], config: GenerationConfig, prepared: Any) -> "ServerRun":
        return ServerRun(self, ids, config, prepared if isinstance(prepared, _Prepared) else _Prepared())

    def close(self) -> None:
        self.client.close()

    def warn_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(message, ServerCacheReportWarning if key == "cache" else UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ requests
    def payload(self, wire: list[int], config: GenerationConfig, prepared: _Prepared) -> tuple[str, dict]:
        """(url, JSON body) of a streamed completion request for this server flavour."""
        info = self.info
        prompt: Any = wire if self.prompt_format == "ids" else self.lm.decode(wire)
        ignore_eos = (not config.stop_at_eos) or (config.min_new_tokens > 0
                                                  and config.min_new_tokens >= config.max_new_tokens)
        if config.min_new_tokens and not ignore_eos and info.flavor == "llama.cpp":
            self.warn_once("min_tokens", "llama.cpp has no min_tokens; min_new_tokens is honoured only when it "
                                         "equals max_new_tokens (EOS ignored).")
        if info.flavor == "llama.cpp":
            body: dict[str, Any] = {
                "prompt": prompt, "n_predict": config.max_new_tokens, "stream": True, "cache_prompt": True,
                "return_tokens": True, "temperature": config.temperature, "top_p": config.top_p,
                "top_k": config.top_k, "min_p": 0.0, "repeat_penalty": 1.0, "stop": list(config.stop),
                "ignore_eos": ignore_eos, "n_keep": 0}
            if config.seed is not None:
                body["seed"] = int(config.seed)
            if prepared.schema is not None:
                # llguidance (llama.cpp's JSON-schema engine): compact JSON, no indentation tokens
                body["json_schema"] = {**prepared.schema, "x-guidance": {
                    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
            return info.base_url + "/completion", body
        body = {"model": info.model_id, "prompt": prompt, "max_tokens": config.max_new_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": config.temperature,
                "top_p": config.top_p}
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
        if prepared.schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": prepared.schema}}
            if info.flavor == "sglang":
                body["json_schema"] = json.dumps(prepared.schema)
        return info.api_url + "/completions", body

    @contextmanager
    def open_stream(self, url: str, body: dict, timeout: float | None = None) -> Iterator[Any]:
        """POST and open the streamed response; one retry when a kept-alive connection was already closed.

        llama.cpp's HTTP server closes idle or much-reused keep-alive connections; a request that gets no
        response at all on such a connection was never processed, so sending it again is safe.
        """
        import httpx

        import httpx as _httpx

        extra = {} if timeout is None else {"timeout": _httpx.Timeout(timeout, connect=min(timeout, 5.0))}
        request = self.client.build_request("POST", url, json=body, **extra)
        for attempt in range(2):
            try:
                response = self.client.send(request, stream=True)
                break
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                if attempt:
                    raise
        try:
            yield response
        finally:
            response.close()

    def http_error(self, status: int, text: str, wire_len: int) -> ServerError:
        """Map an HTTP error answer to the right :class:`ServerError`."""
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
            return ServerContextError(wire_len + 1, int(limit or self.info.n_ctx or 0), self.url)
        if status == 404 and "model" in low:
            return ServerModelError(f"The server at {self.url} does not serve model {self.info.model_id!r}: {msg}")
        if status == 503:
            return ServerUnreachableError(f"The server at {self.url} is not ready (HTTP 503): {msg}")
        return ServerRequestError(f"The server at {self.url} refused the request (HTTP {status}): {msg}")


class ServerRun(BackendRun):
    """One streamed completion on the server. Closing the stream (cancel) stops the server's decoding."""

    def __init__(self, backend: ServerBackend, ids: list[int], config: GenerationConfig, prepared: _Prepared):
        super().__init__(ids, config)
        self.backend, self.prepared = backend, prepared

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._iter()
        except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a reply of an unexpected shape
            raise ServerStreamError(f"The server at {self.backend.url} sent a reply of an unexpected shape "
                                    f"({type(exc).__name__}: {exc}); the call failed, the next call starts a fresh "
                                    "request. Check that the address is a llama.cpp, vLLM or SGLang server.") from exc

    def _iter(self) -> Iterator[str]:
        import httpx

        b, cfg, prep = self.backend, self.config, self.prepared
        wire = b.to_wire(self.ids) + prep.prefix_ids
        if b.info.n_ctx and len(wire) + 1 > b.info.n_ctx:
            raise ServerContextError(len(wire) + 1, int(b.info.n_ctx), b.url)
        url, body = b.payload(wire, cfg, prep)
        llama = b.info.flavor == "llama.cpp"
        t0 = time.perf_counter()
        raw, gen_ids, got_ids = "", [], False
        final: dict | None = None
        usage_block: dict | None = None
        finish: str | None = None
        first_token_at: float | None = None
        cancelled = False
        limit = self.timeout if self.timeout is not None else b.timeout
        deadline = None if limit is None else time.monotonic() + limit
        try:
            with b.open_stream(url, body, timeout=self.timeout) as r:
                if r.status_code >= 400:
                    r.read()
                    raise b.http_error(r.status_code, r.text, len(wire))
                if prep.prefix_text:
                    raw += prep.prefix_text
                    yield prep.prefix_text
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        if line.startswith("error:"):
                            raise ServerRequestError(f"The server at {b.url} failed mid-stream: {line[6:].strip()}")
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        ev = json.loads(data)
                    except ValueError:
                        ev = None
                    if not isinstance(ev, dict):
                        raise ServerStreamError(
                            f"The server at {b.url} sent a malformed stream event ({data[:120]!r}); the call failed, "
                            "the next call starts a fresh request. Check that the address is a llama.cpp, vLLM or "
                            "SGLang server.")
                    if deadline is not None and time.monotonic() > deadline:
                        raise httpx.ReadTimeout(f"no complete reply within {limit:g} s")
                    if "error" in ev:
                        err = ev["error"]
                        raise b.http_error(int(err.get("code", 500)) if isinstance(err, dict) else 500,
                                           json.dumps(ev), len(wire))
                    if llama:
                        text = ev.get("content", "") or ""
                        toks = ev.get("tokens")
                        if isinstance(toks, list):
                            got_ids = True
                            gen_ids += [int(t) for t in toks]
                        if ev.get("stop"):
                            final = ev
                    else:
                        if ev.get("usage"):
                            usage_block = ev["usage"]
                        choices = ev.get("choices") or []
                        text = ""
                        if choices:
                            ch = choices[0]
                            text = ch.get("text", "") or ""
                            toks = ch.get("token_ids")
                            if isinstance(toks, list):
                                got_ids = True
                                gen_ids += [int(t) for t in toks]
                            if ch.get("finish_reason"):
                                finish = ch["finish_reason"]
                    if text:
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        raw += text
                        yield text
                    if self._cancelled.is_set():
                        cancelled = True
                        break  # leaving the block closes the connection: the server stops decoding
        except httpx.ConnectError as exc:
            raise ServerUnreachableError(f"Cannot reach the model server at {b.url} ({exc}); start it again "
                                         "(or check the address): the next call reconnects.") from exc
        except (TypeError, ValueError, AttributeError, KeyError) as exc:  # an event of the wrong shape
            raise ServerStreamError(f"The server at {b.url} sent a stream event of an unexpected shape "
                                    f"({type(exc).__name__}: {exc}); the call failed, the next call starts a fresh "
                                    "request. Check that the address is a llama.cpp, vLLM or SGLang server.") from exc
        except httpx.TimeoutException as exc:
            raise ServerStreamError(f"The model server at {b.url} timed out mid-request ({exc}); the call "
                                    "failed, the next call starts a fresh request.") from exc
        except httpx.TransportError as exc:  # RemoteProtocolError, ReadError: the connection dropped
            raise ServerStreamError(f"The connection to the model server at {b.url} dropped mid-stream after "
                                    f"{len(raw)} characters ({type(exc).__name__}: {exc}); the call failed, "
                                    "the next call starts a fresh request.") from exc
        seconds = time.perf_counter() - t0
        if not cancelled and ((llama and final is None) or (not llama and finish is None and usage_block is None)):
            raise ServerStreamError(f"The stream from {b.url} ended before the server finished the reply; "
                                    "the call failed, the next call starts a fresh request.")
        stop_string = None
        eos = self.backend.lm.tokenizer.eos_token_id
        if llama and final is not None:
            stop_type = final.get("stop_type", "")
            if stop_type == "word":
                finish, stop_string = "stop", final.get("stopping_word") or None
            elif stop_type == "eos":
                finish = "stop"
            else:
                n_ctx = b.info.n_ctx or 0
                used = int(final.get("tokens_evaluated", 0)) + int(final.get("tokens_predicted", 0))
                finish = "context" if n_ctx and used >= n_ctx else "length"
        elif finish is not None and finish not in ("stop", "length"):
            finish = "stop"
        if cancelled:
            finish = finish or "stop"
        if finish == "stop" and stop_string is None and not llama and cfg.stop:
            for s in cfg.stop:  # OpenAI servers do not say which stop string hit; assume one did if present
                if s in raw:
                    stop_string = s
        if not got_ids:  # no generated ids from the server: re-tokenize (a cache miss on the reply at worst)
            gen_ids = b.lm.encode(raw[len(prep.prefix_text):])
        if gen_ids and finish == "stop" and stop_string is None and (
                gen_ids[-1] == eos or gen_ids[-1] in self._special_ids()):
            gen_ids = gen_ids[:-1]  # the end-of-generation token (llama.cpp may pick any EOG token)
        token_ids = list(prep.prefix_ids) + gen_ids
        if prep.suffix_text and not cancelled and finish == "stop":
            raw += prep.suffix_text
            token_ids += prep.suffix_ids
        if finish == "stop" and stop_string is None and eos is not None and not cancelled:
            token_ids.append(int(eos))  # the end-of-turn token, as the in-process engine reports it
        self.result = GenerationResult(text=raw, token_ids=token_ids, finish_reason=finish or "stop",
                                       seconds=seconds, stop_string=stop_string)
        self.usage = self._usage(wire, final, usage_block, len(gen_ids), seconds, first_token_at, t0)

    def _special_ids(self) -> set[int]:
        return set(getattr(self.backend.lm.tokenizer, "all_special_ids", []) or [])

    def _usage(self, wire: list[int], final: dict | None, usage_block: dict | None, n_out: int,
               seconds: float, first_token_at: float | None, t0: float):
        b = self.backend
        cached: int | None = None
        computed: int | None = None
        prefill = decode = None
        if final is not None:
            timings = final.get("timings") or {}
            if "cache_n" in timings:
                cached = int(timings["cache_n"])
                computed = int(timings.get("prompt_n", len(wire) - cached))
            if "prompt_ms" in timings:
                prefill = float(timings["prompt_ms"]) / 1000
                decode = float(timings.get("predicted_ms", 0.0)) / 1000
        if usage_block is not None and cached is None:
            details = usage_block.get("prompt_tokens_details") or {}
            if isinstance(details, dict) and details.get("cached_tokens") is not None:
                cached = int(details["cached_tokens"])
                computed = int(usage_block.get("prompt_tokens", len(wire))) - cached
        if cached is None:
            msg = (f"The server at {b.url} ({b.info.flavor}) did not report how many prompt tokens came from its "
                   f"cache, so cache_read cannot be measured; {_cache_advice(b.info.flavor)}.")
            if b.require_cache_report:
                raise ServerCacheReportError(msg)
            b.warn_once("cache", msg + " cache_read is reported as 0.")
            cached, computed = 0, len(wire)
        if prefill is None:
            prefill = (first_token_at - t0) if first_token_at is not None else seconds
            decode = seconds - prefill
        return ChatUsage(input_tokens=len(wire), output_tokens=n_out, cache_read=cached, computed=computed,
                         prefill_seconds=prefill, decode_seconds=decode)
