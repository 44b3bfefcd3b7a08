"""The shared chat service: one code path for every framework integration (LangChain, LlamaIndex).

It renders framework-neutral :class:`~flashback_agents.layout.Message` lists in the append layout,
runs them on a process-wide :class:`~flashback_agents.pool.ContextPool` (so a step computes only what
is new since the previous one), decodes, parses tool calls and, when a call is required, constrains
decoding with xgrammar so the call always parses.

After each reply the generated token ids are remembered (``Layout.remember_reply``): when the
framework sends the same assistant message back, it renders to exactly the ids that were generated
and the next step is a pure append (``cache_read`` = whole previous prompt + reply).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Iterator, Sequence

from .backends.base import Backend, BackendRun, Constraint
from .context import ContextOverflowError
from .generation import GenerationConfig, GenerationResult, _holdback
from .layout import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Layout, LayoutError, Message, ToolCall
from .models import DEFAULT_MODEL, LoadedModel, shared_model
from .pool import ContextPool

__all__ = ["ChatEngine", "ChatReply", "ChatUsage", "ChatRun", "AsyncChatRun", "parse_tool_calls",
           "normalize_tool_choice"]



@dataclass
class ChatUsage:
    """Token accounting of one call; ``cache_read`` = prompt tokens reused from the cache."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read: int = 0
    computed: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compacted: bool = False  # this call compacted the context (on_overflow="evict"/"shift")
    tokens_evicted: int = 0  # tokens removed by that compaction
    tokens_recomputed: int = 0  # tail tokens recomputed because of it

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class ChatReply:
    """One assistant reply: content without tool-call markup, parsed calls, usage."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop" | "length" | "tool_calls" | "context"
    usage: ChatUsage = field(default_factory=ChatUsage)
    model_name: str = ""
    raw_text: str = ""
    token_ids: list[int] = field(default_factory=list)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _coerce_call(obj: Any, allowed: set[str] | None) -> ToolCall | None:
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or not isinstance(args, dict):
        return None
    if allowed is not None and name not in allowed:
        return None
    return ToolCall(name=name, arguments=args, id=new_call_id())


def parse_tool_calls(raw: str, allowed: set[str] | None = None) -> tuple[str, list[ToolCall]]:
    """Split generated text into (content, tool calls). Unparsable markup stays in the content.

    Each ``<tool_call>`` is decoded as one JSON value (so a ``</tool_call>`` inside a string argument
    does not cut the call short), optionally followed by ``</tool_call>``.
    """
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    pieces: list[str] = []
    pos = search = 0
    while True:
        start = raw.find(TOOL_CALL_OPEN, search)
        if start < 0:
            break
        body = start + len(TOOL_CALL_OPEN)
        while body < len(raw) and raw[body].isspace():
            body += 1
        try:
            obj, end = decoder.raw_decode(raw, body)
        except ValueError:
            search = body
            continue
        call = _coerce_call(obj, allowed)
        if call is None:
            search = end
            continue
        rest = end
        while rest < len(raw) and raw[rest].isspace():
            rest += 1
        if raw.startswith(TOOL_CALL_CLOSE, rest):
            end = rest + len(TOOL_CALL_CLOSE)
        pieces.append(raw[pos:start])
        pos = search = end
        calls.append(call)
    pieces.append(raw[pos:])
    return ("".join(pieces) if calls else raw), calls


def normalize_tool_choice(tool_choice: Any, tools: Sequence[dict] | None) -> str | None:
    """Map a tool choice to None (free), "none", "any" (some tool required) or a tool name."""
    from .constrained import tool_name

    if tool_choice is None or tool_choice is False or tool_choice == "auto":
        return None
    if tool_choice is True or tool_choice in ("any", "required"):
        choice = "any"
    elif tool_choice == "none":
        return "none"
    elif isinstance(tool_choice, dict):
        fn = tool_choice.get("function", tool_choice)
        choice = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(choice, str):
            raise ValueError(f"Unsupported tool_choice {tool_choice!r}.")
    elif isinstance(tool_choice, str):
        choice = tool_choice
    else:
        raise ValueError(f"Unsupported tool_choice {tool_choice!r}; use None, 'auto', 'none', 'any' or a tool name.")
    if not tools:
        raise ValueError(f"tool_choice={tool_choice!r} requires tools, but none were given.")
    names = [tool_name(t) for t in tools]
    if choice != "any" and choice not in names:
        raise ValueError(f"tool_choice {choice!r} is not one of the available tools {names}.")
    return choice


class _Plan:
    """Everything one call needs, prepared (and validated) before any compute.

    ``prepared`` is what the backend compiled for the call (logits processors locally, a request
    constraint for a server).
    """

    def __init__(self, ids: list[int], config: GenerationConfig, prepared: Any, allowed: set[str] | None,
                 parse_tools: bool, remember: bool, constraint: Constraint | None = None):
        self.ids, self.config, self.prepared = ids, config, prepared
        self.allowed, self.parse_tools, self.remember = allowed, parse_tools, remember
        self.constraint = constraint


class ChatRun:
    """One streamed reply: iterate for content deltas; ``reply`` is set once iteration ends.

    Tool-call markup is not streamed as content; the parsed calls are on ``reply.tool_calls``.
    The context lease is held only while iterating; ``cancel()`` stops decoding at the next token.
    """

    def __init__(self, engine: "ChatEngine", plan: _Plan):
        self.engine, self.plan = engine, plan
        self.reply: ChatReply | None = None
        self._cancelled = threading.Event()
        self._started = False
        self._run: BackendRun | None = None

    def cancel(self) -> None:
        self._cancelled.set()
        if self._run is not None:
            self._run.cancel()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a ChatRun can be iterated only once")
        self._started = True
        return self._iterate()

    def _iterate(self) -> Iterator[str]:
        engine, plan = self.engine, self.plan
        run = self._run = engine.backend.start(plan.ids, plan.config, plan.prepared)
        if self._cancelled.is_set():
            run.cancel()
        raw, emitted = "", 0
        for delta in run:
            raw += delta
            if plan.parse_tools:
                cut = raw.find(TOOL_CALL_OPEN)
                visible = raw if cut < 0 else raw[:cut]
                safe = len(visible) - (_holdback(visible, (TOOL_CALL_OPEN,)) if cut < 0 else 0)
            else:
                visible, safe = raw, len(raw)
            if safe > emitted:
                yield visible[emitted:safe]
                emitted = safe
            if self._cancelled.is_set():
                run.cancel()  # the backend stops at its next token; iteration then ends
        result = run.result or GenerationResult(text=raw, token_ids=[], finish_reason="stop")
        usage = run.usage if run.usage is not None else ChatUsage()
        self.reply = engine._finish(plan, result, usage)
        if self.reply.text.startswith(raw[:emitted]) and len(self.reply.text) > emitted:
            yield self.reply.text[emitted:]


class AsyncChatRun:
    """Async form of :class:`ChatRun`: decoding runs in a worker thread, deltas come through a queue."""

    _DONE = object()

    def __init__(self, run: ChatRun):
        self._run = run
        self.reply: ChatReply | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work() -> None:
            try:
                for delta in self._run:
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
                loop.call_soon_threadsafe(queue.put_nowait, self._DONE)
            except BaseException as exc:  # hand the error to the consumer
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, exc)
                except RuntimeError:  # loop closed
                    pass

        worker = threading.Thread(target=work, name="flashback-astream", daemon=True)
        worker.start()
        try:
            while True:
                item = await queue.get()
                if item is self._DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
            self.reply = self._run.reply
        finally:
            self._run.cancel()  # consumer stopped early: stop decoding at the next token


class ChatEngine:
    """Weights, a context pool and a layout for one model; shared per process via :meth:`shared`."""

    _SHARED: dict[tuple, "ChatEngine"] = {}
    _LAYOUTS: dict[int, tuple[LoadedModel, Layout]] = {}
    _LOCK = threading.RLock()
    #: token budget floor for constrained replies (required tool calls, JSON schema output)
    min_constrained_tokens: int = 256

    def __init__(self, lm: LoadedModel, *, max_cached_bytes: int | None = None,
                 max_context_tokens: int | None = None, model_name: str | None = None,
                 on_overflow: str = "evict", low_water: float = 0.75, backend: Backend | None = None):
        from .backends.local import LocalBackend
        from .compaction import ON_OVERFLOW

        if on_overflow not in ON_OVERFLOW:
            raise ValueError(f"on_overflow must be one of {ON_OVERFLOW}, got {on_overflow!r}")
        self.lm = lm
        self.on_overflow = on_overflow
        self.max_context_tokens = min(max_context_tokens or lm.max_positions, lm.max_positions)
        if backend is None:
            self.pool: ContextPool | None = ContextPool(
                lm, max_bytes=max_cached_bytes or (2 << 30), max_context_tokens=self.max_context_tokens,
                on_overflow=on_overflow, low_water=low_water)
            backend = LocalBackend(self.pool)
        else:
            self.pool = getattr(backend, "pool", None)  # a server backend has no local pool
        #: where rendered ids run: in process (LocalBackend) or on a server (backends.server.ServerBackend)
        self.backend: Backend = backend
        self.layout = self._layout_for(lm)  # one reply memo per model, shared by all its engines
        self.model_name = model_name or lm.name

    @classmethod
    def _layout_for(cls, lm: LoadedModel) -> Layout:
        with cls._LOCK:
            entry = cls._LAYOUTS.get(id(lm))
            if entry is None or entry[0] is not lm:
                entry = (lm, Layout(lm))
                cls._LAYOUTS[id(lm)] = entry
            return entry[1]

    @classmethod
    def shared(cls, model: str | LoadedModel = DEFAULT_MODEL, adapter: str | None = None,
               max_cached_bytes: int | None = None, max_context_tokens: int | None = None,
               on_overflow: str = "evict") -> "ChatEngine":
        """The process-wide engine for these arguments (same args -> same engine, weights and pool).

        An ``http(s)://`` model spec is an OpenAI-compatible server (llama.cpp, vLLM, SGLang): the engine
        renders locally (tokenizer only) and runs on the server (see :mod:`flashback_agents.backends.server`).
        """
        if isinstance(model, str) and model.strip().lower().startswith(("http://", "https://")):
            from .backends.server import server_engine

            return server_engine(model.strip(), adapter=adapter, max_context_tokens=max_context_tokens)
        if isinstance(model, LoadedModel):
            if adapter is not None:
                raise ValueError("adapter= cannot be combined with an already loaded model")
            key: tuple = ("lm", id(model), max_cached_bytes, max_context_tokens, on_overflow)
        else:
            key = (model or DEFAULT_MODEL, str(adapter) if adapter else None, max_cached_bytes, max_context_tokens,
                   on_overflow)
        with cls._LOCK:
            engine = cls._SHARED.get(key)
            if engine is not None and (not isinstance(model, LoadedModel) or engine.lm is model):
                return engine
        lm = model if isinstance(model, LoadedModel) else shared_model(model or DEFAULT_MODEL, adapter=adapter)
        with cls._LOCK:
            engine = cls._SHARED.get(key)
            if engine is None or engine.lm is not lm:
                engine = cls(lm, max_cached_bytes=max_cached_bytes, max_context_tokens=max_context_tokens,
                             on_overflow=on_overflow)
                cls._SHARED[key] = engine
            return engine

    # ------------------------------------------------------------------ planning
    def _check_room(self, ids: list[int]) -> None:
        if self.on_overflow != "error":
            return  # the context compacts (or raises, naming what cannot be evicted) when it syncs
        if len(ids) + 1 > self.max_context_tokens:
            raise ContextOverflowError(len(ids) + 1, self.max_context_tokens,
                                       "conversation (prompt plus at least one generated token)")

    def _plan(self, messages: Sequence[Message], tools: Sequence[dict] | None, tool_choice: Any,
              response_schema: dict | None, config: GenerationConfig | None) -> _Plan:
        from .constrained import tool_call_schema, tool_name

        config = replace(config) if config is not None else GenerationConfig()
        config.validate()
        tools = list(tools or [])
        if not isinstance(messages, (list, tuple)) or not messages:
            raise LayoutError("messages must be a non-empty list of Message objects.")
        choice = normalize_tool_choice(tool_choice, tools)
        ids = self.layout.render(list(messages), tools=tools or None)
        self._check_room(ids)
        allowed = {tool_name(t) for t in tools} if tools else None
        parse_tools = bool(tools) and choice != "none" and response_schema is None
        constraint: Constraint | None = None
        if response_schema is not None:
            constraint = Constraint("json", response_schema)
        elif choice not in (None, "none"):
            constraint = Constraint("tool_call", tool_call_schema(tools, choice), tools=tools, choice=choice)
        prepared = self.backend.prepare(ids, config, constraint)
        if constraint is not None and config.max_new_tokens < self.min_constrained_tokens:
            # A constrained reply is only useful complete: a small max_tokens must not cut a required call.
            config.max_new_tokens = self.min_constrained_tokens
        return _Plan(ids, config, prepared, allowed, parse_tools, remember=True, constraint=constraint)

    def _finish(self, plan: _Plan, result: GenerationResult, usage: ChatUsage) -> ChatReply:
        raw = result.text
        text, calls = parse_tool_calls(raw, plan.allowed) if plan.parse_tools else (raw, [])
        finish = result.finish_reason
        if calls and finish == "stop":
            finish = "tool_calls"
        reply = ChatReply(text=text, tool_calls=calls, finish_reason=finish, usage=usage,
                          model_name=self.model_name, raw_text=raw, token_ids=list(result.token_ids))
        if plan.remember and result.stop_string is None and reply.token_ids:
            self.layout.remember_reply(Message("assistant", reply.text, tool_calls=reply.tool_calls),
                                       reply.token_ids, prompt_ids=plan.ids)
        return reply

    # ------------------------------------------------------------------ chat
    def stream_chat(self, messages: Sequence[Message], *, tools: Sequence[dict] | None = None,
                    tool_choice: Any = None, response_schema: dict | None = None,
                    config: GenerationConfig | None = None) -> ChatRun:
        """Prepare a reply (errors raise here, before any compute); iterate the run for deltas."""
        return ChatRun(self, self._plan(messages, tools, tool_choice, response_schema, config))

    def chat(self, messages: Sequence[Message], *, tools: Sequence[dict] | None = None,
             tool_choice: Any = None, response_schema: dict | None = None,
             config: GenerationConfig | None = None) -> ChatReply:
        """Reply to a conversation; only tokens not already cached are computed."""
        run = self.stream_chat(messages, tools=tools, tool_choice=tool_choice,
                               response_schema=response_schema, config=config)
        for _ in run:
            pass
        assert run.reply is not None
        return run.reply

    async def achat(self, messages: Sequence[Message], **kwargs: Any) -> ChatReply:
        """:meth:`chat` in a worker thread, so the event loop keeps running."""
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    def astream_chat(self, messages: Sequence[Message], **kwargs: Any) -> AsyncChatRun:
        """Async iterator of deltas (decoding in a worker thread); ``.reply`` after iteration."""
        return AsyncChatRun(self.stream_chat(messages, **kwargs))

    # ------------------------------------------------------------------ completion
    def _complete_plan(self, prompt: str, config: GenerationConfig | None) -> _Plan:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        config = replace(config) if config is not None else GenerationConfig()
        config.validate()
        ids = self.lm.encode(prompt)
        if not ids:  # an empty prompt still needs one token to condition on
            tok = self.lm.tokenizer
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = [int(start if start is not None else 0)]
        self._check_room(ids)
        return _Plan(ids, config, self.backend.prepare(ids, config, None), None, parse_tools=False,
                     remember=False)

    def stream_complete(self, prompt: str, config: GenerationConfig | None = None) -> ChatRun:
        """Raw text completion (no chat template), streamed."""
        return ChatRun(self, self._complete_plan(prompt, config))

    def complete(self, prompt: str, config: GenerationConfig | None = None) -> ChatReply:
        """Raw text completion (no chat template) on the same pool."""
        run = self.stream_complete(prompt, config)
        for _ in run:
            pass
        assert run.reply is not None
        return run.reply

    async def acomplete(self, prompt: str, config: GenerationConfig | None = None) -> ChatReply:
        return await asyncio.to_thread(self.complete, prompt, config)

    def astream_complete(self, prompt: str, config: GenerationConfig | None = None) -> AsyncChatRun:
        return AsyncChatRun(self.stream_complete(prompt, config))
