"""FlashBack: a LlamaIndex ``FunctionCallingLLM`` on a persistent, KV-cached local model.

Every call goes through :class:`flashback_agents.chat.ChatEngine` (the same code path as the
LangChain integration): messages are rendered one at a time in the FlashBack append layout, run on
the process-wide context pool (only tokens that are not already cached are computed), and the ids
of each reply are remembered so that an agent's next step is a pure append.

Retrieved documents ride on a user message as ``additional_kwargs["documents"]`` (a list of
strings): they are rendered after the question, each between ``<MARK_L>`` and ``<MARK_R>``, so the
question stays cached while evidence is appended. The prompt templates in
:mod:`llama_index.llms.flashback.templates` produce such messages.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, AsyncGenerator, Dict, Generator, List, Optional, Sequence, Union

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from flashback_agents.chat import DEFAULT_REPEAT_CALLS, ChatEngine, ChatReply
from flashback_agents.engines import shared_engine
from flashback_agents.generation import SETTING_EXAMPLES, GenerationConfig, check_field, normalize_stop
from flashback_agents.layout import LayoutError, Message, ToolCall
from flashback_agents.models import DEFAULT_ADAPTER, DEFAULT_MODEL, LoadedModel

DOCUMENTS_KEY = "documents"
"""``ChatMessage.additional_kwargs`` key: retrieved texts appended (marked) after a user message."""

_ROLE_MAP = {
    "system": "system", "developer": "system",
    "user": "user",
    "assistant": "assistant", "chatbot": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool",
}


# ---------------------------------------------------------------------------- conversion
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


def _tool_calls_of(message: ChatMessage) -> list[ToolCall]:
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
            calls = _tool_calls_of(msg)
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


def _raw(reply: ChatReply) -> dict:
    return {"usage": usage_dict(reply), "finish_reason": reply.finish_reason, "model": reply.model_name,
            "raw_text": reply.raw_text, "output_ids": list(reply.token_ids)}


def _reply_message(reply: ChatReply) -> ChatMessage:
    blocks: list[Any] = []
    if reply.text or not reply.tool_calls:
        blocks.append(TextBlock(text=reply.text))
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments)
               for c in reply.tool_calls]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)


class _PromptTypeError(LayoutError, TypeError):
    """A completion prompt that is not a string (our LayoutError; a TypeError too)."""


def _check_prompt(prompt: Any) -> None:
    """complete() and friends take the prompt as text: None or a number is refused, not rendered as 'None'."""
    if not isinstance(prompt, str):
        raise _PromptTypeError(f"The prompt must be a string, got {type(prompt).__name__} {prompt!r:.40}; pass the "
                               "text to complete, e.g. llm.complete('Hello'), or use chat() for messages.")


class _ToolTypeError(LayoutError, TypeError):
    """A tool that is not a LlamaIndex tool nor a tool dict (our LayoutError; a TypeError too)."""


def _tool_spec(tool: Any) -> dict:
    """An OpenAI-style tool dict from a LlamaIndex tool (or an already built dict)."""
    if isinstance(tool, dict):
        return tool
    metadata = getattr(tool, "metadata", None)
    if metadata is None or not hasattr(metadata, "to_openai_tool"):
        raise _ToolTypeError(f"Expected a LlamaIndex tool (e.g. FunctionTool.from_defaults(fn)) or an OpenAI-style "
                             f"tool dict, got {type(tool).__name__} {tool!r:.60}.")
    return metadata.to_openai_tool(skip_length_check=True)


# ---------------------------------------------------------------------------- the LLM
class FlashBack(FunctionCallingLLM):
    """A local chat model whose KV cache persists across calls (FlashBack append layout).

    Named like the ecosystem's LLMs (``llama_index.llms.ollama.Ollama``); ``FlashBackLLM`` is its
    deprecated former name.

    Example::

        from llama_index.llms.flashback import FlashBack
        llm = FlashBack()                         # SmolLM2-135M-Instruct, offline
        llm.chat([ChatMessage(role="user", content="Hi")]).raw["usage"]
        # {'prompt_tokens': 25, 'completion_tokens': 9, 'cached_tokens': 0, 'computed_tokens': 25, ...}
    """

    model: str = Field(default=DEFAULT_MODEL, description="Model spec: the default model, a HF id, a "
                       "local directory or a .gguf file (or pass an already loaded LoadedModel).")
    adapter: Optional[str] = Field(default=DEFAULT_ADAPTER, description="FlashBack adapter: 'auto' (the default: "
                                   "the one shipped for the model, if any), None (no adapter) or the directory of a trained one.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy.")
    max_tokens: int = Field(default=256, ge=0, description="max_new_tokens per reply.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(default=None, description="Seed for sampling (temperature > 0).")
    stop: Union[str, List[str]] = Field(default_factory=list, description="Stop strings (a str is one stop string).")
    timeout: Optional[float] = Field(default=None, description="Seconds a call waits for a free cached context "
                                     "(or the server's reply) before raising PoolTimeoutError / ServerStreamError; "
                                     "None: the engine's default (300 s).")
    max_cached_bytes: Optional[int] = Field(default=None, description="Byte budget of the shared context "
                                            "pool (default 2 GiB).")
    max_context_tokens: Optional[int] = Field(default=None, description="Cap on tokens per context "
                                              "(default: the model's window).")
    on_overflow: str = Field(default="evict", description="When the context would exceed max_context_tokens: "
                             "'evict' the oldest tool results/documents into stubs, 'shift' (experimental) or "
                             "'error'.")
    min_tokens: int = Field(default=0, ge=0, description="EOS masked until this many tokens are generated.")
    kv_store_dir: Optional[Union[str, Path]] = Field(default=None, description="Directory of the disk KV tier: contexts "
                                        "evicted from memory (or left at exit) are saved there and restored "
                                        "instead of recomputed, also by the next process.")
    kv_store_max_bytes: Optional[int] = Field(default=None, description="Byte budget of kv_store_dir (LRU; "
                                              "default 16 GiB).")
    chat_template: Optional[str] = Field(default=None, description="A Jinja chat template replacing the model's "
                                         "own (for a base model without one, which is otherwise rendered with a "
                                         "fallback and a ChatTemplateWarning).")
    speculate: Optional[bool] = Field(default=None, description="Prompt-lookup speculative decoding (exact: the "
                                      "output equals plain decoding's); None: on for greedy decoding.")
    draft_tokens: int = Field(default=8, ge=1, le=64, description="Most draft tokens verified per forward.")
    jump_forward: bool = Field(default=True, description="Grammar jump-forward on constrained replies (required "
                               "tool calls, response_schema): forced text runs in one forward (exact).")
    tool_choice: Optional[str] = Field(default=None, description="Default tool choice of chat(..., tools=...) calls "
                                       "that say nothing else: None/'auto', 'none', 'required' or a tool name. "
                                       "chat_with_tools (and so agents) follows FunctionCallingLLM's protocol: "
                                       "tool_required decides per call, so only 'none' (or 'auto') applies there "
                                       "and a FunctionAgent can always end with a text reply.")
    repeat_calls: str = Field(default=DEFAULT_REPEAT_CALLS, description="Loop guard: 'forbid' makes the model answer "
                              "in text instead of repeating a tool call (same name and arguments) already answered "
                              "in the conversation; 'allow' returns it as written. When it acts, "
                              "raw['usage']['repeat_calls_forbidden'] counts the calls.")

    _engine: ChatEngine = PrivateAttr()

    # A wrong type is our SettingTypeError (a FlashBackError) saying what to pass, not pydantic's bare
    # ValidationError; ranges stay the fields' own constraints.
    @field_validator(*SETTING_EXAMPLES, mode="before")
    @classmethod
    def _number_fields(cls, value: Any, info: Any) -> Any:
        return check_field(info.field_name, value, cls.model_fields[info.field_name].annotation)

    def __init__(self, model: Union[str, LoadedModel] = DEFAULT_MODEL, **kwargs: Any) -> None:
        lm = model if isinstance(model, LoadedModel) else None
        super().__init__(model=lm.name if lm is not None else model, **kwargs)
        self._engine = shared_engine(lm if lm is not None else self.model, adapter=self.adapter,
                                     max_cached_bytes=self.max_cached_bytes,
                                     max_context_tokens=self.max_context_tokens,
                                     on_overflow=self.on_overflow, kv_store_dir=self.kv_store_dir,
                                     kv_store_max_bytes=self.kv_store_max_bytes, chat_template=self.chat_template,
                                     timeout=self.timeout)

    @classmethod
    def class_name(cls) -> str:
        return "FlashBackLLM"

    @property
    def engine(self) -> ChatEngine:
        """The shared chat engine (weights, context pool, layout) this LLM runs on."""
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self._engine.max_context_tokens,
            num_output=self.max_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self._engine.model_name,
        )

    # ------------------------------------------------------------------ helpers
    def _config(self, kwargs: Dict[str, Any]) -> GenerationConfig:
        """Generation settings: the fields, overridable per call (max_tokens, temperature, ...)."""
        stop = kwargs.pop("stop", None)
        return GenerationConfig(
            max_new_tokens=check_field("max_tokens", kwargs.pop("max_tokens", kwargs.pop("max_new_tokens",
                                                                                          self.max_tokens))),
            min_new_tokens=check_field("min_tokens", kwargs.pop("min_tokens", self.min_tokens)),
            temperature=check_field("temperature", kwargs.pop("temperature", self.temperature)),
            top_p=check_field("top_p", kwargs.pop("top_p", self.top_p)),
            seed=kwargs.pop("seed", self.seed),
            stop=normalize_stop(stop if stop is not None else self.stop),
            speculate=kwargs.pop("speculate", self.speculate),
            draft_tokens=kwargs.pop("draft_tokens", self.draft_tokens),
            jump_forward=kwargs.pop("jump_forward", self.jump_forward),
        )

    def _chat_args(self, messages: Sequence[ChatMessage], kwargs: Dict[str, Any]) -> tuple[list[Message], dict]:
        kwargs = dict(kwargs)
        config = self._config(kwargs)
        tools = [_tool_spec(t) for t in (kwargs.pop("tools", None) or [])]
        tool_choice = kwargs.pop("tool_choice", None)
        tool_required = kwargs.pop("tool_required", None)
        if tool_choice is None and tools:
            tool_choice = self._default_tool_choice(tool_required)
        if not tools and tool_choice in ("auto", "none"):
            tool_choice = None
        schema = kwargs.pop("response_schema", None)
        timeout = kwargs.pop("timeout", self.timeout)
        repeat_calls = kwargs.pop("repeat_calls", self.repeat_calls)
        # Framework kwargs we accept and ignore (they have no meaning for a local model).
        for key in ("allow_parallel_tool_calls", "verbose", "strict", "formatted"):
            kwargs.pop(key, None)
        if kwargs:
            raise TypeError(f"FlashBackLLM got unexpected arguments: {sorted(kwargs)}")
        fb = to_flashback_messages(messages)
        return fb, {"tools": tools or None, "tool_choice": tool_choice, "response_schema": schema,
                    "config": config, "timeout": timeout, "repeat_calls": repeat_calls}

    def _default_tool_choice(self, tool_required: Optional[bool]) -> Optional[str]:
        """The tool choice of a call with tools that names none: ``tool_required`` decides when given
        (FunctionCallingLLM's protocol: True -> "required", False -> a call is optional, unless the
        field says "none"); without it, the field ``tool_choice``."""
        if tool_required is None:
            return self.tool_choice
        if tool_required:
            return "required"
        return "none" if self.tool_choice == "none" else "auto"

    def render_ids(self, messages: Sequence[ChatMessage], **kwargs: Any) -> list[int]:
        """Token ids a chat call with these messages would run on (for inspection and tests)."""
        fb, args = self._chat_args(messages, kwargs)
        return self._engine.layout.render(fb, tools=args["tools"])

    # ------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        fb, args = self._chat_args(messages, kwargs)
        reply = self._engine.chat(fb, **args)
        return ChatResponse(message=_reply_message(reply), raw=_raw(reply))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        fb, args = self._chat_args(messages, kwargs)
        run = self._engine.stream_chat(fb, **args)  # errors raise here, before any compute

        def gen() -> Generator[ChatResponse, None, None]:
            text = ""
            for delta in run:
                text += delta
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
            assert run.reply is not None
            yield ChatResponse(message=_reply_message(run.reply), delta="", raw=_raw(run.reply))

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        fb, args = self._chat_args(messages, kwargs)
        reply = await self._engine.achat(fb, **args)
        return ChatResponse(message=_reply_message(reply), raw=_raw(reply))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        fb, args = self._chat_args(messages, kwargs)
        run = self._engine.astream_chat(fb, **args)

        async def gen() -> AsyncGenerator[ChatResponse, None]:
            text = ""
            async for delta in run:
                text += delta
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
            assert run.reply is not None
            yield ChatResponse(message=_reply_message(run.reply), delta="", raw=_raw(run.reply))

        return gen()

    # ------------------------------------------------------------------ completion
    # A chat model: ``complete(prompt)`` sends the prompt as one user message (with ``system_prompt``).
    # ``formatted=True`` means the prompt is already in the model's own format: it is completed as
    # raw text, with no chat template.
    def _completion_messages(self, prompt: str) -> list[ChatMessage]:
        return self._extend_messages([ChatMessage(role=MessageRole.USER, content=prompt)])

    @staticmethod
    def _completion(reply: ChatReply, delta: Optional[str] = None, text: Optional[str] = None) -> CompletionResponse:
        return CompletionResponse(text=reply.text if text is None else text, raw=_raw(reply), delta=delta)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        _check_prompt(prompt)
        if formatted:
            reply = self._engine.complete(prompt, self._config(dict(kwargs)),
                                      timeout=kwargs.get("timeout", self.timeout))
            return self._completion(reply)
        fb, args = self._chat_args(self._completion_messages(prompt), kwargs)
        return self._completion(self._engine.chat(fb, **args))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        _check_prompt(prompt)
        if formatted:
            run = self._engine.stream_complete(prompt, self._config(dict(kwargs)),
                                      timeout=kwargs.get("timeout", self.timeout))
        else:
            fb, args = self._chat_args(self._completion_messages(prompt), kwargs)
            run = self._engine.stream_chat(fb, **args)

        def gen() -> Generator[CompletionResponse, None, None]:
            text = ""
            for delta in run:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            assert run.reply is not None
            yield self._completion(run.reply, delta="")

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        _check_prompt(prompt)
        if formatted:
            reply = await self._engine.acomplete(prompt, self._config(dict(kwargs)),
                                      timeout=kwargs.get("timeout", self.timeout))
            return self._completion(reply)
        fb, args = self._chat_args(self._completion_messages(prompt), kwargs)
        return self._completion(await self._engine.achat(fb, **args))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        _check_prompt(prompt)
        if formatted:
            run = self._engine.astream_complete(prompt, self._config(dict(kwargs)),
                                      timeout=kwargs.get("timeout", self.timeout))
        else:
            fb, args = self._chat_args(self._completion_messages(prompt), kwargs)
            run = self._engine.astream_chat(fb, **args)

        async def gen() -> AsyncGenerator[CompletionResponse, None]:
            text = ""
            async for delta in run:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            assert run.reply is not None
            yield self._completion(run.reply, delta="")

        return gen()

    # ------------------------------------------------------------------ tools
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: Optional[Union[str, ChatMessage]] = None,
        chat_history: Optional[List[ChatMessage]] = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: Optional[Union[str, dict]] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        """Messages + OpenAI-style tool specs, following FunctionCallingLLM's protocol: an explicit
        ``tool_choice`` wins, else ``tool_required`` decides per call (True: the reply is constrained to a
        valid call; False: a call is optional, so an agent can end with text, even where the field
        ``tool_choice`` is "required" or a name; a field "none" still applies)."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg)
                            if isinstance(user_msg, str) else user_msg)
        specs = [_tool_spec(t) for t in tools]
        if tool_choice is None:
            tool_choice = self._default_tool_choice(bool(tool_required)) if specs else None
        return {"messages": messages, "tools": specs or None, "tool_choice": tool_choice, **kwargs}

    def _validate_chat_with_tools_response(self, response: ChatResponse, tools: Sequence[Any],
                                           allow_parallel_tool_calls: bool = False, **kwargs: Any) -> ChatResponse:
        """Keep only the first tool call unless parallel calls are allowed."""
        if not allow_parallel_tool_calls:
            calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
            if len(calls) > 1:
                response.message.blocks = [b for b in response.message.blocks
                                           if not isinstance(b, ToolCallBlock)] + calls[:1]
        return response

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> List[ToolSelection]:
        calls = _tool_calls_of(response.message)
        if not calls:
            if error_on_no_tool_call:
                raise ValueError(f"Expected at least one tool call, but the model replied: "
                                 f"{(response.message.content or '')[:200]!r}")
            return []
        return [ToolSelection(tool_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in calls]


class FlashBackLLM(FlashBack):
    """Deprecated name of :class:`FlashBack` (kept for one release): constructing it warns."""

    def __init__(self, model: Union[str, LoadedModel] = DEFAULT_MODEL, **kwargs: Any) -> None:
        warnings.warn("llama_index.llms.flashback.FlashBackLLM is deprecated and will be removed in the next "
                      "release; use llama_index.llms.flashback.FlashBack (same arguments).",
                      DeprecationWarning, stacklevel=2)
        super().__init__(model, **kwargs)
