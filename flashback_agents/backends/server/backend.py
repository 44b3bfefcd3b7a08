"""The server backend: probe an OpenAI-compatible server, then run rendered ids on it (``ServerBackend``).

The engine renders locally; this module turns the rendered ids into requests on the server (wire
format and dialects: :mod:`.protocol`; one streamed completion: :mod:`.run` (``ServerRun``, re-exported
here); tokenizer: :mod:`.tokenizer`; errors: :mod:`.errors`).
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

from ...bounds import cap_strings
from ...callmask import single_token_tag_ids
from ...generation import GenerationConfig
from ...models import MARK_L, MARK_R, ModelLoadError
from ...toolformat import HERMES, ConstraintError, call_schema
from ..base import Backend, Constraint
from .errors import ServerCacheReportWarning, ServerError, ServerModelError, ServerUnreachableError
from .protocol import (PROBE_TEXT, Prepared, ServerInfo, bad_answer, build_payload, checked_int, http_error, load_json,
                       split_url, token_list)
from .run import ServerRun
from .tokenizer import ServerTokenizerModel, add_marker_tokens_only, load_server_tokenizer

#: what a bad n_ctx is called in errors: the server's answer, not the user's max_context_tokens
CTX = "(the server's context size)"

__all__ = ["ServerBackend", "ServerRun"]


class ServerBackend(Backend):
    """Runs rendered token ids on an OpenAI-compatible server with prefix caching."""

    def __init__(self, url: str, *, tokenizer: str | None = None, timeout: float = 600.0,
                 connect_timeout: float = 5.0, startup_wait: float = 60.0, api_key: str | None = None,
                 require_cache_report: bool = False, prompt_format: str = "ids"):
        import httpx

        if prompt_format not in ("ids", "text"):
            raise ValueError(f"prompt_format must be 'ids' or 'text', got {prompt_format!r}")
        base, api = split_url(url)
        self.url = url
        self.require_cache_report = require_cache_report
        self.prompt_format = prompt_format
        #: seconds a whole reply may take (also each read's limit): a server that trickles forever still ends
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # The start-up checks obey the user's timeout too (a server that never answers, or stays
        # "loading" forever, fails within it); startup_wait caps the wait when timeout is larger.
        self._startup_limit = startup_wait if timeout is None else min(timeout, startup_wait)
        self._startup_knob = "timeout" if timeout is not None and timeout <= startup_wait else "startup_wait"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=httpx.Timeout(timeout, connect=connect_timeout), headers=headers)
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        try:
            self.info = self._probe(url, base, api)
            self.lm = self._tokenizer_model(tokenizer)
            self._finish_probe()
        except BaseException:
            self.client.close()  # a failed start-up keeps no connection open
            raise

    # ------------------------------------------------------------------ http helpers
    def _no_answer(self, request: str, limit: float | None, knob: str, exc: Exception) -> ServerUnreachableError:
        """The error for a request the server did not answer in time: what to check, or which limit to raise."""
        within = f"within {limit:g} s" if limit is not None else "in time"
        return ServerUnreachableError(
            f"The server at {self.url} did not answer {request} {within} ({type(exc).__name__}). Check the URL, "
            f"that the server has finished loading its model, or raise {knob}= for a slow server.")

    def _get(self, url: str, deadline: float | None = None) -> Any:
        """GET ``url``, within ``deadline`` (``time.monotonic()``; start-up checks) or the client's timeouts."""
        import httpx

        timeout: Any = httpx.USE_CLIENT_DEFAULT
        if deadline is not None:
            left = max(deadline - time.monotonic(), 0.05)
            timeout = httpx.Timeout(left, connect=min(self.connect_timeout, left))
        try:
            r = self.client.get(url, timeout=timeout)
        except httpx.TimeoutException as exc:
            if deadline is None:
                raise self._no_answer(f"GET {url}", self.timeout, "timeout", exc) from exc
            raise self._no_answer(f"GET {url}", self._startup_limit, self._startup_knob, exc) from exc
        except httpx.TransportError as exc:
            raise ServerUnreachableError(
                f"Cannot reach the model server at {self.url} ({type(exc).__name__}: {exc}). Start one with "
                "`flashback-agents serve --model PATH.gguf --port N` (llama.cpp), `vllm serve ...` or "
                "`python -m sglang.launch_server ...`, and check the host and port.") from exc
        return r

    def _post(self, url: str, payload: dict) -> Any:
        import httpx

        try:
            return self.client.post(url, json=payload)
        except httpx.TimeoutException as exc:
            raise self._no_answer(f"POST {url}", self.timeout, "timeout", exc) from exc
        except httpx.TransportError as exc:
            raise ServerUnreachableError(f"Lost the model server at {self.url} ({exc}).") from exc

    def _probe(self, url: str, base: str, api: str) -> ServerInfo:
        """What the server runs (GET /v1/models, llama.cpp's GET /props), every value checked."""
        limit = self._startup_limit
        deadline = time.monotonic() + limit
        while True:
            r = self._get(api + "/models", deadline)
            if r.status_code != 503:
                break
            left = deadline - time.monotonic()  # llama.cpp: 503 "Loading model" until it is ready
            if left <= 0:
                raise ServerUnreachableError(
                    f"The server at {url} was still loading its model after {limit:g} s (GET /v1/models: HTTP 503, "
                    f"{r.text[:120]!r}). Wait until it has finished loading, check the URL, or raise "
                    f"{self._startup_knob}= for a slow start.")
            time.sleep(min(0.5, left))
        if r.status_code >= 400:
            raise ServerError(f"The server at {url} answered GET /v1/models with HTTP {r.status_code}: "
                              f"{r.text[:300]}. Is it an OpenAI-compatible server (llama.cpp, vLLM, SGLang)?")
        where = f"GET {api}/models"
        body = load_json(r.text, where)
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or not data or not isinstance(data[0], dict):
            raise ServerModelError(f"The server at {url} lists no model (GET /v1/models: {r.text[:120]!r}); is it an "
                                   "OpenAI-compatible server (llama.cpp, vLLM, SGLang) with a model loaded?")
        entry = data[0]
        model_id, meta = entry.get("id", ""), entry.get("meta")
        if not isinstance(model_id, str):
            raise bad_answer(where, f"data[0].id must be the model's name, the server sent {model_id!r:.80}")
        if meta is not None and not isinstance(meta, dict):
            raise bad_answer(where, f"data[0].meta must be an object, the server sent {meta!r:.80}")
        meta = meta or {}
        n_ctx = checked_int(meta.get("n_ctx"), where, f"data[0].meta.n_ctx {CTX}")
        if n_ctx is None:
            n_ctx = checked_int(entry.get("max_model_len"), where, f"data[0].max_model_len {CTX}")
        n_vocab = checked_int(meta.get("n_vocab"), where, "data[0].meta.n_vocab (the vocabulary size)")
        info = ServerInfo(url=url, base_url=base, api_url=api, flavor="openai", model_id=model_id, n_ctx=n_ctx,
                          n_vocab=n_vocab)
        owner = str(entry.get("owned_by", "")).lower()
        if owner in ("llamacpp", "llama.cpp") or "meta" in entry:
            info.flavor = "llama.cpp"
        elif owner in ("vllm", "sglang"):
            info.flavor = owner
        if info.flavor in ("llama.cpp", "openai"):
            pr = self._get(base + "/props", time.monotonic() + limit)
            if pr.status_code == 200:
                self._read_props(pr.text, info)
        return info

    def _read_props(self, text: str, info: ServerInfo) -> None:
        """llama.cpp's ``/props``: the per-slot window and the model file. Another server's page there is
        ignored, but a llama.cpp server (by its /v1/models) must answer in llama.cpp's shape."""
        where = f"GET {info.base_url}/props"
        strict = info.flavor == "llama.cpp"
        try:
            props = load_json(text, where)
        except ServerError:
            if strict:
                raise
            return
        if not isinstance(props, dict) or "default_generation_settings" not in props:
            if strict and not isinstance(props, dict):
                raise bad_answer(where, f"expected a JSON object, the server sent {text[:80]!r}")
            return
        settings, model_path = props["default_generation_settings"], props.get("model_path")
        if not isinstance(settings, dict):
            raise bad_answer(where, f"default_generation_settings must be an object, the server sent {settings!r:.80}")
        if model_path is not None and not isinstance(model_path, str):
            raise bad_answer(where, f"model_path must be a string, the server sent {model_path!r:.80}")
        info.flavor = "llama.cpp"
        slot_ctx = checked_int(settings.get("n_ctx"), where, f"default_generation_settings.n_ctx {CTX}")
        info.n_ctx = slot_ctx or info.n_ctx  # per-slot window: what one request can use
        info.model_path = model_path

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
                "Pass tokenizer= (engines.server_engine / ServerBackend), --tokenizer, or set FLASHBACK_TOKENIZER to "
                "the served model's directory, .gguf file, or 'smollm2-135m-instruct' for the default GGUF.")
        self._base_vocab = len(tok)
        self._text_marker_ids = {MARK_L: list(tok.encode(MARK_L, add_special_tokens=False)),
                                 MARK_R: list(tok.encode(MARK_R, add_special_tokens=False))}
        marker_ids = add_marker_tokens_only(tok)
        return ServerTokenizerModel(model=None, tokenizer=tok, marker_ids=marker_ids,
                                    name=name or info.model_id, context_window=int(info.n_ctx or 8192),
                                    server_url=info.base_url)

    def tokenize_on_server(self, text: str) -> list[int] | None:
        """The server's tokenization of ``text`` (special tokens parsed), or None if it has no endpoint."""
        payload = {"content": text, "add_special": False, "parse_special": True,
                   "model": self.info.model_id, "prompt": text, "add_special_tokens": False}
        url = self.info.base_url + "/tokenize"
        r = self._post(url, payload)
        if r.status_code >= 400:
            return None
        data = load_json(r.text, f"POST {url}")
        if not isinstance(data, dict):
            raise bad_answer(f"POST {url}", f"expected a JSON object with 'tokens', the server sent {r.text[:80]!r}")
        if "tokens" not in data:  # some other endpoint at that path: as if there were none
            return None
        return token_list(data["tokens"], f"POST {url}")

    def _finish_probe(self) -> None:
        info, lm = self.info, self.lm
        ours = lm.encode(PROBE_TEXT)
        theirs = self.tokenize_on_server(PROBE_TEXT)
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
    def prepare(self, ids: list[int], config: GenerationConfig, constraint: Constraint | None) -> Prepared:
        if constraint is None or constraint.kind == "tool_call_auto":  # calls the model opens stay free here
            return Prepared()
        if constraint.kind == "no_tool_call":
            # The closest cheap equivalent of the local mask: a tag that is one token (Qwen's <tool_call>,
            # Mistral's [TOOL_CALLS], Llama's <|python_tag|>) is banned by logit bias; a tag spelled in
            # several tokens stays possible here, but with no calls parsed and a stray tag stripped from
            # the text (ChatEngine), such a reply still carries no call.
            return Prepared(banned_ids=single_token_tag_ids(self.lm.tokenizer, constraint.fmt))
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
            return Prepared(schema=schema)
        # A required call in the model family's own syntax (Hermes <tool_call>, Mistral [TOOL_CALLS][...],
        # Llama 3 bare JSON with "parameters"), as the local xgrammar path writes it: the opener is sent as
        # prompt, the schema constrains the body, the closer is appended to the reply.
        fmt = constraint.fmt or HERMES
        opener, closer = fmt.grammar_affixes()
        return Prepared(prefix_ids=self.lm.encode(opener) if opener else [], prefix_text=opener,
                         suffix_text=closer, suffix_ids=self.lm.encode(closer) if closer else [],
                         schema=call_schema(fmt, schema))

    def start(self, ids: list[int], config: GenerationConfig, prepared: Any) -> "ServerRun":
        return ServerRun(self, ids, config, prepared if isinstance(prepared, Prepared) else Prepared())

    def close(self) -> None:
        self.client.close()

    def warn_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(message, ServerCacheReportWarning if key == "cache" else UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ requests
    def payload(self, wire: list[int], config: GenerationConfig, prepared: Prepared) -> tuple[str, dict]:
        """(url, JSON body) of a streamed completion request for this server flavour."""
        prompt: Any = wire if self.prompt_format == "ids" else self.lm.decode(wire)
        return build_payload(self.info, prompt, config, prepared, self.warn_once)

    @contextmanager
    def open_stream(self, url: str, body: dict, timeout: float | None = None) -> Iterator[Any]:
        """POST and open the streamed response; one retry when a kept-alive connection was already closed.

        llama.cpp's HTTP server closes idle or much-reused keep-alive connections; a request that gets no
        response at all on such a connection was never processed, so sending it again is safe.
        """
        import httpx

        extra = {} if timeout is None else {"timeout": httpx.Timeout(timeout, connect=min(timeout, 5.0))}
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
        return http_error(self.info, self.url, status, text, wire_len)
