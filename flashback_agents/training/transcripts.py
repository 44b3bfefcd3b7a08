"""Read agent transcripts (OpenAI JSONL, LangChain dumps, LlamaIndex chat histories) into Messages.

Every reader produces the same thing: a :class:`Conversation` holding a list of
:class:`flashback_agents.layout.Message` (plus the tool schemas, if any). Samples are then
rendered from Messages by the same :class:`~flashback_agents.layout.Layout` the integrations use
at inference, so training sees exactly the token ids the model will see when serving.

A malformed conversation raises :class:`TranscriptError` naming ``file:line`` and the reason;
with ``skip_invalid=True`` it is skipped and counted instead. The format is documented in
``docs/formats.md``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import FlashBackError
from ..layout import (LANGCHAIN_TYPES, LLAMAINDEX_ROLES, OPENAI_ROLES, LayoutError, Message, ToolCall,
                      check_conversation)

FORMATS = ("auto", "openai", "langchain", "llamaindex")



class TranscriptError(ValueError, FlashBackError):
    """A conversation that cannot be read: ``where`` is ``file:line`` (or ``file[index]``)."""

    #: what to do about a malformed conversation (appended to the message, not to ``reason``)
    ADVICE = "fix or remove that conversation, or skip malformed ones (skip_invalid=True / --skip-invalid)"

    def __init__(self, where: str, reason: str, advice: bool = True):
        super().__init__(f"{where}: {reason}" + (f" ({self.ADVICE})" if advice else ""))
        self.where = where
        self.reason = reason


class _TranscriptFileNotFound(TranscriptError, FileNotFoundError):
    """A transcript path that does not exist (also a ``FileNotFoundError``)."""


class _Bad(ValueError, FlashBackError):
    """Internal: a reason without a location (the reader adds ``file:line``)."""


@dataclass
class Conversation:
    """One training conversation: messages in order, the tool schemas offered, where it came from."""

    messages: list[Message]
    tools: list[dict] | None = None
    source: str = ""


@dataclass
class Transcripts:
    """What a reader returns: the good conversations and the errors of the skipped ones."""

    conversations: list[Conversation] = field(default_factory=list)
    skipped: list[TranscriptError] = field(default_factory=list)

    def __iter__(self) -> Iterator[Conversation]:
        return iter(self.conversations)

    def __len__(self) -> int:
        return len(self.conversations)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


# ----------------------------------------------------------------------------- helpers

def _text_of(content: Any, what: str = "content") -> str:
    """Plain text of a message content: a string, None, or a list of text parts/blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                kind = part.get("type", part.get("block_type", "text"))
                if kind in ("text", "input_text", "output_text"):
                    parts.append(str(part.get("text", "")))
                elif kind in ("tool_call", "tool_use", "thinking", "reasoning"):
                    continue  # handled elsewhere / not rendered
                else:
                    raise _Bad(f"{what} has a {kind!r} part; only text is supported")
            else:
                raise _Bad(f"{what} part is a {type(part).__name__}, expected a string or an object")
        return "".join(parts)
    raise _Bad(f"{what} is a {type(content).__name__}, expected a string, null or a list of text parts")


def _arguments(raw: Any, name: str) -> dict[str, Any]:
    """Tool call arguments: a JSON object, or a string holding one."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _Bad(f"tool call {name!r} has arguments that are not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(raw, dict):
        raise _Bad(f"tool call {name!r} arguments must be a JSON object, got {type(raw).__name__}")
    return raw


def _openai_tool_calls(calls: Any) -> list[ToolCall]:
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise _Bad(f"tool_calls must be a list, got {type(calls).__name__}")
    out = []
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            raise _Bad(f"tool_calls[{i}] must be an object")
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not fn.get("name"):
            raise _Bad(f"tool_calls[{i}] has no function name")
        name = str(fn["name"])
        args = fn.get("arguments", fn.get("args"))
        out.append(ToolCall(name=name, arguments=_arguments(args, name), id=str(call.get("id") or "")))
    return out


def _documents(docs: Any, what: str = "documents") -> list[str]:
    if docs is None:
        return []
    if not isinstance(docs, list):
        raise _Bad(f"{what} must be a list of strings, got {type(docs).__name__}")
    out = []
    for d in docs:
        if isinstance(d, str):
            out.append(d)
        elif isinstance(d, dict) and any(isinstance(d.get(k), str) for k in ("text", "page_content", "content")):
            out.append(next(d[k] for k in ("text", "page_content", "content") if isinstance(d.get(k), str)))
        else:
            raise _Bad(f"{what} entries must be strings (or objects with a 'text'), got {type(d).__name__}")
    return out


# ----------------------------------------------------------------------------- per-format message parsers

def _openai_message(m: dict, i: int) -> Message:
    role = m.get("role")
    if role not in OPENAI_ROLES:
        raise _Bad(f"message {i} has role {role!r}; expected one of {sorted(OPENAI_ROLES)}")
    role = OPENAI_ROLES[role]
    content = _text_of(m.get("content"), f"message {i} content")
    calls = _openai_tool_calls(m.get("tool_calls")) if role == "assistant" else []
    if role == "assistant" and m.get("function_call"):
        fc = m["function_call"]
        calls.append(ToolCall(name=str(fc.get("name", "")), arguments=_arguments(fc.get("arguments"), fc.get("name"))))
    tool_call_id = m.get("tool_call_id")
    if role == "tool" and not tool_call_id and m.get("role") == "tool":
        raise _Bad(f"message {i} is a tool result without a tool_call_id")
    return Message(role=role, content=content, tool_calls=calls,
                   tool_call_id=str(tool_call_id) if tool_call_id else None,
                   name=m.get("name") if role == "tool" else None,
                   documents=_documents(m.get("documents"), f"message {i} documents"))


def _langchain_message(m: dict, i: int) -> Message:
    kind = m.get("type")
    data = m.get("data")
    if not isinstance(data, dict):
        raise _Bad(f"message {i} has no 'data' object (expected messages_to_dict output)")
    role = LANGCHAIN_TYPES.get(kind, "missing") if isinstance(kind, str) else "missing"
    if kind == "chat":
        role = OPENAI_ROLES.get(data.get("role"), "missing")
    if role == "missing" or role is None:
        raise _Bad(f"message {i} has type {kind!r}; expected one of system/human/ai/tool")
    content = _text_of(data.get("content"), f"message {i} content")
    calls: list[ToolCall] = []
    if role == "assistant":
        for j, tc in enumerate(data.get("tool_calls") or []):
            if not isinstance(tc, dict) or not tc.get("name"):
                raise _Bad(f"message {i} tool_calls[{j}] has no name")
            calls.append(ToolCall(name=str(tc["name"]), arguments=_arguments(tc.get("args"), tc["name"]),
                                  id=str(tc.get("id") or "")))
        if not calls and (data.get("additional_kwargs") or {}).get("tool_calls"):
            calls = _openai_tool_calls(data["additional_kwargs"]["tool_calls"])
    tool_call_id = data.get("tool_call_id")
    if role == "tool" and not tool_call_id and kind == "tool":
        raise _Bad(f"message {i} is a tool message without a tool_call_id")
    docs = (data.get("additional_kwargs") or {}).get("documents")
    return Message(role=role, content=content, tool_calls=calls,
                   tool_call_id=str(tool_call_id) if tool_call_id else None,
                   name=data.get("name") if role == "tool" else None,
                   documents=_documents(docs, f"message {i} documents"))


def _llamaindex_message(m: dict, i: int) -> Message:
    raw_role = m.get("role")
    role = LLAMAINDEX_ROLES.get(str(raw_role).lower()) if raw_role is not None else None
    if role is None:
        raise _Bad(f"message {i} has role {raw_role!r}; expected one of {sorted(LLAMAINDEX_ROLES)}")
    kwargs = m.get("additional_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _Bad(f"message {i} additional_kwargs must be an object")
    calls: list[ToolCall] = []
    if "blocks" in m:
        blocks = m["blocks"]
        if not isinstance(blocks, list):
            raise _Bad(f"message {i} blocks must be a list")
        content = _text_of(blocks, f"message {i} blocks")
        for b in blocks:
            if isinstance(b, dict) and b.get("block_type") == "tool_call":
                name = str(b.get("tool_name") or "")
                if not name:
                    raise _Bad(f"message {i} has a tool_call block without tool_name")
                calls.append(ToolCall(name=name, arguments=_arguments(b.get("tool_kwargs"), name),
                                      id=str(b.get("tool_call_id") or "")))
    else:
        content = _text_of(m.get("content"), f"message {i} content")
    if role == "assistant" and kwargs.get("tool_calls"):
        calls += _openai_tool_calls(kwargs["tool_calls"])
    tool_call_id = kwargs.get("tool_call_id") or m.get("tool_call_id")
    return Message(role=role, content=content, tool_calls=calls if role == "assistant" else [],
                   tool_call_id=str(tool_call_id) if tool_call_id else None,
                   name=(kwargs.get("name") or kwargs.get("tool_name")) if role == "tool" else None,
                   documents=_documents(kwargs.get("documents"), f"message {i} documents"))


_PARSERS = {"openai": _openai_message, "langchain": _langchain_message, "llamaindex": _llamaindex_message}


def detect_format(messages: Sequence[Any]) -> str:
    """Guess the format of a message list from its first message."""
    for m in messages:
        if not isinstance(m, dict):
            break
        if "type" in m and "data" in m:
            return "langchain"
        if "blocks" in m or ("additional_kwargs" in m and "role" in m):
            return "llamaindex"
        if "role" in m:
            return "openai"
        break
    raise _Bad("cannot tell the format of the messages (expected OpenAI {'role', 'content'}, "
               "LangChain {'type', 'data'} or LlamaIndex {'role', 'blocks'} objects); pass format=")


def parse_conversation(obj: Any, format: str = "auto", source: str = "") -> Conversation:
    """Turn one decoded JSON value (a message list, or an object with ``messages``) into a Conversation.

    Raises :class:`TranscriptError` located at ``source``.
    """
    try:
        conv = _parse(obj, format, source)
        _check_unicode(conv)
        return conv
    except (_Bad, LayoutError) as exc:
        raise TranscriptError(source or "<conversation>", str(exc)) from None
    except RecursionError:
        raise TranscriptError(source or "<conversation>", "the conversation is nested too deeply") from None
    except (TypeError, AttributeError, KeyError) as exc:  # a shape no reader rule foresaw: still located
        raise TranscriptError(source or "<conversation>", f"unexpected structure ({type(exc).__name__}: {exc}); "
                              "see docs/formats.md for the accepted formats") from None


def _check_unicode(conv: Conversation) -> None:
    """Text the tokenizer cannot take (a lone surrogate, e.g. from a JSON "\\ud800" escape) is a bad conversation."""
    for i, m in enumerate(conv.messages):
        texts = [m.content, *(m.documents or []), *(json.dumps(c.arguments, ensure_ascii=False) for c in m.tool_calls)]
        for t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise _Bad(f"message {i} contains a lone surrogate ({t[exc.start:exc.end]!r} at position "
                           f"{exc.start}): not valid Unicode text") from None
            except AttributeError:
                raise _Bad(f"message {i} has text that is not a string") from None


def _parse(obj: Any, format: str, source: str) -> Conversation:
    if format not in FORMATS:
        raise _Bad(f"unknown format {format!r}; use one of {FORMATS}")
    tools = None
    top_docs: Any = None
    if isinstance(obj, dict):
        if "messages" not in obj:
            raise _Bad("object has no 'messages' list")
        messages = obj["messages"]
        tools = obj.get("tools")
        top_docs = obj.get("documents")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise _Bad("'tools' must be a list of tool schema objects")
    elif isinstance(obj, list):
        messages = obj
    else:
        raise _Bad(f"expected a JSON object with 'messages' or a list of messages, got {type(obj).__name__}")
    if not isinstance(messages, list) or not messages:
        raise _Bad("'messages' must be a non-empty list")
    fmt = detect_format(messages) if format == "auto" else format
    parser = _PARSERS[fmt]
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Bad(f"message {i} is a {type(m).__name__}, expected an object")
        msgs.append(parser(m, i))
    if top_docs is not None:
        _attach_top_documents(msgs, top_docs)
    if not any(m.role == "assistant" for m in msgs):
        raise _Bad("conversation has no assistant message (nothing to train on)")
    check_conversation(msgs)
    return Conversation(messages=msgs, tools=tools or None, source=source)


def _attach_top_documents(msgs: list[Message], docs: Any) -> None:
    """Top-level ``documents``: a list with one entry (a list of strings) per user message, in order."""
    users = [m for m in msgs if m.role == "user"]
    if isinstance(docs, dict):
        for key, value in docs.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise _Bad(f"documents key {key!r} is not a message index") from None
            if not 0 <= idx < len(msgs) or msgs[idx].role != "user":
                raise _Bad(f"documents key {key!r} does not name a user message")
            msgs[idx].documents = msgs[idx].documents + _documents(value, f"documents[{key}]")
        return
    if not isinstance(docs, list):
        raise _Bad("top-level 'documents' must be a list (one list of strings per user message)")
    if len(docs) > len(users):
        raise _Bad(f"top-level 'documents' has {len(docs)} entries but the conversation has {len(users)} user messages")
    for j, (user, entry) in enumerate(zip(users, docs)):
        user.documents = user.documents + _documents(entry, f"documents[{j}]")


# ----------------------------------------------------------------------------- files

def _decode(raw: bytes) -> str | _Bad:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return _Bad(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start}); re-encode the file as UTF-8")


def _loads(text: str) -> Any | _Bad:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return _Bad(f"invalid JSON ({exc.msg}, column {exc.colno})")
    except RecursionError:
        return _Bad("invalid JSON (nested too deeply)")


def _iter_values(path: Path) -> Iterator[tuple[str, Any | _Bad]]:
    """Yield (location, decoded value or the decode error) for each conversation in a file.

    JSONL is decoded line by line (bytes, then UTF-8, then JSON), so one bad byte or line costs that
    conversation only: with ``skip_invalid`` the rest of the file is still read.
    """
    raw = path.read_bytes()
    if path.suffix.lower() == ".json":
        text = _decode(raw)
        if isinstance(text, _Bad):
            yield f"{path}", text
            return
        data = _loads(text)
        if isinstance(data, _Bad):
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                yield f"{path}:{exc.lineno}", data
                return
            except RecursionError:
                pass
            yield f"{path}", data
            return
        # One conversation (a message list or an object) or a list of conversations.
        if isinstance(data, list) and data and all(isinstance(x, (list, dict)) for x in data) and \
                any(isinstance(x, list) or (isinstance(x, dict) and "messages" in x) for x in data):
            for i, item in enumerate(data):
                yield f"{path}[{i}]", item
        else:
            yield f"{path}[0]", data
        return
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        text = _decode(line)
        yield f"{path}:{lineno}", (text if isinstance(text, _Bad) else _loads(text))


def read_transcripts(paths: str | os.PathLike | Sequence[str | os.PathLike], format: str = "auto",
                     skip_invalid: bool = False) -> Transcripts:
    """Read conversations from JSONL files (one per line), ``.json`` files, or directories of them.

    A malformed conversation raises :class:`TranscriptError` (``file:line: reason``) unless
    ``skip_invalid`` is set, in which case it is skipped and recorded in ``Transcripts.skipped``.
    """
    if format not in FORMATS:
        raise TranscriptError("<arguments>", f"unknown transcript format {format!r}; use one of {FORMATS}.",
                              advice=False)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise TranscriptError("<arguments>", "paths must be a path or a list of paths (str or Path) to .jsonl/.json "
                              "files or directories", advice=False)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in (".jsonl", ".json") and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise _TranscriptFileNotFound(str(p), "transcript file not found; pass an existing .jsonl/.json file or "
                                          "a directory of them", advice=False)
    out = Transcripts()
    for f in files:
        for where, value in _iter_values(f):
            try:
                if isinstance(value, _Bad):
                    raise TranscriptError(where, str(value))
                out.conversations.append(parse_conversation(value, format, where))
            except TranscriptError as exc:
                if not skip_invalid:
                    raise
                out.skipped.append(exc)
    return out
