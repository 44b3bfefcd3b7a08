"""The process-wide chat engines: picks the backend from a model spec and owns the engine caches.

:func:`shared_engine` is the one place where a model spec becomes an engine: an ``http(s)://`` spec
is an OpenAI-compatible server (:mod:`flashback_agents.backends.server`, rendered locally with the
tokenizer only), anything else loads weights in process (:mod:`flashback_agents.backends.local`). The
caches are bounded (at most :attr:`ChatEngine.max_shared_engines` local engines, least recently used
closed first) and releasable (:func:`release_engines`). :meth:`ChatEngine.shared` and
``chat.release_engines`` are thin wrappers over this module.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

from .backends.server import ServerBackend, ServerContextError, ServerError, is_server_spec
from .chat import ChatEngine
from .models import AUTO_ADAPTER, DEFAULT_ADAPTER, DEFAULT_MODEL, LoadedModel, shared_model

__all__ = ["shared_engine", "server_engine", "release_engines", "clear_server_engines", "ServerChatEngine"]

#: local engines by their arguments, least recently used first
_SHARED: "OrderedDict[tuple, ChatEngine]" = OrderedDict()
#: server engines by address and settings
_SERVER: dict[tuple, "ServerChatEngine"] = {}
_LOCK = threading.RLock()


class ServerChatEngine(ChatEngine):
    """A :class:`ChatEngine` whose calls run on a server; rendering, tool parsing and usage are shared."""

    def __init__(self, backend: ServerBackend, *, max_context_tokens: int | None = None):
        model_id = backend.info.model_id
        name = backend.lm.name if (not model_id or os.path.sep in model_id) else model_id
        # acquire_timeout=None: no pool to wait for; the server's own timeout (ServerBackend) applies
        super().__init__(backend.lm, max_context_tokens=max_context_tokens, on_overflow="error",
                         backend=backend, model_name=name, acquire_timeout=None)
        self.server = backend.info

    def _check_room(self, ids: list[int]) -> None:
        n = self.backend.wire_length(ids) + 1
        limit = self.max_context_tokens
        if n > limit:
            raise ServerContextError(n, limit, self.backend.url)


def shared_engine(model: str | LoadedModel = DEFAULT_MODEL, adapter: str | None = DEFAULT_ADAPTER,
                  max_cached_bytes: int | None = None, max_context_tokens: int | None = None,
                  on_overflow: str = "evict", *, engine_cls: type[ChatEngine] = ChatEngine,
                  kv_store_dir: str | os.PathLike | None = None, kv_store_max_bytes: int | None = None,
                  chat_template: str | None = None, timeout: float | None = None) -> ChatEngine:
    """The process-wide engine for these arguments (same args -> same engine, weights and pool).

    An ``http(s)://`` model spec is an OpenAI-compatible server (llama.cpp, vLLM, SGLang): the engine
    renders locally (tokenizer only) and runs on the server (see :mod:`flashback_agents.backends.server`).
    At most :attr:`ChatEngine.max_shared_engines` are kept: the least recently used one is closed beyond that.
    ``kv_store_dir`` (a disk tier for the pool, :mod:`flashback_agents.kvstore`) is part of the key:
    engines with different store directories are different engines. ``chat_template``: a Jinja template
    replacing the model's own (:func:`~flashback_agents.models.load_model`); part of the key too.
    ``timeout`` (server specs only: a local model's calls take theirs per call) is the server backend's
    request limit, which bounds its start-up checks too: ``ChatFlashBack(model=URL, timeout=2)`` cannot
    hang on a server that never answers.
    """
    if is_server_spec(model):
        if kv_store_dir is not None:
            raise ServerError("kv_store_dir applies to models run in this process; a server keeps its own cache "
                              "(llama.cpp: --slot-save-path); drop kv_store_dir for a server URL.")
        if chat_template is not None:
            raise ServerError("chat_template applies to models run in this process; a server renders with its "
                              "own (llama.cpp: --chat-template / --jinja); drop chat_template for a server URL.")
        limits = {"timeout": timeout} if timeout is not None else {}  # None: the backend's default
        return server_engine(model.strip(), adapter=adapter, max_context_tokens=max_context_tokens, **limits)
    from .kvstore import store_path

    store = (store_path(kv_store_dir), kv_store_max_bytes) if kv_store_dir is not None else None
    if isinstance(model, LoadedModel):
        if adapter not in (None, AUTO_ADAPTER) or chat_template is not None:
            raise ValueError("adapter= and chat_template= cannot be combined with an already loaded model: "
                             "pass them to load_model")
        key: tuple = ("lm", id(model), max_cached_bytes, max_context_tokens, on_overflow, store)
    else:
        key = (model or DEFAULT_MODEL, str(adapter) if adapter else None, max_cached_bytes, max_context_tokens,
               on_overflow, store, chat_template)
    with _LOCK:
        engine = _SHARED.get(key)
        if engine is not None and (not isinstance(model, LoadedModel) or engine.lm is model):
            _SHARED.move_to_end(key)
            return engine
    lm = model if isinstance(model, LoadedModel) else shared_model(model or DEFAULT_MODEL, adapter=adapter,
                                                                    chat_template=chat_template)
    evicted: list[ChatEngine] = []
    with _LOCK:
        engine = _SHARED.get(key)
        if engine is None or engine.lm is not lm:
            engine = engine_cls(lm, max_cached_bytes=max_cached_bytes, max_context_tokens=max_context_tokens,
                                on_overflow=on_overflow, **({"kv_store_dir": kv_store_dir,
                                                             "kv_store_max_bytes": kv_store_max_bytes}
                                                            if kv_store_dir is not None else {}))
            engine.on_close(_forget_engine)
            _SHARED[key] = engine
        _SHARED.move_to_end(key)
        while len(_SHARED) > engine_cls.max_shared_engines:
            _, old = _SHARED.popitem(last=False)
            evicted.append(old)
    for old in evicted:
        if old is not engine and not any(e is old for e in _SHARED.values()):
            old.close()
    return engine


def _forget_engine(engine: ChatEngine) -> None:
    """A closed engine is no longer shared."""
    with _LOCK:
        for key in [k for k, e in _SHARED.items() if e is engine]:
            del _SHARED[key]


def server_engine(url: str, *, adapter: str | None = None, max_context_tokens: int | None = None,
                  tokenizer: str | None = None, require_cache_report: bool = False,
                  **backend_kwargs: Any) -> ServerChatEngine:
    """The process-wide engine for a server address (connects and checks the model on first use)."""
    if adapter not in (None, "auto"):  # "auto": whatever the server was started with
        raise ServerError("adapter= cannot be applied to a model on a server: merge it and serve the result "
                          "(`flashback-agents export ADAPTER OUT --gguf OUT.gguf`, then serve OUT.gguf).")
    tokenizer = tokenizer or os.environ.get("FLASHBACK_TOKENIZER") or None
    key = (url.rstrip("/"), tokenizer, max_context_tokens, require_cache_report,
           tuple(sorted(backend_kwargs.items())))
    with _LOCK:
        engine = _SERVER.get(key)
        if engine is not None:
            return engine
    backend = ServerBackend(url, tokenizer=tokenizer, require_cache_report=require_cache_report, **backend_kwargs)
    engine = ServerChatEngine(backend, max_context_tokens=max_context_tokens)
    with _LOCK:
        return _SERVER.setdefault(key, engine)


def clear_server_engines() -> None:
    """Forget the cached server engines (tests; or after a server changed model)."""
    with _LOCK:
        engines = list(_SERVER.values())
        _SERVER.clear()
    for e in engines:
        e.backend.close()


def release_engines() -> int:
    """Close every shared engine (local and server) and free their caches and models; returns how many.

    Call it when an application is done with its models (or between test modules): later calls to
    :func:`shared_engine` load again.
    """
    with _LOCK:
        engines = list(dict.fromkeys(_SHARED.values()))
        n_server = len(_SERVER)
    for engine in engines:
        engine.close()
    clear_server_engines()
    return len(engines) + n_server
