"""Checks of a chat call's inputs, before any compute: messages, tools, tool choice, repeat_calls, settings.

Every check raises the package's own error (:class:`~flashback_agents.layout.LayoutError`,
:class:`~flashback_agents.toolformat.ConstraintError`,
:class:`~flashback_agents.generation.GenerationConfigError`) saying what to pass, so a bad input never
reaches the tokenizer, the JSON encoder or the model. :class:`~flashback_agents.chat.ChatEngine` runs
them when it plans a call; the integrations run :func:`normalize_tool_choice` when tools are bound.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any, Sequence

from .contextbase import invalid_unicode
from .generation import GenerationConfig, GenerationConfigError
from .layout import LayoutError, Message
from .toolformat import ConstraintError, ToolCall, tool_name

__all__ = ["REPEAT_CALLS", "DEFAULT_REPEAT_CALLS", "normalize_tool_choice", "check_repeat_calls", "check_messages",
           "check_tools", "check_text", "json_text", "config_copy", "check_timeout"]

#: what the repeat-call guard may do: ``"allow"`` (a repeated call is returned as the model wrote it) or
#: ``"forbid"`` (a call with exactly the name and arguments of a call already answered in the
#: conversation is forbidden: the engine decodes again with calls masked, so the model answers in text)
REPEAT_CALLS = ("allow", "forbid")
#: the default of ``repeat_calls`` everywhere (ChatEngine calls, ChatFlashBack, LlamaIndex FlashBack)
DEFAULT_REPEAT_CALLS = "forbid"


def normalize_tool_choice(tool_choice: Any, tools: Sequence[dict] | None) -> str | None:
    """Map a tool choice to None (free), "none", "any" (some tool required) or a tool name."""
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
    if value is None:
        return DEFAULT_REPEAT_CALLS
    if not isinstance(value, str) or value not in REPEAT_CALLS:
        raise ConstraintError(f"repeat_calls must be one of {list(REPEAT_CALLS)}, got {value!r}: 'forbid' makes the "
                              "model answer in text instead of repeating a call already answered in the "
                              "conversation, 'allow' returns such a call as written.")
    return value


def json_text(value: Any, what: str, error: type[Exception]) -> str:
    """``value`` as JSON text, or ``error`` saying what in it is not JSON (a set, NaN, a lone surrogate)."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True)
        text.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise error(f"{what} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); use only dicts, lists, "
                    "str, numbers (finite), bools and None; convert sets and tuples to lists.") from exc
    return text


def check_text(value: Any, what: str) -> None:
    if not isinstance(value, str):
        raise LayoutError(f"{what} must be a str, got {type(value).__name__}.")
    problem = invalid_unicode(value)
    if problem is not None:
        raise LayoutError(f"{what} {problem}")


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
        check_text(m.content, f"Message {i} content")
        for attr in ("name", "tool_call_id"):
            if getattr(m, attr) is not None:
                check_text(getattr(m, attr), f"Message {i} {attr}")
        if not isinstance(m.documents, (list, tuple)):
            raise LayoutError(f"Message {i} documents must be a list of str.")
        for j, d in enumerate(m.documents):
            check_text(d, f"Message {i} document {j}")
        if not isinstance(m.tool_calls, (list, tuple)):
            raise LayoutError(f"Message {i} tool_calls must be a list of ToolCall.")
        for j, c in enumerate(m.tool_calls):
            if not isinstance(c, ToolCall):
                raise LayoutError(f"Message {i} tool call {j} is a {type(c).__name__}, not a ToolCall; build "
                                  "ToolCall(name, arguments_dict, id).")
            check_text(c.name, f"Message {i} tool call {j} name")
            if not isinstance(c.arguments, dict):
                raise LayoutError(f"Message {i} tool call {j} arguments must be a dict, got "
                                  f"{type(c.arguments).__name__}.")
            json_text(c.arguments, f"Message {i} tool call {j} arguments", LayoutError)


def check_tools(tools: Any) -> list[dict]:
    """Tools as a list of OpenAI-style dicts whose schemas are JSON, or a :class:`ConstraintError`."""
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
        json_text(t, f"Tool {name!r}", ConstraintError)
    return list(tools)


def config_copy(config: Any) -> GenerationConfig:
    """A validated copy of ``config`` (None: the defaults): a call never changes the caller's settings."""
    if config is None:
        config = GenerationConfig()
    elif not isinstance(config, GenerationConfig):
        raise GenerationConfigError(f"config must be a GenerationConfig, got {type(config).__name__}.")
    config = replace(config)
    config.validate()
    return config


def check_timeout(timeout: Any) -> float | None:
    """Seconds to wait for a free context, as a float (None: the engine's own limit)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
        raise GenerationConfigError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}.")
    return float(timeout)
