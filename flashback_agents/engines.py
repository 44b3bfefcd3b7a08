"""The process-wide chat engines: builds every engine's backend and owns every engine registry.

:func:`local_engine` builds an in-process engine (a :class:`~flashback_agents.backends.local.LocalBackend`
over a :class:`~flashback_agents.pool.ContextPool`, the model's shared layout and byte budget).
:func:`shared_engine` is the one place where a model spec becomes an engine: an ``http(s)://`` spec
is an OpenAI-compatible server (:mod:`flashback_agents.backends.server`, rendered locally with the
tokenizer only), anything else loads weights in process. The registries live here: the shared engines
(bounded: at most :attr:`ChatEngine.max_shared_engines` local engines, least recently used closed
first), the server engines, and per model what all its engines share (:class:`ModelShare`: the layout
with its reply memo, one :class:`~flashback_agents.pool.MemoryBudget`). :func:`release_engines` frees
them all; the model itself is forgotten with its last engine (:func:`forget_model`).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Any

from .backends.local import LocalBackend
from .backends.server import ServerBackend, ServerContextError, ServerError, is_server_spec
from .callmask import CALL_MASKS
from .chat import ChatEngine
from .constrained import GRAMMARS
from .context import ContextConfig
from .kvstore import shared_store, store_path
from .layout import Layout
from .models import AUTO_ADAPTER, DEFAULT_ADAPTER, DEFAULT_MODEL, LoadedModel, forget_shared_model, shared_model
from .pool import ContextPool, MemoryBudget, check_engine_args

__all__ = ["EngineSettings", "engine_for", "local_engine", "shared_engine", "server_engine", "release_engines", "clear_server_engines",
           "ServerChatEngine", "ModelShare", "model_share", "forget_model"]

#: local engines by their arguments, least recently used first
_SHARED: "OrderedDict[tuple, ChatEngine]" = OrderedDict()
#: server engines by address and settings
_SERVER: dict[tuple, "ServerChatEngine"] = {}
_LOCK = threading.RLock()
#: what all engines of one model share, by ``id(lm)``
_MODELS: dict[int, "ModelShare"] = {}
#: the byte budget of a model's pools where no engine gave one
DEFAULT_BYTES = 2 << 30


class ModelShare:
    """What all engines of one model share: the layout (reply memo) and one byte budget."""

    def __init__(self, lm: Any, max_bytes: int):
        self.lm = lm
        self.layout = Layout(lm)
        self.budget = MemoryBudget(max_bytes)
        self.engines: weakref.WeakSet[ChatEngine] = weakref.WeakSet()


def model_share(lm: Any, max_cached_bytes: int | None = None) -> ModelShare:
    """The share of ``lm`` (made on first use); ``max_cached_bytes`` lowers its byte budget (the smallest
    value given wins; default :data:`DEFAULT_BYTES`)."""
    with _LOCK:
        share = _MODELS.get(id(lm))
        if share is None or share.lm is not lm:
            share = ModelShare(lm, max_cached_bytes or DEFAULT_BYTES)
            _MODELS[id(lm)] = share
        elif max_cached_bytes is not None and max_cached_bytes < share.budget.max_bytes:
            share.budget.max_bytes = max_cached_bytes
        return share


def _drop_share_if_unused(lm_id: int) -> bool:
    """Forget a model's layout and budget once no engine uses it (True if dropped)."""
    with _LOCK:
        share = _MODELS.get(lm_id)
        if share is None or len(share.engines):
            return False
        del _MODELS[lm_id]
        return True


def forget_model(lm: Any) -> None:
    """Drop ``lm`` from the process-wide caches that hold models (shared weights, grammar compilers, call masks)."""
    forget_shared_model(lm)
    GRAMMARS.forget(lm)
    CALL_MASKS.forget(lm)


def _register(engine: ChatEngine, share: ModelShare) -> ChatEngine:
    """Count ``engine`` among its model's engines; closing it updates every registry (:func:`_engine_closed`)."""
    with _LOCK:
        share.engines.add(engine)
    engine.on_close(_engine_closed)
    weakref.finalize(engine, _drop_share_if_unused, id(engine.lm))
    return engine


def _engine_closed(engine: ChatEngine) -> None:
    """A closed engine is no longer shared; with the last engine of its model the model is forgotten."""
    with _LOCK:
        for key in [k for k, e in _SHARED.items() if e is engine]:
            del _SHARED[key]
        share = _MODELS.get(id(engine.lm))
        if share is not None and share.lm is engine.lm:
            share.engines.discard(engine)
        last = _drop_share_if_unused(id(engine.lm))
    if last:
        forget_model(engine.lm)


def local_engine(lm: LoadedModel, *, max_cached_bytes: int | None = None, max_context_tokens: int | None = None,
                 model_name: str | None = None, on_overflow: str = "evict", low_water: float = 0.75,
                 acquire_timeout: float | None = 300.0, kv_store_dir: str | os.PathLike | None = None,
                 kv_store_max_bytes: int | None = None, engine_cls: type[ChatEngine] = ChatEngine) -> ChatEngine:
    """A new in-process engine for ``lm``: a pool of persistent KV caches under the model's shared byte
    budget and layout (not shared itself: :func:`shared_engine` is).

    ``max_cached_bytes`` sets the byte budget shared by every pool of this model (the smallest value given
    wins; default 2 GiB). ``kv_store_dir``: a directory for the disk tier (:mod:`flashback_agents.kvstore`):
    contexts evicted from memory, or left at close/exit, are written there and restored instead of
    recomputed, also by a later process; ``kv_store_max_bytes`` bounds it (LRU; default 16 GiB).
    ``acquire_timeout``, ``max_context_tokens``, ``on_overflow``: see :class:`~flashback_agents.chat.ChatEngine`.
    """
    # before anything shared changes: a bad byte budget would become the whole model's budget
    check_engine_args(max_cached_bytes=max_cached_bytes, max_context_tokens=max_context_tokens,
                      acquire_timeout=acquire_timeout)
    config = ContextConfig(min(max_context_tokens or lm.max_positions, lm.max_positions), on_overflow, low_water)
    share = model_share(lm, max_cached_bytes)
    store = shared_store(kv_store_dir, kv_store_max_bytes) if kv_store_dir is not None else None
    pool = ContextPool(lm, config=config, budget=share.budget, store=store)
    engine = engine_cls(lm, backend=LocalBackend(pool), layout=share.layout, max_context_tokens=max_context_tokens,
                        model_name=model_name, on_overflow=on_overflow, low_water=low_water,
                        acquire_timeout=acquire_timeout)
    return _register(engine, share)


class ServerChatEngine(ChatEngine):
    """A :class:`ChatEngine` whose calls run on a server; rendering, tool parsing and usage are shared."""

    def __init__(self, backend: ServerBackend, *, max_context_tokens: int | None = None, layout: Layout | None = None):
        model_id = backend.info.model_id
        name = backend.lm.name if (not model_id or os.path.sep in model_id) else model_id
        # acquire_timeout=None: no pool to wait for; the server's own timeout (ServerBackend) applies
        super().__init__(backend.lm, max_context_tokens=max_context_tokens, on_overflow="error",
                         backend=backend, layout=layout, model_name=name, acquire_timeout=None)
        self.server = backend.info

    def check_room(self, ids: list[int]) -> None:
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
            engine = local_engine(lm, max_cached_bytes=max_cached_bytes, max_context_tokens=max_context_tokens,
                                  on_overflow=on_overflow, kv_store_dir=kv_store_dir,
                                  kv_store_max_bytes=kv_store_max_bytes, engine_cls=engine_cls)
            _SHARED[key] = engine
        _SHARED.move_to_end(key)
        while len(_SHARED) > engine_cls.max_shared_engines:
            _, old = _SHARED.popitem(last=False)
            evicted.append(old)
    for old in evicted:
        if old is not engine and not any(e is old for e in _SHARED.values()):
            old.close()
    return engine


@dataclass(frozen=True)
class EngineSettings:
    """Which engine a framework integration runs on: one object, built once from the integration's fields
    (:meth:`from_fields`: the fields named like these) and passed whole to :func:`engine_for`.

    ``model``: a spec (default model, HF id, directory, ``.gguf``, or an ``http(s)://`` server) or a
    loaded model; the rest as :func:`shared_engine` takes them.
    """

    model: Any = DEFAULT_MODEL
    adapter: str | None = DEFAULT_ADAPTER
    max_cached_bytes: int | None = None
    max_context_tokens: int | None = None
    on_overflow: str = "evict"
    kv_store_dir: str | os.PathLike | None = None
    kv_store_max_bytes: int | None = None
    chat_template: str | None = None
    timeout: float | None = None

    @classmethod
    def from_fields(cls, source: Any, **overrides: Any) -> "EngineSettings":
        """The settings ``source`` (a LangChain / LlamaIndex model) has fields for, then ``overrides``."""
        values = {f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)}
        return replace(cls(**values), **overrides)


def engine_for(settings: EngineSettings) -> ChatEngine:
    """The process-wide engine for ``settings`` (:func:`shared_engine` with every setting)."""
    s = settings
    return shared_engine(s.model, s.adapter, s.max_cached_bytes, s.max_context_tokens, s.on_overflow,
                         kv_store_dir=s.kv_store_dir, kv_store_max_bytes=s.kv_store_max_bytes,
                         chat_template=s.chat_template, timeout=s.timeout)


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
    share = model_share(backend.lm)
    engine = _register(ServerChatEngine(backend, max_context_tokens=max_context_tokens, layout=share.layout), share)
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
