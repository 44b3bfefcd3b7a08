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

from flashback_agents.chat import ChatReply

from ._params import PROVIDER, FlashBackParams


def _info(reply: ChatReply) -> dict:
    u = reply.usage
    return {"finish_reason": reply.finish_reason, "model_name": reply.model_name,
            "usage": {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
                      "cache_read": u.cache_read, "computed": u.computed}}


class FlashBackLLM(FlashBackParams, LLM):
    """Raw text completion (no chat template) on a persistent, shared KV cache."""

    @property
    def _llm_type(self) -> str:
        return "flashback"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = PROVIDER
        params["ls_model_name"] = kwargs.get("model") or self.model
        return params

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        if self.streaming:
            return "".join(c.text for c in self._stream(prompt, stop=stop, run_manager=run_manager, **kwargs))
        return self.engine.complete(prompt, self._config(stop, kwargs), timeout=self._timeout(kwargs)).text

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        if self.streaming:
            parts = [c.text async for c in self._astream(prompt, stop=stop, run_manager=run_manager, **kwargs)]
            return "".join(parts)
        reply = await self.engine.acomplete(prompt, self._config(stop, kwargs), timeout=self._timeout(kwargs))
        return reply.text

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        run = self.engine.stream_complete(prompt, self._config(stop, kwargs), timeout=self._timeout(kwargs))
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
        run = self.engine.astream_complete(prompt, self._config(stop, kwargs), timeout=self._timeout(kwargs))
        async for delta in run:
            chunk = GenerationChunk(text=delta)
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        assert run.reply is not None
        yield GenerationChunk(text="", generation_info=_info(run.reply))
