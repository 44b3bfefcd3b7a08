"""One reply of a chat engine, from plan to :class:`ChatReply`: the run classes and the reply they build.

A :class:`Plan` is everything one call needs, validated and compiled before any compute;
:class:`ChatRun` starts it on the engine's backend, streams the safe content deltas (call markup held
back), parses the calls (:func:`~flashback_agents.toolformat.parse_tool_calls`), runs the repeat-call
guard (a reply that only repeats answered calls is decoded again with calls masked) and remembers the
generated ids (``Layout.remember_reply``). :class:`AsyncChatRun` is its async form.

The engine is read through its public attributes only (``backend``, ``layout``, ``lm``,
``model_name``, ``acquire_timeout``): this module sits below :mod:`flashback_agents.chat`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

from .backends.base import BackendRun, ChatUsage, Constraint
from .callmask import stream_visible, strip_call_markup
from .generation import GenerationConfig, GenerationResult
from .layout import Message
from .toolformat import PYTHON_TAG, TOOL_CALL_OPEN, ToolCall, ToolCallFormat, parse_tool_calls

__all__ = ["ChatReply", "Plan", "ChatRun", "AsyncChatRun", "call_key", "answered_calls", "build_reply",
           "remember_reply", "repeated_calls", "visible_text", "no_call_plan", "keep_call_markers", "drain"]


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


class Plan:
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


def no_call_plan(engine: Any, plan: Plan) -> Plan:
    """``plan`` again (same prompt, same settings) with calls masked: the repeat-call guard's second decode."""
    constraint = Constraint("no_tool_call", {}, fmt=engine.layout.tool_format)
    prepared = engine.backend.prepare(plan.ids, plan.config, constraint)
    return Plan(plan.ids, plan.config, prepared, plan.allowed, parse_tools=False, remember=plan.remember,
                timeout=plan.timeout, no_calls=True)


def visible_text(plan: Plan, raw: str, fmt: ToolCallFormat) -> tuple[str, int]:
    """While streaming: (the content of ``raw`` so far, how many of its chars are safe to emit)."""
    if plan.parse_tools:
        return fmt.stream_split(raw)
    if plan.no_calls:
        return stream_visible(raw, fmt)
    return raw, len(raw)


def repeated_calls(plan: Plan, reply: ChatReply) -> list[ToolCall]:
    """The reply's calls that repeat a call already answered in the conversation (guard on)."""
    if not plan.answered or not reply.tool_calls:
        return []
    return [c for c in reply.tool_calls if call_key(c) in plan.answered]


def build_reply(engine: Any, plan: Plan, result: GenerationResult, usage: ChatUsage) -> ChatReply:
    """The reply to ``result``: content, parsed calls (where the plan parses them), finish reason."""
    raw = result.text
    fmt = engine.layout.tool_format
    if plan.parse_tools:
        if result.stop_string is None:
            raw = keep_call_markers(engine.lm, raw, result.token_ids, fmt)
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
                     model_name=engine.model_name, raw_text=raw, token_ids=list(result.token_ids))


def remember_reply(engine: Any, plan: Plan, result: GenerationResult, reply: ChatReply) -> None:
    """Remember the reply's generated ids, so the framework sending it back is a pure append."""
    if plan.remember and result.stop_string is None and reply.token_ids:
        engine.layout.remember_reply(Message("assistant", reply.text, tool_calls=reply.tool_calls),
                                     reply.token_ids, prompt_ids=plan.ids)


def keep_call_markers(lm: Any, raw: str, token_ids: Sequence[int], fmt: ToolCallFormat) -> str:
    """``raw`` with the format's call markers that are special tokens put back (decoding skips special
    tokens, so Mistral's ``[TOOL_CALLS]`` or Llama's ``<|python_tag|>`` would vanish from the text)."""
    tok = lm.tokenizer
    markers = [m for m in (fmt.open, fmt.close, PYTHON_TAG) if m]
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


class ChatRun:
    """One streamed reply: iterate for content deltas; ``reply`` is set once iteration ends.

    Tool-call markup is not streamed as content; the parsed calls are on ``reply.tool_calls``.
    The context lease is held only while iterating; ``cancel()`` stops decoding at the next token;
    ``close()`` (or dropping the iterator: the garbage collector closes it) releases the context of a
    stream abandoned mid-way at once.
    """

    def __init__(self, engine: Any, plan: Plan):
        self.engine, self.plan = engine, plan
        self.reply: ChatReply | None = None
        self._cancelled = threading.Event()
        self._started = False
        self._run: BackendRun | None = None
        self._gen: weakref.ref | None = None  # weak: the iterator must stay collectable when dropped
        #: nobody reads the deltas (chat/achat): a reply may be replaced even after text was yielded
        self.buffered = False

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

    def _decode(self, plan: Plan, prepared: Any) -> Iterator[str]:
        """Run ``plan`` on the backend, yielding safe content deltas; returns (result, usage, shown text)."""
        engine = self.engine
        run = self._run = engine.backend.start(plan.ids, plan.config, prepared)
        run.timeout = plan.timeout if plan.timeout is not None else engine.acquire_timeout
        if self._cancelled.is_set():
            run.cancel()
        raw, shown = "", ""
        for delta in run:
            raw += delta
            visible, safe = visible_text(plan, raw, engine.layout.tool_format)
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
        reply = build_reply(engine, plan, result, usage)
        remember = plan
        repeated = repeated_calls(plan, reply)
        if repeated:
            fresh = [c for c in reply.tool_calls if all(c is not r for r in repeated)]
            if fresh or self._cancelled.is_set() or (shown and not self.buffered):
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
                remember = no_call_plan(engine, plan)
                result2, usage2, shown = yield from self._decode(remember, remember.prepared)
                usage2.repeat_calls_forbidden = usage.repeat_calls_forbidden + len(repeated)
                usage2.tokens_discarded = usage.tokens_discarded + len(result.token_ids)
                usage2.prefill_seconds += usage.prefill_seconds
                usage2.decode_seconds += usage.decode_seconds
                result = result2
                reply = build_reply(engine, remember, result, usage2)
        if remember is not None:
            remember_reply(engine, remember, result, reply)
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


async def drain(run: AsyncChatRun) -> ChatReply:
    async for _ in run:
        pass
    assert run.reply is not None
    return run.reply
