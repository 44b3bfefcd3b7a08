"""ChatEngine: messages -> plan -> backend run -> reply, one code path for every framework integration.

This module imports no backend implementation: :mod:`flashback_agents.engines` picks one from the model
spec and owns the process-wide engine caches.

It renders framework-neutral :class:`~flashback_agents.layout.Message` lists in the append layout,
runs them on a process-wide :class:`~flashback_agents.pool.ContextPool` (so a step computes only what
is new since the previous one), decodes, parses tool calls and, when a call is required, constrains
decoding with xgrammar so the call always parses.

``tool_choice="none"`` keeps the tools in the prompt but masks the opening of a call while decoding
(:mod:`flashback_agents.callmask`). ``repeat_calls="forbid"`` (the loop guard, on by default: see
:data:`DEFAULT_REPEAT_CALLS`) replaces a reply that only repeats calls already answered in the
conversation by one decoded again with calls masked, and counts it in ``usage.repeat_calls_forbidden``.

After each reply the generated token ids are remembered (``Layout.remember_reply``): when the
framework sends the same assistant message back, it renders to exactly the ids that were generated
and the next step is a pure append (``cache_read`` = whole previous prompt + reply).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import uuid
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from .backends.base import Backend, BackendRun, ChatUsage, Constraint
from .callmask import CALL_MASKS, stream_visible, strip_call_markup
from .context import ContextConfig, ContextOverflowError
from .generation import GenerationConfig, GenerationResult
from .layout import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Layout, LayoutError, Message, ToolCall
from .models import DEFAULT_ADAPTER, DEFAULT_MODEL, LoadedModel
from .pool import ContextPool, MemoryBudget

__all__ = ["ChatEngine", "ChatReply", "ChatUsage", "ChatRun", "AsyncChatRun", "parse_tool_calls",
           "normalize_tool_choice", "release_engines", "answered_calls", "DEFAULT_REPEAT_CALLS", "REPEAT_CALLS"]

#: what the repeat-call guard may do: ``"allow"`` (a repeated call is returned as the model wrote it) or
#: ``"forbid"`` (a call with exactly the name and arguments of a call already answered in the
#: conversation is forbidden: the engine decodes again with calls masked, so the model answers in text)
REPEAT_CALLS = ("allow", "forbid")
#: the default of ``repeat_calls`` everywhere (ChatEngine calls, ChatFlashBack, LlamaIndex FlashBack)
DEFAULT_REPEAT_CALLS = "forbid"


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
    """One decoded call body as a ToolCall (the format parser's, :meth:`ToolCallFormat._coerce`)."""
    from .toolformat import HERMES

    return HERMES._coerce(obj, allowed)


def parse_tool_calls(raw: str, allowed: set[str] | None = None, fmt: Any = None) -> tuple[str, list[ToolCall]]:
    """Split generated text into (content, tool calls). Unparsable markup stays in the content.

    Each ``<tool_call>`` is decoded as one JSON value (so a ``</tool_call>`` inside a string argument
    does not cut the call short), optionally followed by ``</tool_call>``. ``fmt``: the model's
    :class:`~flashback_agents.toolformat.ToolCallFormat` (``Layout.tool_format``); default Hermes.
    One parser for every path: :meth:`ToolCallFormat.parse` (lenient where the grammar is: raw control
    characters inside strings); Hermes content is kept as written, other formats' is stripped.
    """
    from .toolformat import HERMES

    if fmt is None or (fmt.open, fmt.close, fmt.array) == (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, False):
        return (fmt or HERMES).parse(raw, allowed, strip=False)
    return fmt.parse(raw, allowed)


def normalize_tool_choice(tool_choice: Any, tools: Sequence[dict] | None) -> str | None:
    """Map a tool choice to None (free), "none", "any" (some tool required) or a tool name."""
    from .constrained import ConstraintError, tool_name

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
            raise ConstraintError(f"Unsupported tool_choice {tool_choice!r}; use None, 'auto', 'none', 'any' "
                                  "or a tool name.")
    elif isinstance(tool_choice, str):
        choice = tool_choice
    else:
        raise ConstraintError(f"Unsupported tool_choice {tool_choice!r}; use None, 'auto', 'none', 'any' or a "
                              "tool name.")
    if not tools:
        raise ConstraintError(f"tool_choice={tool_choice!r} requires tools, but none were given; bind tools "
                              "or drop tool_choice.")
    names = [tool_name(t) for t in tools]
    if choice != "any" and choice not in names:
        raise ConstraintError(f"tool_choice {choice!r} is not one of the available tools {names}.")
    return choice


def check_repeat_calls(value: Any) -> str:
    """``repeat_calls`` as one of :data:`REPEAT_CALLS` (None: :data:`DEFAULT_REPEAT_CALLS`), or a ConstraintError."""
    from .constrained import ConstraintError

    if value is None:
        return DEFAULT_REPEAT_CALLS
    if not isinstance(value, str) or value not in REPEAT_CALLS:
        raise ConstraintError(f"repeat_calls must be one of {list(REPEAT_CALLS)}, got {value!r}: 'forbid' makes the "
                              "model answer in text instead of repeating a call already answered in the "
                              "conversation, 'allow' returns such a call as written.")
    return value


def call_key(call: ToolCall) -> tuple[str, str]:
    """(name, canonical JSON of the arguments): what makes two calls the same call."""
    return call.name, json.dumps(call.arguments, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                                 default=str)


def answered_calls(messages: Sequence[Message]) -> frozenset[tuple[str, str]]:
    """The calls already answered in ``messages``: :func:`call_key` of every assistant tool call that a
    later ``tool`` message answers (matched by ``tool_call_id`` where it names a pending call, else the
    oldest unanswered call, in order)."""
    pending: list[tuple[str, tuple[str, str]]] = []  # (call id or "", key), oldest first
    answered: set[tuple[str, str]] = set()
    for m in messages:
        if m.role == "assistant":
            pending += [(c.id or "", call_key(c)) for c in m.tool_calls]
        elif m.role == "tool" and pending:
            at = next((i for i, (cid, _) in enumerate(pending) if m.tool_call_id and cid == m.tool_call_id), 0)
            answered.add(pending.pop(at)[1])
    return frozenset(answered)


def _json_text(value: Any, what: str, error: type[Exception]) -> str:
    """``value`` as JSON text, or ``error`` saying what in it is not JSON (a set, NaN, a lone surrogate)."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True)
        text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise error(f"{what} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); use only dicts, lists, "
                    "str, numbers (finite), bools and None; convert sets and tuples to lists.") from exc
    return text


def _check_text(value: Any, what: str) -> None:
    if not isinstance(value, str):
        raise LayoutError(f"{what} must be a str, got {type(value).__name__}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LayoutError(f"{what} contains a character that is not valid Unicode ({exc.reason} at position "
                          f"{exc.start}: {value[exc.start:exc.end]!r}); decode the input with errors='replace' "
                          "or remove the lone surrogate.") from exc


def check_messages(messages: Any) -> None:
    """Reject messages the tokenizer or the JSON encoder would fail on, with our error, before any compute."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LayoutError("messages must be a non-empty list of Message objects.")
    seen_calls: set[str] = set()
    for i, m in enumerate(messages):
        if not isinstance(m, Message):
            raise LayoutError(f"Message {i} is a {type(m).__name__}, not a flashback_agents Message; build "
                              "Message(role, content) (the integrations convert their own message types).")
        if m.role == "system" and i != 0:
            raise LayoutError(f"Message {i} is a system message; only the first message may be one: move it to "
                              "the front (or merge it into the first system message).")
        if m.role == "tool" and m.tool_call_id and isinstance(m.tool_calls, (list, tuple)) and \
                m.tool_call_id not in seen_calls:
            raise LayoutError(f"Message {i} is a tool result for call id {m.tool_call_id!r}, but no earlier assistant "
                              "message made a call with that id: pass the assistant message with that call "
                              "(ToolCall(..., id=...)) before it, or drop tool_call_id.")
        for c in m.tool_calls if isinstance(m.tool_calls, (list, tuple)) else ():
            if isinstance(c, ToolCall) and isinstance(c.id, str) and c.id:
                seen_calls.add(c.id)
        if not isinstance(m.role, str):
            raise LayoutError(f"Message {i} has a role of type {type(m.role).__name__}; use 'system', 'user', "
                              "'assistant', 'tool' or 'evidence'.")
        _check_text(m.content, f"Message {i} content")
        for attr in ("name", "tool_call_id"):
            if getattr(m, attr) is not None:
                _check_text(getattr(m, attr), f"Message {i} {attr}")
        if not isinstance(m.documents, (list, tuple)):
            raise LayoutError(f"Message {i} documents must be a list of str.")
        for j, d in enumerate(m.documents):
            _check_text(d, f"Message {i} document {j}")
        if not isinstance(m.tool_calls, (list, tuple)):
            raise LayoutError(f"Message {i} tool_calls must be a list of ToolCall.")
        for j, c in enumerate(m.tool_calls):
            if not isinstance(c, ToolCall):
                raise LayoutError(f"Message {i} tool call {j} is a {type(c).__name__}, not a ToolCall; build "
                                  "ToolCall(name, arguments_dict, id).")
            _check_text(c.name, f"Message {i} tool call {j} name")
            if not isinstance(c.arguments, dict):
                raise LayoutError(f"Message {i} tool call {j} arguments must be a dict, got "
                                  f"{type(c.arguments).__name__}.")
            _json_text(c.arguments, f"Message {i} tool call {j} arguments", LayoutError)


def check_tools(tools: Any) -> list[dict]:
    """Tools as a list of OpenAI-style dicts whose schemas are JSON, or a :class:`ConstraintError`."""
    from .constrained import ConstraintError, tool_name

    if tools is None:
        return []
    if isinstance(tools, dict):
        tools = [tools]
    if isinstance(tools, (str, bytes)) or not isinstance(tools, (list, tuple)):
        raise ConstraintError(f"tools must be a list of OpenAI-style tool dicts ({{'type': 'function', 'function': "
                              f"{{'name': ..., 'parameters': {{...}}}}}}), got {type(tools).__name__} {tools!r:.60}.")
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise ConstraintError(f"Tool {i} is a {type(t).__name__} ({t!r:.60}), not an OpenAI-style tool dict; "
                                  "convert functions with langchain's convert_to_openai_tool or pass "
                                  "{'type': 'function', 'function': {'name': ..., 'parameters': {...}}}.")
        name = tool_name(t)
        fn = t.get("function", t)
        if not isinstance(fn, dict) or not isinstance(fn.get("parameters", {}) or {}, dict):
            raise ConstraintError(f"Tool {name!r} has parameters that are not a JSON schema object; pass a dict such "
                                  "as {'type': 'object', 'properties': {...}}.")
        if not isinstance(fn.get("description", "") or "", str):
            raise ConstraintError(f"Tool {name!r} has a description that is not a str; pass a str (or leave it out).")
        _json_text(t, f"Tool {name!r}", ConstraintError)
    return list(tools)


class _Plan:
    """Everything one call needs, prepared (and validated) before any compute.

    ``prepared`` is what the backend compiled for the call (logits processors locally, a request
    constraint for a server).
    """

    def __init__(self, ids: list[int], config: GenerationConfig, prepared: Any, allowed: set[str] | None,
                 parse_tools: bool, remember: bool, timeout: float | None = None, no_calls: bool = False,
                 answered: frozenset = frozenset()):
        self.ids, self.config, self.prepared = ids, config, prepared
        self.allowed, self.parse_tools, self.remember = allowed, parse_tools, remember
        self.timeout = timeout  # seconds to wait for a free context (None: the engine's acquire_timeout)
        #: the reply may not call tools (tool_choice="none"): decoding masks call openings, stray tags are stripped
        self.no_calls = no_calls
        #: repeat_calls="forbid": call keys already answered in the conversation (empty: the guard is off)
        self.answered = answered


class ChatRun:
    """One streamed reply: iterate for content deltas; ``reply`` is set once iteration ends.

    Tool-call markup is not streamed as content; the parsed calls are on ``reply.tool_calls``.
    The context lease is held only while iterating; ``cancel()`` stops decoding at the next token;
    ``close()`` (or dropping the iterator: the garbage collector closes it) releases the context of a
    stream abandoned mid-way at once.
    """

    def __init__(self, engine: "ChatEngine", plan: _Plan):
        self.engine, self.plan = engine, plan
        self.reply: ChatReply | None = None
        self._cancelled = threading.Event()
        self._started = False
        self._run: BackendRun | None = None
        self._gen: weakref.ref | None = None  # weak: the iterator must stay collectable when dropped
        #: nobody reads the deltas (chat/achat): a reply may be replaced even after text was yielded
        self._buffered = False

    def cancel(self) -> None:
        self._cancelled.set()
        if self._run is not None:
            self._run.cancel()

    def close(self) -> None:
        """Stop and release the context now (a stream the caller will not finish)."""
        self.cancel()
        gen = self._gen() if self._gen is not None else None
        if gen is not None:
            try:
                gen.close()
            except ValueError:  # "generator already executing": it is being iterated in another thread
                pass

    def __enter__(self) -> "ChatRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a ChatRun can be iterated only once")
        self._started = True
        gen = self._iterate()
        self._gen = weakref.ref(gen)
        return gen

    def _decode(self, plan: _Plan, prepared: Any) -> Iterator[str]:
        """Run ``plan`` on the backend, yielding safe content deltas; returns (result, usage, shown text)."""
        engine = self.engine
        run = self._run = engine.backend.start(plan.ids, plan.config, prepared)
        run.timeout = plan.timeout if plan.timeout is not None else engine.acquire_timeout
        if self._cancelled.is_set():
            run.cancel()
        raw, shown = "", ""
        for delta in run:
            raw += delta
            visible, safe = engine._visible(plan, raw)
            if safe > len(shown) and visible.startswith(shown):
                piece = visible[len(shown):safe]
                shown += piece
                yield piece
            if self._cancelled.is_set():
                run.cancel()  # the backend stops at its next token; iteration then ends
        result = run.result or GenerationResult(text=raw, token_ids=[], finish_reason="stop")
        usage = run.usage if run.usage is not None else ChatUsage()
        return result, usage, shown

    def _iterate(self) -> Iterator[str]:
        engine, plan = self.engine, self.plan
        result, usage, shown = yield from self._decode(plan, plan.prepared)
        reply = engine._reply(plan, result, usage)
        remember = plan
        repeated = engine._repeated_calls(plan, reply)
        if repeated:
            fresh = [c for c in reply.tool_calls if all(c is not r for r in repeated)]
            if fresh or self._cancelled.is_set() or (shown and not self._buffered):
                # New calls stay (only the repeats go), or text was already streamed: no second decode.
                reply.tool_calls = fresh
                if not fresh and reply.finish_reason == "tool_calls":
                    reply.finish_reason = "stop"
                usage.repeat_calls_forbidden += len(repeated)
                remember = None  # the reply is no longer what was generated: never replayed as its ids
            else:
                # Every call repeats an answered one and nothing was shown: decode again from the same
                # prompt with calls masked. The pooled context is re-synced to the prompt on acquire
                # (the discarded tokens are cropped, or the prompt is forked off), so nothing leaks.
                remember = engine._no_call_plan(plan)
                result2, usage2, shown = yield from self._decode(remember, remember.prepared)
                usage2.repeat_calls_forbidden = usage.repeat_calls_forbidden + len(repeated)
                usage2.tokens_discarded = usage.tokens_discarded + len(result.token_ids)
                usage2.prefill_seconds += usage.prefill_seconds
                usage2.decode_seconds += usage.decode_seconds
                result = result2
                reply = engine._reply(remember, result, usage2)
        if remember is not None:
            engine._remember(remember, result, reply)
        self.reply = reply
        if self.reply.text.startswith(shown) and len(self.reply.text) > len(shown):
            yield self.reply.text[len(shown):]


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


class _ModelShare:
    """What all engines of one model share: the layout (reply memo) and one byte budget."""

    def __init__(self, lm: LoadedModel, max_bytes: int):
        self.lm = lm
        self.layout = Layout(lm)
        self.budget = MemoryBudget(max_bytes)
        self.engines: weakref.WeakSet[ChatEngine] = weakref.WeakSet()


_DEFAULT_BYTES = 2 << 30


class ChatEngine:
    """Weights, a context pool and a layout for one model; shared per process via :meth:`shared`.

    Process-wide state is bounded: at most :attr:`max_shared_engines` shared engines (least recently
    used closed first), one :class:`~flashback_agents.pool.MemoryBudget` per model for all its pools,
    and :meth:`close` / :func:`release_engines` to free caches (the model too, with its last engine).
    """

    _LAYOUTS: dict[int, _ModelShare] = {}
    _LOCK = threading.RLock()
    #: token budget floor for constrained replies (required tool calls, JSON schema output)
    min_constrained_tokens: int = 256
    #: most engines kept by :meth:`shared` (an engine holds a pool; each distinct setting makes one)
    max_shared_engines: int = 8
    #: under ``tool_choice="auto"`` a call the model opens is constrained to the tools' schemas (free
    #: text stays free): a small model's calls otherwise often carry the schema instead of a value
    lazy_tool_grammar: bool = True

    def __init__(self, lm: LoadedModel, *, max_cached_bytes: int | None = None,
                 max_context_tokens: int | None = None, model_name: str | None = None,
                 on_overflow: str = "evict", low_water: float = 0.75, backend: Backend | None = None,
                 acquire_timeout: float | None = 300.0, kv_store_dir: str | os.PathLike | None = None,
                 kv_store_max_bytes: int | None = None):
        """``acquire_timeout``: seconds a call waits for a free pooled context before raising
        :class:`~flashback_agents.pool.PoolTimeoutError` (None: wait forever); a call's ``timeout=``
        overrides it. ``max_cached_bytes`` sets the byte budget shared by every pool of this model
        (the smallest value given wins; default 2 GiB). ``kv_store_dir``: a directory for the disk
        tier (:mod:`flashback_agents.kvstore`): contexts evicted from memory, or left at close/exit,
        are written there and restored instead of recomputed, also by a later process;
        ``kv_store_max_bytes`` bounds it (LRU; default 16 GiB)."""
        from .backends.local import LocalBackend
        from .kvstore import shared_store
        from .pool import check_engine_args

        # before anything shared changes: a bad byte budget would become the whole model's budget
        check_engine_args(max_cached_bytes=max_cached_bytes, max_context_tokens=max_context_tokens,
                          acquire_timeout=acquire_timeout)
        self.lm = lm
        self.max_context_tokens = min(max_context_tokens or lm.max_positions, lm.max_positions)
        #: the settings of every pooled context (one ContextConfig, checked once: a bad on_overflow raises here)
        self.context_config = ContextConfig(self.max_context_tokens, on_overflow, low_water)
        self.on_overflow = on_overflow
        self.acquire_timeout = acquire_timeout
        share = self._share_for(lm, max_cached_bytes)
        #: the disk tier under this engine's pool (None: memory only)
        self.kv_store = shared_store(kv_store_dir, kv_store_max_bytes) if kv_store_dir is not None else None
        if backend is None:
            self.pool: ContextPool | None = ContextPool(lm, config=self.context_config, budget=share.budget,
                                                        store=self.kv_store)
            backend = LocalBackend(self.pool)
        else:
            self.pool = getattr(backend, "pool", None)  # a server backend has no local pool
        #: where rendered ids run: in process (LocalBackend) or on a server (backends.server.ServerBackend)
        self.backend: Backend = backend
        self.layout = share.layout  # one reply memo per model, shared by all its engines
        self.model_name = model_name or lm.name
        self.closed = False
        self._on_close: list[Callable[[ChatEngine], None]] = []
        with self._LOCK:
            share.engines.add(self)
        weakref.finalize(self, ChatEngine._drop_share_if_unused, id(lm))

    @classmethod
    def _share_for(cls, lm: LoadedModel, max_cached_bytes: int | None) -> _ModelShare:
        with cls._LOCK:
            share = cls._LAYOUTS.get(id(lm))
            if share is None or share.lm is not lm:
                share = _ModelShare(lm, max_cached_bytes or _DEFAULT_BYTES)
                cls._LAYOUTS[id(lm)] = share
            elif max_cached_bytes is not None and max_cached_bytes < share.budget.max_bytes:
                share.budget.max_bytes = max_cached_bytes
            return share

    @classmethod
    def _layout_for(cls, lm: LoadedModel) -> Layout:
        return cls._share_for(lm, None).layout

    @classmethod
    def _drop_share_if_unused(cls, lm_id: int) -> bool:
        """Forget a model's layout and budget once no engine uses it (True if dropped)."""
        with cls._LOCK:
            share = cls._LAYOUTS.get(lm_id)
            if share is None or len(share.engines):
                return False
            del cls._LAYOUTS[lm_id]
            return True

    def close(self) -> None:
        """Release this engine: drop its idle cached contexts, its place among the shared engines and
        its backend's connections; with the last engine of a model, the model itself is forgotten by
        the process-wide caches (weights are freed once nothing else references them).

        A closed engine still answers calls (its pool fills again) but is no longer shared.
        """
        with self._LOCK:
            callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback(self)
        with self._LOCK:
            share = self._LAYOUTS.get(id(self.lm))
            if share is not None and share.lm is self.lm:
                share.engines.discard(self)
            self.closed = True
            last = self._drop_share_if_unused(id(self.lm))
        if self.pool is not None:
            self.pool.clear()
        self.backend.close()
        if last:
            _forget_model(self.lm)

    @classmethod
    def shared(cls, model: str | LoadedModel = DEFAULT_MODEL, adapter: str | None = DEFAULT_ADAPTER,
               max_cached_bytes: int | None = None, max_context_tokens: int | None = None,
               on_overflow: str = "evict", *, kv_store_dir: str | os.PathLike | None = None,
               kv_store_max_bytes: int | None = None, chat_template: str | None = None,
               timeout: float | None = None) -> "ChatEngine":
        """The process-wide engine for these arguments: :func:`flashback_agents.engines.shared_engine`."""
        from .engines import shared_engine

        return shared_engine(model, adapter, max_cached_bytes, max_context_tokens, on_overflow, engine_cls=cls,
                             kv_store_dir=kv_store_dir, kv_store_max_bytes=kv_store_max_bytes,
                             chat_template=chat_template, timeout=timeout)

    def on_close(self, callback: Callable[["ChatEngine"], None]) -> None:
        """Call ``callback(self)`` when this engine is closed (the engine caches forget it then)."""
        self._on_close.append(callback)

    # ------------------------------------------------------------------ planning
    def _check_room(self, ids: list[int]) -> None:
        if self.on_overflow != "error":
            return  # the context compacts (or raises, naming what cannot be evicted) when it syncs
        if len(ids) + 1 > self.max_context_tokens:
            raise ContextOverflowError(len(ids) + 1, self.max_context_tokens,
                                       "conversation (prompt plus at least one generated token)")

    def _plan(self, messages: Sequence[Message], tools: Sequence[dict] | None, tool_choice: Any,
              response_schema: dict | None, config: GenerationConfig | None,
              timeout: float | None = None, repeat_calls: str | None = None) -> _Plan:
        from .constrained import ConstraintError, tool_call_schema, tool_name

        config = _config_copy(config)
        check_messages(messages)
        tools = check_tools(tools)
        timeout = _check_timeout(timeout)
        repeat_calls = check_repeat_calls(repeat_calls)
        choice = normalize_tool_choice(tool_choice, tools)
        if response_schema is not None:
            if not isinstance(response_schema, dict):
                raise ConstraintError(f"response_schema must be a JSON schema dict, got "
                                      f"{type(response_schema).__name__}.")
            _json_text(response_schema, "response_schema", ConstraintError)
        try:
            ids = self.layout.render(list(messages), tools=tools or None)
        except (TypeError, UnicodeError) as exc:  # anything check_messages did not foresee: still ours
            raise LayoutError(f"Cannot render these messages ({type(exc).__name__}: {exc}); pass Message objects "
                              "with str content and JSON tool arguments.") from exc
        self._check_room(ids)
        allowed = {tool_name(t) for t in tools} if tools else None
        parse_tools = bool(tools) and choice != "none" and response_schema is None
        no_calls = choice == "none" and response_schema is None
        constraint: Constraint | None = None
        if response_schema is not None:
            constraint = Constraint("json", response_schema)
        elif no_calls:  # the tools stay in the prompt (as OpenAI keeps them); the model cannot open a call
            constraint = Constraint("no_tool_call", {}, fmt=self.layout.tool_format)
        elif choice not in (None, "none"):
            constraint = Constraint("tool_call", tool_call_schema(tools, choice), tools=tools, choice=choice,
                                    fmt=self.layout.tool_format)
        elif choice is None and tools and self.lazy_tool_grammar:
            constraint = Constraint("tool_call_auto", tool_call_schema(tools), tools=tools,
                                    fmt=self.layout.tool_format)
        try:
            prepared = self.backend.prepare(ids, config, constraint)
        except ConstraintError as exc:
            raise ConstraintError(f"{str(exc).strip()} (fix the JSON schema of the tools / response_schema: check "
                                  "its types, properties and required lists)") from exc
        if constraint is not None and constraint.kind not in ("tool_call_auto", "no_tool_call") \
                and config.max_new_tokens < self.min_constrained_tokens:
            # A constrained reply is only useful complete: a small max_tokens must not cut a required call.
            # (Under tool_choice="auto" nothing is required: the caller's max_tokens stands.)
            config.max_new_tokens = self.min_constrained_tokens
        # The guard acts only where a call is optional: a required call cannot be answered in text.
        guard = repeat_calls == "forbid" and parse_tools and choice is None
        return _Plan(ids, config, prepared, allowed, parse_tools, remember=True, timeout=timeout, no_calls=no_calls,
                     answered=answered_calls(messages) if guard else frozenset())

    def _no_call_plan(self, plan: _Plan) -> _Plan:
        """``plan`` again (same prompt, same settings) with calls masked: the repeat-call guard's second decode."""
        constraint = Constraint("no_tool_call", {}, fmt=self.layout.tool_format)
        prepared = self.backend.prepare(plan.ids, plan.config, constraint)
        return _Plan(plan.ids, plan.config, prepared, plan.allowed, parse_tools=False, remember=plan.remember,
                     timeout=plan.timeout, no_calls=True)

    def _visible(self, plan: _Plan, raw: str) -> tuple[str, int]:
        """While streaming: (the content of ``raw`` so far, how many of its chars are safe to emit)."""
        if plan.parse_tools:
            return self.layout.tool_format.stream_split(raw)
        if plan.no_calls:
            return stream_visible(raw, self.layout.tool_format)
        return raw, len(raw)

    @staticmethod
    def _repeated_calls(plan: _Plan, reply: ChatReply) -> list[ToolCall]:
        """The reply's calls that repeat a call already answered in the conversation (guard on)."""
        if not plan.answered or not reply.tool_calls:
            return []
        return [c for c in reply.tool_calls if call_key(c) in plan.answered]

    def _reply(self, plan: _Plan, result: GenerationResult, usage: ChatUsage) -> ChatReply:
        """The reply to ``result``: content, parsed calls (where the plan parses them), finish reason."""
        raw = result.text
        fmt = self.layout.tool_format
        if plan.parse_tools:
            if result.stop_string is None:
                raw = _keep_call_markers(self.lm, raw, result.token_ids, fmt)
            text, calls = parse_tool_calls(raw, plan.allowed, fmt)
            if not calls and fmt.open != TOOL_CALL_OPEN:  # a backend that constrains in Hermes (a server)
                text, calls = parse_tool_calls(raw, plan.allowed)
        elif plan.no_calls:  # the mask keeps calls out; where none applies (a server), a stray tag goes here
            text, calls = strip_call_markup(raw, fmt), []
        else:
            text, calls = raw, []
        finish = result.finish_reason
        if calls and finish == "stop":
            finish = "tool_calls"
        return ChatReply(text=text, tool_calls=calls, finish_reason=finish, usage=usage,
                         model_name=self.model_name, raw_text=raw, token_ids=list(result.token_ids))

    def _remember(self, plan: _Plan, result: GenerationResult, reply: ChatReply) -> None:
        """Remember the reply's generated ids, so the framework sending it back is a pure append."""
        if plan.remember and result.stop_string is None and reply.token_ids:
            self.layout.remember_reply(Message("assistant", reply.text, tool_calls=reply.tool_calls),
                                       reply.token_ids, prompt_ids=plan.ids)

    def _finish(self, plan: _Plan, result: GenerationResult, usage: ChatUsage) -> ChatReply:
        reply = self._reply(plan, result, usage)
        self._remember(plan, result, reply)
        return reply

    # ------------------------------------------------------------------ chat
    def stream_chat(self, messages: Sequence[Message], *, tools: Sequence[dict] | None = None,
                    tool_choice: Any = None, response_schema: dict | None = None,
                    config: GenerationConfig | None = None, timeout: float | None = None,
                    repeat_calls: str | None = None) -> ChatRun:
        """Prepare a reply (errors raise here, before any compute); iterate the run for deltas.

        ``timeout``: seconds to wait for a free context (default: the engine's ``acquire_timeout``).
        ``tool_choice="none"``: the tools stay in the prompt, but decoding cannot open a call.
        ``repeat_calls`` (:data:`REPEAT_CALLS`; None: :data:`DEFAULT_REPEAT_CALLS`): with ``"forbid"`` and
        ``tool_choice`` auto, a call with exactly the name and arguments of a call already answered in
        the conversation is forbidden: the reply is decoded again with calls masked (when no content
        was streamed yet; else, and when the reply also makes new calls, the repeats are dropped);
        ``usage.repeat_calls_forbidden`` counts them.
        """
        return ChatRun(self, self._plan(messages, tools, tool_choice, response_schema, config, timeout,
                                        repeat_calls))

    def chat(self, messages: Sequence[Message], *, tools: Sequence[dict] | None = None,
             tool_choice: Any = None, response_schema: dict | None = None,
             config: GenerationConfig | None = None, timeout: float | None = None,
             repeat_calls: str | None = None) -> ChatReply:
        """Reply to a conversation; only tokens not already cached are computed (see :meth:`stream_chat`)."""
        run = self.stream_chat(messages, tools=tools, tool_choice=tool_choice, response_schema=response_schema,
                               config=config, timeout=timeout, repeat_calls=repeat_calls)
        run._buffered = True
        for _ in run:
            pass
        assert run.reply is not None
        return run.reply

    async def achat(self, messages: Sequence[Message], **kwargs: Any) -> ChatReply:
        """:meth:`chat` decoding in a worker thread, so the event loop keeps running.

        Cancelling the awaiting task stops decoding at the next token and releases the context (the
        tokens decoded so far stay cached, consistent with a recompute).
        """
        run = await asyncio.to_thread(self.stream_chat, messages, **kwargs)  # planning may compile a grammar
        run._buffered = True
        return await _drain(AsyncChatRun(run))

    def astream_chat(self, messages: Sequence[Message], **kwargs: Any) -> AsyncChatRun:
        """Async iterator of deltas (decoding in a worker thread); ``.reply`` after iteration."""
        return AsyncChatRun(self.stream_chat(messages, **kwargs))

    # ------------------------------------------------------------------ completion
    def _complete_plan(self, prompt: str, config: GenerationConfig | None, timeout: float | None = None) -> _Plan:
        if not isinstance(prompt, str):
            raise LayoutError(f"prompt must be a string, got {type(prompt).__name__}")
        _check_text(prompt, "prompt")
        config = _config_copy(config)
        timeout = _check_timeout(timeout)
        ids = self.lm.encode(prompt)
        if not ids:  # an empty prompt still needs one token to condition on
            tok = self.lm.tokenizer
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = [int(start if start is not None else 0)]
        self._check_room(ids)
        return _Plan(ids, config, self.backend.prepare(ids, config, None), None, parse_tools=False,
                     remember=False, timeout=timeout)

    def stream_complete(self, prompt: str, config: GenerationConfig | None = None,
                        timeout: float | None = None) -> ChatRun:
        """Raw text completion (no chat template), streamed."""
        return ChatRun(self, self._complete_plan(prompt, config, timeout))

    def complete(self, prompt: str, config: GenerationConfig | None = None, timeout: float | None = None) -> ChatReply:
        """Raw text completion (no chat template) on the same pool."""
        run = self.stream_complete(prompt, config, timeout)
        for _ in run:
            pass
        assert run.reply is not None
        return run.reply

    async def acomplete(self, prompt: str, config: GenerationConfig | None = None,
                        timeout: float | None = None) -> ChatReply:
        run = await asyncio.to_thread(self.stream_complete, prompt, config, timeout)
        return await _drain(AsyncChatRun(run))

    def astream_complete(self, prompt: str, config: GenerationConfig | None = None,
                         timeout: float | None = None) -> AsyncChatRun:
        return AsyncChatRun(self.stream_complete(prompt, config, timeout))


def _keep_call_markers(lm: LoadedModel, raw: str, token_ids: Sequence[int], fmt: Any) -> str:
    """``raw`` with the format's call markers that are special tokens put back (decoding skips special
    tokens, so Mistral's ``[TOOL_CALLS]`` or Llama's ``<|python_tag|>`` would vanish from the text)."""
    tok = lm.tokenizer
    markers = [m for m in (fmt.open, fmt.close, "<|python_tag|>") if m]
    special = set(getattr(tok, "all_special_tokens", []) or [])
    special |= {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    keep = {}
    for m in markers:
        if m in special:
            tid = tok.convert_tokens_to_ids(m)
            if isinstance(tid, int) and tid in token_ids:
                keep[tid] = m
    if not keep:
        return raw
    pieces, run = [], []
    for t in token_ids:
        if t in keep:
            pieces.append(lm.decode(run, skip_special_tokens=True) + keep[t])
            run = []
        else:
            run.append(t)
    return "".join(pieces) + lm.decode(run, skip_special_tokens=True)


def _config_copy(config: Any) -> GenerationConfig:
    from .generation import GenerationConfigError

    if config is None:
        config = GenerationConfig()
    elif not isinstance(config, GenerationConfig):
        raise GenerationConfigError(f"config must be a GenerationConfig, got {type(config).__name__}.")
    config = replace(config)
    config.validate()
    return config


def _check_timeout(timeout: Any) -> float | None:
    from .generation import GenerationConfigError

    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
        raise GenerationConfigError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}.")
    return float(timeout)


async def _drain(run: AsyncChatRun) -> ChatReply:
    async for _ in run:
        pass
    assert run.reply is not None
    return run.reply


def _forget_model(lm: LoadedModel) -> None:
    """Drop ``lm`` from the process-wide caches that hold models (shared weights, grammar compilers)."""
    from .constrained import GRAMMARS
    from .models import forget_shared_model

    forget_shared_model(lm)
    GRAMMARS.forget(lm)
    CALL_MASKS.forget(lm)


def release_engines() -> int:
    """Close every shared engine (local and server): :func:`flashback_agents.engines.release_engines`."""
    from .engines import release_engines as release

    return release()
