"""FlashBackLLM: completion-style LangChain LLM on the same shared weights and context pool.

A prompt that extends an earlier one (a growing scratchpad, a document read in pieces) reuses the
cached prefix: only the new tokens are computed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import GenerationChunk
from pydantic import ConfigDict, Field

from flashback_agents.chat import ChatEngine, ChatReply
from flashback_agents.generation import GenerationConfig
from flashback_agents.models import DEFAULT_MODEL

PROVIDER = "flashback"


def _info(reply: ChatReply) -> dict:
    u = reply.usage
    return {"finish_reason": reply.finish_reason, "model_name": reply.model_name,
            "usage": {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
                      "cache_read": u.cache_read, "computed": u.computed}}


class FlashBackLLM(LLM):
    """Raw text completion (no chat template) on a persistent, shared KV cache."""

    model: str = Field(default=DEFAULT_MODEL, description="Model spec (see flashback_agents.load_model).")
    adapter: str | None = None
    temperature: float = 0.0
    max_tokens: int | None = 256
    stop: list[str] | None = None
    top_p: float = 1.0
    seed: int | None = None
    streaming: bool = False
    max_cached_bytes: int | None = None
    max_context_tokens: int | None = None
    on_overflow: str = "evict"  # "evict" (oldest tool results/documents -> stubs), "shift" or "error"
    min_tokens: int = 0  # EOS masked until this many tokens (fixed-length benchmark runs)

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    @property
    def _llm_type(self) -> str:
        return "flashback"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "adapter": self.adapter, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "top_p": self.top_p, "seed": self.seed}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = PROVIDER
        params["ls_model_name"] = kwargs.get("model") or self.model
        return params

    @property
    def engine(self) -> ChatEngine:
        return ChatEngine.shared(self.model, adapter=self.adapter, max_cached_bytes=self.max_cached_bytes,
                                 max_context_tokens=self.max_context_tokens, on_overflow=self.on_overflow)

    def _config(self, stop: list[str] | None, kwargs: dict) -> GenerationConfig:
        stops = stop if stop is not None else (self.stop or [])
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        return GenerationConfig(max_new_tokens=int(max_tokens) if max_tokens is not None else 256,
                                min_new_tokens=int(kwargs.get("min_tokens", self.min_tokens) or 0),
                                temperature=float(kwargs.get("temperature", self.temperature) or 0.0),
                                top_p=float(kwargs.get("top_p", self.top_p)), seed=kwargs.get("seed", self.seed),
                                stop=tuple(stops))

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        if self.streaming:
            return "".join(c.text for c in self._stream(prompt, stop=stop, run_manager=run_manager, **kwargs))
        return self.engine.complete(prompt, self._config(stop, kwargs)).text

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        if self.streaming:
            parts = [c.text async for c in self._astream(prompt, stop=stop, run_manager=run_manager, **kwargs)]
            return "".join(parts)
        reply = await self.engine.acomplete(prompt, self._config(stop, kwargs))
        return reply.text

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        run = self.engine.stream_complete(prompt, self._config(stop, kwargs))
        for delta in run:
            chunk = GenerationChunk(text=delta)
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        assert run.reply is not None
        yield GenerationChunk(text="", generation_info=_info(run.reply))

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        run = self.engine.astream_complete(prompt, self._config(stop, kwargs))
        async for delta in run:
            chunk = GenerationChunk(text=delta)
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        assert run.reply is not None
        yield GenerationChunk(text="", generation_info=_info(run.reply))
