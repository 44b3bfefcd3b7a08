"""Render conversations into token ids, one message at a time, in the append (FlashBack) layout.

Why one message at a time: many chat templates are not prefix-stable when a conversation is
rendered whole (they rewrite earlier turns). Rendering each message separately and concatenating
token ids guarantees that the ids of messages 1..n are a prefix of the ids of messages 1..n+1, so
a cached context only ever has to compute the new messages.

Append layout::

    [system + tool schemas][user][<MARK_L> doc <MARK_R>]...[assistant][tool: <MARK_L> result <MARK_R>]...

Prepend layout (the In-Context RALM baseline): the same, but every evidence block and tool result
is moved before the first user message, so each new piece of evidence invalidates what follows.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from .errors import FlashBackError
from .tokens import Tokens
# the tool-call vocabulary lives in toolformat (below this module); its names stay importable from here
from .toolformat import (TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCall, ToolCallFormat, format_tool_calls,
                         probe_tool_format, render_tool_schemas)

__all__ = ["ROLES", "DEFAULT_SYSTEM", "TOOL_CALL_OPEN", "TOOL_CALL_CLOSE", "LayoutError", "ToolCall", "Message",
           "ChatFormat", "Layout", "ReplyMemo", "check_conversation", "format_tool_calls", "render_tool_schemas",
           "template_kwargs", "TEMPLATE_DATE"]

ROLES = ("system", "user", "assistant", "tool", "evidence")
DEFAULT_SYSTEM = "You are a helpful assistant."
#: key of a framework message's extra fields (LangChain ``HumanMessage.additional_kwargs``, LlamaIndex
#: ``ChatMessage.additional_kwargs``) that holds the retrieved texts of :attr:`Message.documents`
DOCUMENTS_KEY = "documents"
#: other formats' role names -> :data:`ROLES`: OpenAI chat messages, LlamaIndex ``MessageRole``,
#: LangChain ``ChatMessage.role`` and LangChain message types (``BaseMessage.type``; None: no role)
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool", "function": "tool"}
LLAMAINDEX_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                    "chatbot": "assistant", "model": "assistant", "tool": "tool", "function": "tool"}
LANGCHAIN_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user",
                   "assistant": "assistant", "ai": "assistant", "tool": "tool"}
LANGCHAIN_TYPES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool",
                   "function": "tool", "chat": None, "HumanMessageChunk": "user", "AIMessageChunk": "assistant"}


class LayoutError(ValueError, FlashBackError):
    """A conversation that cannot be rendered (unknown role, orphan tool result, ...)."""


@dataclass
class Message:
    """One framework-neutral message. ``role="evidence"`` is a retrieved document (marked)."""

    role: str
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    documents: list[str] = field(default_factory=list)  # retrieved docs for a user turn, appended after it

    def key(self) -> str:
        """Canonical text of the message: what the reply memo is keyed on."""
        calls = "".join(c.to_json() for c in self.tool_calls)
        return f"{self.role}\x00{self.content}\x00{calls}"


@dataclass(frozen=True)
class ChatFormat:
    """Per-role text wrappers around message content, derived from the model's chat template."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    #: the system text when the conversation has none: :data:`DEFAULT_SYSTEM` for chat models (the one
    #: system text every adapter is trained under); nothing for the plain fallback of a model without
    #: a chat template (no system block at all unless tools need one)
    default_system: str = DEFAULT_SYSTEM

    @classmethod
    def chatml(cls) -> "ChatFormat":
        roles = ("system", "user", "assistant", "tool")
        return cls(prefix={r: f"<|im_start|>{r}\n" for r in roles},
                   suffix={r: "<|im_end|>\n" for r in roles},
                   generation_prompt="<|im_start|>assistant\n")

    @classmethod
    def plain(cls) -> "ChatFormat":
        """For base models with no chat template."""
        names = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
        return cls(prefix={r: f"{n}: " for r, n in names.items()},
                   suffix={r: "\n" for r in names}, generation_prompt="Assistant:", default_system="")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ChatFormat":
        """Probe the chat template with placeholder messages to find each role's wrappers."""
        if not getattr(tokenizer, "chat_template", None):  # no template: inject no system text either
            vocab = tokenizer.get_vocab()
            return replace(cls.chatml(), default_system="") if "<|im_start|>" in vocab else cls.plain()
        try:
            return _probe_template(tokenizer)
        except Exception:  # a template that rejects the probe: fall back to a known format
            vocab = tokenizer.get_vocab()
            return cls.chatml() if "<|im_start|>" in vocab else cls.plain()


#: the date given to templates that print one (Llama 3.x: ``Today Date: ...``): a fixed one, so the system
#: block, and every cache built on it, does not change from one day to the next
TEMPLATE_DATE = "26 Jul 2024"


def template_kwargs(tokenizer: Any) -> dict:
    """Extra variables for the chat template: a fixed ``date_string`` where the template reads one."""
    template = getattr(tokenizer, "chat_template", None)
    return {"date_string": TEMPLATE_DATE} if isinstance(template, str) and "date_string" in template else {}


def _render(tokenizer: Any, msgs: list[dict], gen: bool = False) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **template_kwargs(tokenizer))


def _split(text: str, base: str, marker: str) -> tuple[str, str]:
    if not text.startswith(base) or marker not in text[len(base):]:
        raise ValueError("template is not prefix-stable on the probe")
    part = text[len(base):]
    pre, post = part.split(marker, 1)
    return pre, post


def _probe_template(tokenizer: Any) -> ChatFormat:
    s, u, a, t = "\u2063SYSX\u2063", "\u2063USRX\u2063", "\u2063ASTX\u2063", "\u2063TOOLX\u2063"
    sys_msgs = [{"role": "system", "content": s}]
    t0 = _render(tokenizer, sys_msgs)
    if s not in t0:  # Mistral v3: nothing for a system-only conversation (it goes into the last user turn)
        return _probe_without_system_block(tokenizer, s, u, a)
    sys_pre, sys_post = t0.split(s, 1)
    t1 = _render(tokenizer, sys_msgs + [{"role": "user", "content": u}])
    user_pre, user_post = _split(t1, t0, u)
    t2 = _render(tokenizer, sys_msgs + [{"role": "user", "content": u}, {"role": "assistant", "content": a}])
    ast_pre, ast_post = _split(t2, t1, a)
    gen = _render(tokenizer, sys_msgs + [{"role": "user", "content": u}], gen=True)[len(t1):]
    try:
        t3 = _render(tokenizer, sys_msgs + [{"role": "user", "content": u}, {"role": "assistant", "content": a},
                                            {"role": "tool", "content": t, "tool_call_id": "c0"}])
        tool_pre, tool_post = _split(t3, t2, t)
        if tool_pre.endswith('"') and tool_post.startswith('"'):  # Llama 3 JSON-quotes tool content; ours is raw
            tool_pre, tool_post = tool_pre[:-1], tool_post[1:]
    except Exception:
        tool_pre, tool_post = user_pre, user_post
    # Trailing text after the system block (e.g. a default date line) belongs to the system suffix.
    return ChatFormat(prefix={"system": sys_pre, "user": user_pre, "assistant": ast_pre, "tool": tool_pre},
                      suffix={"system": sys_post, "user": user_post, "assistant": ast_post, "tool": tool_post},
                      generation_prompt=gen or ast_pre)


def _probe_without_system_block(tokenizer: Any, s: str, u: str, a: str) -> ChatFormat:
    """Wrappers for templates that render no system block of its own (Mistral v3 puts the system prompt
    in front of the *last* user message, which no append-only rendering can follow): user / assistant
    wrappers from a conversation without a system message, and the system prompt as an instruction turn
    of its own (what precedes it in the template's rendering, e.g. BOS + ``[INST] ``, then the user suffix)."""
    u2 = "\u2063USRY\u2063"
    t1 = _render(tokenizer, [{"role": "user", "content": u}])
    t2 = _render(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a}])
    ast_pre, ast_post = _split(t2, t1, a)
    t3 = _render(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a},
                             {"role": "user", "content": u2}])
    user_pre, user_post = _split(t3, t2, u2)
    with_sys = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}])
    if s not in with_sys:
        raise ValueError("template renders no system prompt")
    gen = _render(tokenizer, [{"role": "user", "content": u}], gen=True)[len(t1):]
    sys_pre = with_sys[:with_sys.index(s)]
    return ChatFormat(prefix={"system": sys_pre, "user": user_pre, "assistant": ast_pre, "tool": user_pre},
                      suffix={"system": user_post, "user": user_post, "assistant": ast_post, "tool": user_post},
                      generation_prompt=gen or ast_pre)


class ReplyMemo:
    """Remembers the token ids the model generated for each reply (an explicit, bounded cache).

    Re-tokenizing generated text often yields different ids than were generated; reusing the
    generated ids keeps the next call's rendering a pure extension of the cached context.
    Entries are keyed by the reply *and* the ids it followed (the same text generated twice in one
    conversation, e.g. a repeated tool call, may have different ids each time), with the reply alone
    as a fallback.
    """

    def __init__(self, max_entries: int = 4096):
        self._data: OrderedDict[str, list[int]] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def put(self, key: str, ids: list[int]) -> None:
        with self._lock:
            self._data[key] = list(ids)
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def get(self, key: str) -> list[int] | None:
        with self._lock:
            ids = self._data.get(key)
            if ids is not None:
                self._data.move_to_end(key)
            return ids


def _prefix_key(prefix: Sequence[int], key: str) -> str:
    return f"{hash(tuple(prefix))}:{len(prefix)}\x01{key}"


class Layout:
    """Renders messages to token ids for one model. One code path for inference and training."""

    def __init__(self, lm: Tokens, memo: ReplyMemo | None = None, fmt: ChatFormat | None = None,
                 tool_format: ToolCallFormat | None = None):
        self.lm = lm
        self.memo = memo if memo is not None else ReplyMemo()
        self.fmt = fmt or ChatFormat.from_tokenizer(lm.tokenizer)
        #: the model's tool-call syntax (:class:`~flashback_agents.toolformat.ToolCallFormat`), probed from
        #: its chat template; Hermes ``<tool_call>`` where the template has none
        self.tool_format = tool_format or probe_tool_format(lm.tokenizer)
        # Bounded LRU of short texts (role wrappers, "\n", repeated short messages): an unbounded dict
        # grew by one entry per distinct short message for the life of the process.
        self._enc_cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._enc_lock = threading.Lock()

    #: entries kept by the encode cache (texts shorter than 256 chars), least recently used dropped
    ENC_CACHE_ENTRIES = 2048

    def _enc(self, text: str) -> list[int]:
        if not text:
            return []
        with self._enc_lock:
            ids = self._enc_cache.get(text)
            if ids is not None:
                self._enc_cache.move_to_end(text)
                return list(ids)
        ids = tuple(self.lm.encode(text))
        if len(text) < 256:
            with self._enc_lock:
                self._enc_cache[text] = ids
                while len(self._enc_cache) > self.ENC_CACHE_ENTRIES:
                    self._enc_cache.popitem(last=False)
        return list(ids)

    def marked(self, text: str) -> list[int]:
        """``<MARK_L> text <MARK_R>`` as ids (markers are single special tokens)."""
        left, right = self.lm.marker_ids
        return [left] + self._enc(text) + [right]

    def evidence(self, text: str, source: str | None = None) -> list[int]:
        """A retrieved document appended after the question, marker-wrapped, then a newline."""
        body = f"[{source}] {text}" if source else text
        return self.marked(body) + self._enc("\n")

    def generation_prompt(self) -> list[int]:
        return self._enc(self.fmt.generation_prompt)

    def render_message(self, msg: Message, tools: Sequence[dict] | None = None,
                       prefix: Sequence[int] | None = None) -> list[int]:
        """Token ids of one message; the same message after the same ``prefix`` always gives the same ids."""
        fmt = self.fmt
        role = msg.role
        if role not in ROLES:
            raise LayoutError(f"Unknown message role {role!r}; expected one of {ROLES}.")
        if role == "evidence":
            return self.evidence(msg.content, msg.name)
        if role == "system":
            content = (msg.content or fmt.default_system) + self.tool_format.tools_text(tools or [])
            return self._enc(fmt.prefix["system"]) + self._enc(content) + self._enc(fmt.suffix["system"])
        if role == "tool":
            head = f"{msg.name}: " if msg.name else ""
            return (self._enc(fmt.prefix["tool"]) + self.marked(head + msg.content)
                    + self._enc(fmt.suffix["tool"]))
        if role == "assistant":
            at = _prefix_key(prefix, msg.key()) if prefix is not None else None
            body = self.memo.get(at) if at is not None else None
            if body is None:
                body = self.memo.get(msg.key())
                if body is not None and at is not None:
                    # pin it after this prefix: a reply moved by a history edit (a summary, trimmed
                    # messages) keeps these ids in the next call too, even if the same text is generated
                    # again meanwhile with other ids (which replaces the text-only entry)
                    self.memo.put(at, body)
            prefix = self._enc(fmt.generation_prompt)
            suffix = self._enc(fmt.suffix["assistant"])
            if body is None:
                body = self._enc(msg.content + self.tool_format.render(msg.tool_calls))
            elif suffix and body and body[-1] == suffix[0]:
                body = body[:-1]  # the generated EOS is the template's end-of-turn token
            return prefix + body + suffix
        ids = self._enc(fmt.prefix["user"]) + self._enc(msg.content) + self._enc(fmt.suffix["user"])
        for doc in msg.documents:
            ids += self.evidence(doc)
        return ids

    def with_system(self, messages: Sequence[Message], tools: Sequence[dict] | None = None) -> list[Message]:
        """``messages`` with the system block they render with: an empty one first (filled with the
        format's default system text and the tool schemas) unless the conversation has its own, or the
        format has no default and there are no tools."""
        msgs = list(messages)
        if (not msgs or msgs[0].role != "system") and (self.fmt.default_system or tools):
            msgs.insert(0, Message("system", ""))
        return msgs

    def render(self, messages: Sequence[Message], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True, pattern: str = "append") -> list[int]:
        """Render a whole conversation. A system block comes first (tool schemas live there; only the plain
        fallback of a model without a chat template, with no system message and no tools, has none)."""
        check_conversation(messages)
        msgs = self.with_system(messages, tools)
        if pattern == "prepend":
            msgs = _prepend_order(msgs)
        elif pattern != "append":
            raise LayoutError(f"pattern must be 'append' or 'prepend', got {pattern!r}")
        ids: list[int] = []
        for i, msg in enumerate(msgs):
            ids += self.render_message(msg, tools if i == 0 else None, prefix=ids if msg.role == "assistant" else None)
        if add_generation_prompt:
            ids += self.generation_prompt()
        return ids

    def remember_reply(self, msg: Message, generated_ids: list[int], prompt_ids: Sequence[int] | None = None) -> None:
        """Record the ids generated for an assistant message (see :class:`ReplyMemo`).

        ``prompt_ids``: the ids the reply was generated after (ending with the generation prompt);
        given, the entry is also keyed by them, so a repeated identical reply keeps its own ids.
        """
        self.memo.put(msg.key(), generated_ids)
        if prompt_ids is not None:
            gen = self.generation_prompt()
            prefix = list(prompt_ids)
            if gen and prefix[-len(gen):] == gen:
                prefix = prefix[: -len(gen)]
            self.memo.put(_prefix_key(prefix, msg.key()), generated_ids)


def _prepend_order(msgs: list[Message]) -> list[Message]:
    """Move evidence (documents, tool results) before the first user turn: the RALM baseline."""
    evidence: list[Message] = []
    rest: list[Message] = []
    for m in msgs:
        if m.role in ("evidence", "tool"):
            evidence.append(Message("evidence", m.content, name=m.name))
        elif m.role == "user" and m.documents:
            evidence += [Message("evidence", d) for d in m.documents]
            rest.append(Message("user", m.content))
        else:
            rest.append(m)
    head = 1 if rest and rest[0].role == "system" else 0
    return rest[:head] + evidence + rest[head:]


def check_conversation(messages: Sequence[Message]) -> None:
    """Reject conversations a user could get wrong: clear errors, before any compute."""
    seen_calls: set[str] = set()
    for i, m in enumerate(messages):
        if not isinstance(m, Message):
            raise LayoutError(f"Message {i} is a {type(m).__name__}, not a flashback_agents Message.")
        if m.role not in ROLES:
            raise LayoutError(f"Message {i} has unknown role {m.role!r}; expected one of {ROLES}.")
        if m.role == "system" and i != 0:
            raise LayoutError(f"Message {i} is a system message; only the first message may be one.")
        for c in m.tool_calls:
            if c.id:
                seen_calls.add(c.id)
        if m.role == "tool" and m.tool_call_id and m.tool_call_id not in seen_calls:
            raise LayoutError(f"Message {i} is a tool result for call id {m.tool_call_id!r}, but no earlier "
                              "assistant message made a call with that id.")
