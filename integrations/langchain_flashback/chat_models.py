"""ChatFlashBack: a LangChain chat model whose KV cache persists across agent steps.

Every call renders the messages in the FlashBack append layout (tool results and retrieved
documents marker-wrapped at the end) and runs on the process-wide context pool of
:class:`flashback_agents.chat.ChatEngine`, so an agent step computes only what is new since the
previous step: ``usage_metadata["input_token_details"]["cache_read"]`` says how many prompt tokens
were reused.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage,
                                     SystemMessage, ToolMessage)
from langchain_core.messages.tool import tool_call_chunk as create_tool_call_chunk
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel

from flashback_agents.chat import ChatEngine, ChatReply, normalize_tool_choice
from flashback_agents.generation import normalize_stop
from flashback_agents.layout import DOCUMENTS_KEY, LANGCHAIN_ROLES, LayoutError, Message, ToolCall

from ._params import PROVIDER, FlashBackParams
_ROLE_ALIASES = LANGCHAIN_ROLES  # ``ChatMessage.role`` -> Message role


# --------------------------------------------------------------------------- message conversion
def _content_text(message: BaseMessage) -> str:
    """Plain text of a message's content (string, or text blocks of a list)."""
    content = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict):
            kind = block.get("type")
            if kind == "text" or (kind is None and "text" in block):
                parts.append(str(block.get("text", "")))
            elif kind in ("tool_use", "tool_call", "function_call", "reasoning", "thinking"):
                continue  # calls are carried by message.tool_calls; reasoning is not replayed
            else:
                raise ValueError(f"{type(message).__name__} has a content block of type {kind!r}; "
                                 "ChatFlashBack accepts text only.")
    return "".join(parts)


def _document_text(doc: Any) -> str:
    if isinstance(doc, str):
        return doc
    for attr in ("page_content", "text"):
        value = getattr(doc, attr, None)
        if isinstance(value, str):
            return value
    if isinstance(doc, dict):
        for key in ("page_content", "text", "content"):
            if isinstance(doc.get(key), str):
                return doc[key]
    raise LayoutError(f"Cannot use a {type(doc).__name__} as a document: pass strings, LangChain Documents "
                      "or objects with a .text attribute.")


def to_flashback_messages(messages: Sequence[BaseMessage]) -> list[Message]:
    """LangChain messages -> flashback Messages (append layout). Unknown types raise ValueError."""
    out: list[Message] = []
    call_names: dict[str, str] = {}
    for i, m in enumerate(messages):
        role: str | None
        if isinstance(m, SystemMessage):
            role = "system"
        elif isinstance(m, HumanMessage):
            role = "user"
        elif isinstance(m, AIMessage):
            role = "assistant"
        elif isinstance(m, ToolMessage):
            role = "tool"
        elif isinstance(m, ChatMessage):
            role = _ROLE_ALIASES.get(m.role)
            if role is None:
                raise ValueError(f"Message {i} is a ChatMessage with role {m.role!r}, which ChatFlashBack does "
                                 f"not support; use one of {sorted(_ROLE_ALIASES)}.")
        else:
            raise ValueError(f"Message {i} is a {type(m).__name__} (type {getattr(m, 'type', '?')!r}), which "
                             "ChatFlashBack does not support; use SystemMessage, HumanMessage, AIMessage "
                             "or ToolMessage.")
        text = _content_text(m)
        if role == "system":
            if out and out[-1].role == "system" and len(out) == 1:
                out[-1].content += "\n\n" + text  # several leading system messages: one system block
                continue
            out.append(Message("system", text))
        elif role == "user":
            docs = (m.additional_kwargs or {}).get(DOCUMENTS_KEY) or []
            if not isinstance(docs, (list, tuple)):  # a str would be one document per character
                raise LayoutError(f"Message {i} additional_kwargs[{DOCUMENTS_KEY!r}] must be a list of documents, got "
                                  f"{type(docs).__name__} {docs!r:.40}; pass a list, e.g. [text] for one document.")
            out.append(Message("user", text, documents=[_document_text(d) for d in docs]))
        elif role == "assistant":
            calls = []
            for c in getattr(m, "tool_calls", None) or []:
                calls.append(ToolCall(name=c["name"], arguments=dict(c.get("args") or {}), id=c.get("id") or ""))
                if c.get("id"):
                    call_names[c["id"]] = c["name"]
            out.append(Message("assistant", text, tool_calls=calls))
        else:
            call_id = getattr(m, "tool_call_id", None)
            name = getattr(m, "name", None) or call_names.get(call_id or "")
            if getattr(m, "status", "success") == "error":
                text = f"Error: {text}"
            out.append(Message("tool", text, tool_call_id=call_id, name=name))
    return out


# --------------------------------------------------------------------------- results
def _usage(reply: ChatReply) -> dict:
    u = reply.usage
    return {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
            "total_tokens": u.input_tokens + u.output_tokens,
            "input_token_details": {"cache_read": u.cache_read}}


def _response_metadata(reply: ChatReply) -> dict:
    u = reply.usage
    return {"model_name": reply.model_name, "model_provider": PROVIDER, "finish_reason": reply.finish_reason,
            "prefill_seconds": round(u.prefill_seconds, 4), "decode_seconds": round(u.decode_seconds, 4),
            "computed_tokens": u.computed, "compacted": u.compacted, "tokens_evicted": u.tokens_evicted,
            "tokens_recomputed": u.tokens_recomputed, "cache_restored_tokens": u.cache_restored,
            "decode_forwards": u.forwards, "draft_tokens": u.drafted,
            "draft_tokens_accepted": u.accepted, "forced_tokens": u.forced,
            "repeat_calls_forbidden": u.repeat_calls_forbidden, "tokens_discarded": u.tokens_discarded}


def _lc_tool_calls(reply: ChatReply) -> list[dict]:
    return [{"name": c.name, "args": c.arguments, "id": c.id, "type": "tool_call"} for c in reply.tool_calls]


def reply_to_message(reply: ChatReply) -> AIMessage:
    return AIMessage(content=reply.text, tool_calls=_lc_tool_calls(reply), usage_metadata=_usage(reply),
                     response_metadata=_response_metadata(reply))


def _last_chunk(reply: ChatReply) -> AIMessageChunk:
    chunks = [create_tool_call_chunk(name=c.name, args=json.dumps(c.arguments, ensure_ascii=False), id=c.id,
                                     index=i) for i, c in enumerate(reply.tool_calls)]
    return AIMessageChunk(content="", tool_call_chunks=chunks, usage_metadata=_usage(reply),
                          response_metadata=_response_metadata(reply), chunk_position="last")


# --------------------------------------------------------------------------- the model
class ChatFlashBack(FlashBackParams, BaseChatModel):
    """Local chat model on a persistent, shared KV cache (FlashBack append layout).

    Weights and the context pool are shared per process, so constructing it is cheap; the model
    loads on first use. Example::

        llm = ChatFlashBack(max_tokens=128)
        llm.bind_tools([my_tool], tool_choice="any").invoke("...")
    """

    max_retries: int = 0  # accepted for API compatibility (nothing to retry locally)

    # ------------------------------------------------------------------ plumbing
    @property
    def _llm_type(self) -> str:
        return "flashback-chat"

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return False

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = PROVIDER
        params["ls_model_name"] = kwargs.get("model") or self.model
        params["ls_temperature"] = kwargs.get("temperature", self.temperature)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stop = stop if stop is not None else self.stop
        if stop:
            params["ls_stop"] = list(normalize_stop(stop))  # our error for a stop that is no string(s)
        return params

    def _engine_for(self, kwargs: dict) -> ChatEngine:
        model = kwargs.get("model") or self.model
        return self.engine if model == self.model else self._engine_for_model(model)

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict) -> tuple[ChatEngine, list[Message], dict]:
        engine = self._engine_for(kwargs)
        tools = kwargs.get("tools") or None
        response_format = kwargs.get("response_format")
        schema = None
        if response_format is not None:
            schema = response_format.get("schema") if isinstance(response_format, dict) else None
            if schema is None:
                schema = {"type": "object"}
        args = {"tools": tools, "tool_choice": kwargs.get("tool_choice"), "response_schema": schema,
                "config": self._config(stop, kwargs), "timeout": self._timeout(kwargs),
                "repeat_calls": kwargs.get("repeat_calls", self.repeat_calls)}
        return engine, to_flashback_messages(messages), args

    # ------------------------------------------------------------------ sync
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            chunks = list(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))
            full = chunks[0]
            for c in chunks[1:]:
                full += c
            msg = full.message
            return ChatResult(generations=[ChatGeneration(message=AIMessage(
                content=msg.content, tool_calls=msg.tool_calls, usage_metadata=msg.usage_metadata,
                response_metadata=msg.response_metadata))])
        engine, msgs, args = self._request(messages, stop, kwargs)
        reply = engine.chat(msgs, **args)
        return ChatResult(generations=[ChatGeneration(message=reply_to_message(reply))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        engine, msgs, args = self._request(messages, stop, kwargs)
        run = engine.stream_chat(msgs, **args)
        for delta in run:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        assert run.reply is not None
        yield ChatGenerationChunk(message=_last_chunk(run.reply))

    # ------------------------------------------------------------------ async (never blocks the loop)
    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            full = None
            async for c in self._astream(messages, stop=stop, run_manager=run_manager, **kwargs):
                full = c if full is None else full + c
            assert full is not None
            msg = full.message
            return ChatResult(generations=[ChatGeneration(message=AIMessage(
                content=msg.content, tool_calls=msg.tool_calls, usage_metadata=msg.usage_metadata,
                response_metadata=msg.response_metadata))])
        engine, msgs, args = self._request(messages, stop, kwargs)
        reply = await engine.achat(msgs, **args)
        return ChatResult(generations=[ChatGeneration(message=reply_to_message(reply))])

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        engine, msgs, args = self._request(messages, stop, kwargs)
        run = engine.astream_chat(msgs, **args)
        async for delta in run:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        assert run.reply is not None
        yield ChatGenerationChunk(message=_last_chunk(run.reply))

    # ------------------------------------------------------------------ tools
    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: dict | str | bool | None = None, strict: bool | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; ``tool_choice="any"``/"required"/a name makes decoding produce a valid call, ``"none"``
        keeps the tools in the prompt but makes a call impossible (decoding masks the call's opening)."""
        if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
            raise LayoutError(f"bind_tools expects a list of tools (functions, BaseTool, pydantic classes or "
                              f"OpenAI tool dicts), got {type(tools).__name__}.")
        bad = [t for t in tools if isinstance(t, (str, bytes, int, float)) or t is None]
        if bad:
            raise LayoutError(f"bind_tools: {bad[0]!r:.60} is not a tool; pass the function (or a BaseTool / "
                              "pydantic class / OpenAI tool dict), not its name.")
        formatted = [convert_to_openai_tool(t, strict=strict) for t in tools]
        if tool_choice is not None and tool_choice != "auto":
            choice = normalize_tool_choice(tool_choice, formatted)  # validates names now, not at call time
            tool_choice = choice
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: dict | type, *, include_raw: bool = False,
                               method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
                               strict: bool | None = None, **kwargs: Any) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Structured output, always valid: decoding is constrained to the schema (xgrammar).

        ``function_calling`` forces a call of a tool built from the schema; ``json_schema`` (and
        ``json_mode``, which uses the schema too when one is given) constrains the text to JSON.
        """
        if kwargs:
            raise ValueError(f"Unsupported arguments {sorted(kwargs)}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        if method == "function_calling":
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format={
                "kwargs": {"method": method, "strict": strict}, "schema": tool})
            parser: Runnable = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        elif method in ("json_schema", "json_mode"):
            if schema is None and method == "json_schema":
                raise ValueError("method='json_schema' needs a schema.")
            json_schema = convert_to_json_schema(schema) if schema is not None else {"type": "object"}
            fmt = {"type": "json_schema", "schema": json_schema}
            llm = self.bind(response_format=fmt, ls_structured_output_format={
                "kwargs": {"method": method, "strict": strict}, "schema": schema})
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"Unknown method {method!r}; use 'function_calling', 'json_schema' or 'json_mode'.")
        if include_raw:
            parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
            fallback = RunnablePassthrough.assign(parsed=lambda _: None)
            return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")
        return llm | parser
