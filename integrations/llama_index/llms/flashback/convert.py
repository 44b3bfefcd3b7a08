"""Conversions between LlamaIndex and flashback-agents: ``ChatMessage`` lists to :class:`Message` lists,
a :class:`ChatReply` back to a ``ChatMessage`` with ``ToolCallBlock``s, usage as OpenAI-style dicts,
LlamaIndex tools to OpenAI-style tool dicts, and the prompt check of the completion calls.

:class:`~llama_index.llms.flashback.base.FlashBack` uses these; ``to_flashback_messages`` and
``usage_dict`` are public (re-exported by the package).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from llama_index.core.base.llms.types import ChatMessage, MessageRole, TextBlock, ToolCallBlock

from flashback_agents.chat import ChatReply
from flashback_agents.layout import DOCUMENTS_KEY, LLAMAINDEX_ROLES, LayoutError, Message, ToolCall

__all__ = ["DOCUMENTS_KEY", "to_flashback_messages", "usage_dict", "raw_dict", "reply_message", "check_prompt",
           "tool_spec", "tool_calls_of"]

_ROLE_MAP = LLAMAINDEX_ROLES  # ``ChatMessage.role`` -> Message role


def _text_of(message: ChatMessage) -> str:
    """Text of a message; non-text content (images, audio, ...) is a clear error."""
    parts: list[str] = []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            parts.append(block.text)
        elif isinstance(block, ToolCallBlock):
            continue
        elif getattr(block, "block_type", "") in ("thinking", "cache"):
            continue
        else:
            raise ValueError(f"FlashBackLLM handles text only; got a {type(block).__name__} in a "
                             f"{message.role.value} message.")
    return "\n".join(parts)


def _json_args(args: Any) -> dict:
    if isinstance(args, dict):
        return args
    if isinstance(args, str):
        try:
            value = json.loads(args) if args.strip() else {}
        except ValueError:
            return {"input": args}
        return value if isinstance(value, dict) else {"input": value}
    return {}


def tool_calls_of(message: ChatMessage) -> list[ToolCall]:
    """Tool calls of an assistant message: ToolCallBlocks, else OpenAI-style ``additional_kwargs``."""
    calls = [ToolCall(name=b.tool_name, arguments=_json_args(b.tool_kwargs), id=b.tool_call_id or "")
             for b in message.blocks if isinstance(b, ToolCallBlock)]
    if calls:
        return calls
    for raw in message.additional_kwargs.get("tool_calls") or []:
        if not isinstance(raw, dict):
            raw = raw.model_dump() if hasattr(raw, "model_dump") else vars(raw)
        fn = raw.get("function", raw)
        if not isinstance(fn, dict):
            fn = fn.model_dump() if hasattr(fn, "model_dump") else vars(fn)
        name = fn.get("name") or raw.get("tool_name")
        if name:
            args = fn.get("arguments", raw.get("tool_kwargs", {}))
            calls.append(ToolCall(name=str(name), arguments=_json_args(args), id=str(raw.get("id") or "")))
    return calls


def to_flashback_messages(messages: Sequence[ChatMessage]) -> list[Message]:
    """Convert LlamaIndex chat messages to flashback_agents messages.

    - Leading system messages are merged into one (LlamaIndex may add ``system_prompt`` in front of
      a template's own system message); a later system message becomes a user turn.
    - ``additional_kwargs["documents"]`` on a user message become ``Message.documents`` (appended
      after the question, each marked).
    - A tool result whose call id no assistant message made (e.g. memory truncated the call) keeps
      its content but drops the id, instead of failing.
    """
    out: list[Message] = []
    seen_ids: set[str] = set()
    for i, msg in enumerate(messages):
        if not isinstance(msg, ChatMessage):
            raise TypeError(f"Message {i} is a {type(msg).__name__}, not a llama_index ChatMessage.")
        role_name = msg.role.value if isinstance(msg.role, MessageRole) else str(msg.role)
        role = _ROLE_MAP.get(role_name)
        if role is None:
            raise ValueError(f"Message {i} has role {role_name!r}, which FlashBackLLM cannot render; "
                             f"use one of {sorted(_ROLE_MAP)}.")
        text = _text_of(msg)
        kw = msg.additional_kwargs or {}
        if role == "system":
            if out and all(m.role == "system" for m in out):
                out[0].content = f"{out[0].content}\n\n{text}" if out[0].content else text
                continue
            if out:
                role = "user"
        if role == "assistant":
            calls = tool_calls_of(msg)
            seen_ids.update(c.id for c in calls if c.id)
            out.append(Message("assistant", text, tool_calls=calls))
        elif role == "tool":
            call_id = kw.get("tool_call_id") or None
            if call_id is not None and call_id not in seen_ids:
                call_id = None
            out.append(Message("tool", text, tool_call_id=call_id, name=kw.get("name") or None))
        elif role == "user":
            docs = kw.get(DOCUMENTS_KEY) or []
            if isinstance(docs, str):
                docs = [docs]
            if not isinstance(docs, (list, tuple)):
                raise LayoutError(f"Message {i} additional_kwargs[{DOCUMENTS_KEY!r}] must be a list of texts, got "
                                  f"{type(docs).__name__} {docs!r:.40}; pass e.g. [text] for one document.")
            out.append(Message("user", text, documents=[str(d) for d in docs if str(d).strip()]))
        else:
            out.append(Message("system", text))
    return out


def usage_dict(reply: ChatReply) -> dict:
    """OpenAI-style usage (what LlamaIndex's TokenCountingHandler reads) plus cache accounting."""
    u = reply.usage
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "cached_tokens": u.cache_read,
        "computed_tokens": u.computed,
        "prompt_tokens_details": {"cached_tokens": u.cache_read},
        "prefill_seconds": u.prefill_seconds,
        "decode_seconds": u.decode_seconds,
        "compacted": u.compacted,
        "tokens_evicted": u.tokens_evicted,
        "tokens_recomputed": u.tokens_recomputed,
        "cache_restored": u.cache_restored,
        "decode_forwards": u.forwards,
        "draft_tokens": u.drafted,
        "draft_tokens_accepted": u.accepted,
        "forced_tokens": u.forced,
        "repeat_calls_forbidden": u.repeat_calls_forbidden,
        "tokens_discarded": u.tokens_discarded,
    }


def raw_dict(reply: ChatReply) -> dict:
    return {"usage": usage_dict(reply), "finish_reason": reply.finish_reason, "model": reply.model_name,
            "raw_text": reply.raw_text, "output_ids": list(reply.token_ids)}


def reply_message(reply: ChatReply) -> ChatMessage:
    blocks: list[Any] = []
    if reply.text or not reply.tool_calls:
        blocks.append(TextBlock(text=reply.text))
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments)
               for c in reply.tool_calls]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)


class _PromptTypeError(LayoutError, TypeError):
    """A completion prompt that is not a string (our LayoutError; a TypeError too)."""


def check_prompt(prompt: Any) -> None:
    """complete() and friends take the prompt as text: None or a number is refused, not rendered as 'None'."""
    if not isinstance(prompt, str):
        raise _PromptTypeError(f"The prompt must be a string, got {type(prompt).__name__} {prompt!r:.40}; pass the "
                               "text to complete, e.g. llm.complete('Hello'), or use chat() for messages.")


class _ToolTypeError(LayoutError, TypeError):
    """A tool that is not a LlamaIndex tool nor a tool dict (our LayoutError; a TypeError too)."""


def tool_spec(tool: Any) -> dict:
    """An OpenAI-style tool dict from a LlamaIndex tool (or an already built dict)."""
    if isinstance(tool, dict):
        return tool
    metadata = getattr(tool, "metadata", None)
    if metadata is None or not hasattr(metadata, "to_openai_tool"):
        raise _ToolTypeError(f"Expected a LlamaIndex tool (e.g. FunctionTool.from_defaults(fn)) or an OpenAI-style "
                             f"tool dict, got {type(tool).__name__} {tool!r:.60}.")
    return metadata.to_openai_tool(skip_length_check=True)
