"""FlashBack: a LlamaIndex ``FunctionCallingLLM`` on a persistent, KV-cached local model.

Every call goes through :class:`flashback_agents.chat.ChatEngine` (the same code path as the
LangChain integration): messages are rendered one at a time in the FlashBack append layout, run on
the process-wide context pool (only tokens that are not already cached are computed), and the ids
of each reply are remembered so that an agent's next step is a pure append.

Retrieved documents ride on a user message as ``additional_kwargs["documents"]`` (a list of
strings): they are rendered after the question, each between ``<MARK_L>`` and ``<MARK_R>``, so the
question stays cached while evidence is appended. The prompt templates in
:mod:`llama_index.llms.flashback.templates` produce such messages. The conversions between the two
message models live in :mod:`llama_index.llms.flashback.convert`.
"""

from __future__ import annotations

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
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_validator
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from flashback_agents.chat import DEFAULT_REPEAT_CALLS, ChatEngine, ChatReply
from flashback_agents.engines import EngineSettings, engine_for
from flashback_agents.generation import SETTING_EXAMPLES, GenerationConfig, check_field, normalize_stop
from flashback_agents.layout import Message
from flashback_agents.models import DEFAULT_ADAPTER, DEFAULT_MODEL, LoadedModel
from llama_index.llms.flashback.convert import (DOCUMENTS_KEY, check_prompt, raw_dict, reply_message,  # noqa: F401
                                                to_flashback_messages, tool_calls_of, tool_spec, usage_dict)


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
        self._engine = engine_for(EngineSettings.from_fields(self, model=lm if lm is not None else self.model))

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
        tools = [tool_spec(t) for t in (kwargs.pop("tools", None) or [])]
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
        return ChatResponse(message=reply_message(reply), raw=raw_dict(reply))

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
            yield ChatResponse(message=reply_message(run.reply), delta="", raw=raw_dict(run.reply))

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        fb, args = self._chat_args(messages, kwargs)
        reply = await self._engine.achat(fb, **args)
        return ChatResponse(message=reply_message(reply), raw=raw_dict(reply))

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
            yield ChatResponse(message=reply_message(run.reply), delta="", raw=raw_dict(run.reply))

        return gen()

    # ------------------------------------------------------------------ completion
    # A chat model: ``complete(prompt)`` sends the prompt as one user message (with ``system_prompt``).
    # ``formatted=True`` means the prompt is already in the model's own format: it is completed as
    # raw text, with no chat template.
    def _completion_messages(self, prompt: str) -> list[ChatMessage]:
        return self._extend_messages([ChatMessage(role=MessageRole.USER, content=prompt)])

    @staticmethod
    def _completion(reply: ChatReply, delta: Optional[str] = None, text: Optional[str] = None) -> CompletionResponse:
        return CompletionResponse(text=reply.text if text is None else text, raw=raw_dict(reply), delta=delta)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        check_prompt(prompt)
        if formatted:
            reply = self._engine.complete(prompt, self._config(dict(kwargs)),
                                      timeout=kwargs.get("timeout", self.timeout))
            return self._completion(reply)
        fb, args = self._chat_args(self._completion_messages(prompt), kwargs)
        return self._completion(self._engine.chat(fb, **args))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        check_prompt(prompt)
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
        check_prompt(prompt)
        if formatted:
            reply = await self._engine.acomplete(prompt, self._config(dict(kwargs)),
                                      timeout=kwargs.get("timeout", self.timeout))
            return self._completion(reply)
        fb, args = self._chat_args(self._completion_messages(prompt), kwargs)
        return self._completion(await self._engine.achat(fb, **args))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        check_prompt(prompt)
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
        specs = [tool_spec(t) for t in tools]
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
        calls = tool_calls_of(response.message)
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
