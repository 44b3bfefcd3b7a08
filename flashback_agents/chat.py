"""ChatEngine: messages -> plan -> backend run -> reply, one code path for every framework integration.

The engine receives its backend (and its model's shared layout): it imports no backend implementation
and no registry. :mod:`flashback_agents.engines` builds engines (``local_engine`` in process,
``shared_engine`` per model spec, ``server_engine`` for a server) and owns every process-wide cache.

It renders framework-neutral :class:`~flashback_agents.layout.Message` lists in the append layout,
validates the call (:mod:`flashback_agents.chatchecks`), has the backend compile what the call needs
(xgrammar processors for a required call or a JSON answer, the call mask of
:mod:`flashback_agents.callmask`) and runs it as a :class:`~flashback_agents.runs.ChatRun`, which
streams, parses tool calls and runs the repeat-call guard.

``tool_choice="none"`` keeps the tools in the prompt but masks the opening of a call while decoding.
``repeat_calls="forbid"`` (the loop guard, on by default: see :data:`DEFAULT_REPEAT_CALLS`) replaces a
reply that only repeats calls already answered in the conversation by one decoded again with calls
masked, and counts it in ``usage.repeat_calls_forbidden``.

After each reply the generated token ids are remembered (``Layout.remember_reply``): when the
framework sends the same assistant message back, it renders to exactly the ids that were generated
and the next step is a pure append (``cache_read`` = whole previous prompt + reply).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Sequence

from .backends.base import Backend, ChatUsage, Constraint
from .chatchecks import (DEFAULT_REPEAT_CALLS, REPEAT_CALLS, check_messages, check_repeat_calls, check_text,
                         check_timeout, check_tools, config_copy, json_text, normalize_tool_choice)
from .context import ContextConfig, ContextOverflowError
from .generation import GenerationConfig, GenerationResult
from .layout import Layout, LayoutError, Message
from .models import LoadedModel
from .pool import ContextPool, check_engine_args
from .runs import AsyncChatRun, ChatReply, ChatRun, Plan, answered_calls, build_reply, drain, remember_reply
from .toolformat import ConstraintError, ToolCall, parse_tool_calls, tool_call_schema, tool_name

__all__ = ["ChatEngine", "ChatReply", "ChatUsage", "ChatRun", "AsyncChatRun", "parse_tool_calls",
           "normalize_tool_choice", "answered_calls", "check_repeat_calls", "DEFAULT_REPEAT_CALLS", "REPEAT_CALLS",
           "ToolCall"]

#: the run plan's former private name (kept for callers that built plans by hand)
_Plan = Plan


class ChatEngine:
    """A model, its layout and the backend its rendered ids run on (built by :mod:`flashback_agents.engines`).

    ``ChatEngine(lm, backend=..., layout=...)``: ``backend`` is required (a
    :class:`~flashback_agents.backends.local.LocalBackend` over a pool, a server backend, or your own);
    ``layout`` defaults to a fresh :class:`~flashback_agents.layout.Layout` (the engines module passes the
    model's shared one, so every engine of a model shares one reply memo). Build local engines with
    :func:`flashback_agents.local_engine` and shared ones with :func:`flashback_agents.shared_engine`.
    """

    #: token budget floor for constrained replies (required tool calls, JSON schema output)
    min_constrained_tokens: int = 256
    #: most engines :func:`~flashback_agents.engines.shared_engine` keeps (each distinct setting makes one)
    max_shared_engines: int = 8
    #: under ``tool_choice="auto"`` a call the model opens is constrained to the tools' schemas (free
    #: text stays free): a small model's calls otherwise often carry the schema instead of a value
    lazy_tool_grammar: bool = True

    def __init__(self, lm: LoadedModel, *, backend: Backend | None = None, layout: Layout | None = None,
                 max_context_tokens: int | None = None, model_name: str | None = None,
                 on_overflow: str = "evict", low_water: float = 0.75, acquire_timeout: float | None = 300.0):
        """``acquire_timeout``: seconds a call waits for a free pooled context before raising
        :class:`~flashback_agents.pool.PoolTimeoutError` (None: wait forever); a call's ``timeout=``
        overrides it. ``max_context_tokens``: tokens per conversation (default and ceiling: the model's window)."""
        if backend is None:
            raise TypeError("ChatEngine receives its backend: build an in-process engine with "
                            "flashback_agents.local_engine(lm, max_cached_bytes=..., kv_store_dir=...), or the shared "
                            "one for a model spec with flashback_agents.shared_engine(spec).")
        check_engine_args(max_context_tokens=max_context_tokens, acquire_timeout=acquire_timeout)
        self.lm = lm
        self.max_context_tokens = min(max_context_tokens or lm.max_positions, lm.max_positions)
        #: the settings of every pooled context (one ContextConfig, checked once: a bad on_overflow raises here)
        self.context_config = ContextConfig(self.max_context_tokens, on_overflow, low_water)
        self.on_overflow = on_overflow
        self.acquire_timeout = acquire_timeout
        #: where rendered ids run: in process (LocalBackend) or on a server (backends.server.ServerBackend)
        self.backend: Backend = backend
        self.pool: ContextPool | None = getattr(backend, "pool", None)  # a server backend has no local pool
        #: the disk tier under this engine's pool (None: memory only)
        self.kv_store = getattr(self.pool, "store", None)
        self.layout = layout if layout is not None else Layout(lm)
        self.model_name = model_name or lm.name
        self.closed = False
        self._on_close: list[Callable[[ChatEngine], None]] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release this engine: its close callbacks run (the engine caches forget it; with the last engine
        of a model, the model is forgotten too), then its backend drops its idle cached contexts and
        connections.

        A closed engine still answers calls (its pool fills again) but is no longer shared.
        """
        with self._lock:
            callbacks, self._on_close = self._on_close, []
            self.closed = True
        for callback in callbacks:
            callback(self)
        self.backend.close()

    def on_close(self, callback: Callable[["ChatEngine"], None]) -> None:
        """Call ``callback(self)`` when this engine is closed (the engine caches forget it then)."""
        with self._lock:
            self._on_close.append(callback)

    # ------------------------------------------------------------------ planning
    def check_room(self, ids: list[int]) -> None:
        """Refuse a prompt that leaves no room to generate (``on_overflow="error"``; a server engine asks the server)."""
        if self.on_overflow != "error":
            return  # the context compacts (or raises, naming what cannot be evicted) when it syncs
        if len(ids) + 1 > self.max_context_tokens:
            raise ContextOverflowError(len(ids) + 1, self.max_context_tokens,
                                       "conversation (prompt plus at least one generated token)")

    def _plan(self, messages: Sequence[Message], tools: Sequence[dict] | None, tool_choice: Any,
              response_schema: dict | None, config: GenerationConfig | None,
              timeout: float | None = None, repeat_calls: str | None = None) -> Plan:
        config = config_copy(config)
        check_messages(messages)
        tools = check_tools(tools)
        timeout = check_timeout(timeout)
        repeat_calls = check_repeat_calls(repeat_calls)
        choice = normalize_tool_choice(tool_choice, tools)
        if response_schema is not None:
            if not isinstance(response_schema, dict):
                raise ConstraintError(f"response_schema must be a JSON schema dict, got "
                                      f"{type(response_schema).__name__}.")
            json_text(response_schema, "response_schema", ConstraintError)
        try:
            ids = self.layout.render(list(messages), tools=tools or None)
        except (TypeError, UnicodeError) as exc:  # anything check_messages did not foresee: still ours
            raise LayoutError(f"Cannot render these messages ({type(exc).__name__}: {exc}); pass Message objects "
                              "with str content and JSON tool arguments.") from exc
        self.check_room(ids)
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
        return Plan(ids, config, prepared, allowed, parse_tools, remember=True, timeout=timeout, no_calls=no_calls,
                    answered=answered_calls(messages) if guard else frozenset())

    def _finish(self, plan: Plan, result: GenerationResult, usage: ChatUsage) -> ChatReply:
        """The reply to a finished run (:func:`~flashback_agents.runs.build_reply`), remembered."""
        reply = build_reply(self, plan, result, usage)
        remember_reply(self, plan, result, reply)
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
        run.buffered = True
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
        run.buffered = True
        return await drain(AsyncChatRun(run))

    def astream_chat(self, messages: Sequence[Message], **kwargs: Any) -> AsyncChatRun:
        """Async iterator of deltas (decoding in a worker thread); ``.reply`` after iteration."""
        return AsyncChatRun(self.stream_chat(messages, **kwargs))

    # ------------------------------------------------------------------ completion
    def _complete_plan(self, prompt: str, config: GenerationConfig | None, timeout: float | None = None) -> Plan:
        if not isinstance(prompt, str):
            raise LayoutError(f"prompt must be a string, got {type(prompt).__name__}")
        check_text(prompt, "prompt")
        config = config_copy(config)
        timeout = check_timeout(timeout)
        ids = self.lm.encode(prompt)
        if not ids:  # an empty prompt still needs one token to condition on
            tok = self.lm.tokenizer
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = [int(start if start is not None else 0)]
        self.check_room(ids)
        return Plan(ids, config, self.backend.prepare(ids, config, None), None, parse_tools=False,
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
        return await drain(AsyncChatRun(run))

    def astream_complete(self, prompt: str, config: GenerationConfig | None = None,
                         timeout: float | None = None) -> AsyncChatRun:
        return AsyncChatRun(self.stream_complete(prompt, config, timeout))
