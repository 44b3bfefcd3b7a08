"""Settings shared by ChatFlashBack and FlashBackLLM: one definition of the fields and of how they
become an engine and a GenerationConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from flashback_agents.chat import DEFAULT_REPEAT_CALLS, ChatEngine
from flashback_agents.engines import EngineSettings, engine_for
from flashback_agents.generation import SETTING_EXAMPLES, GenerationConfig, check_field, normalize_stop
from flashback_agents.models import DEFAULT_ADAPTER, DEFAULT_MODEL

PROVIDER = "flashback"


class FlashBackParams(BaseModel):
    """Model spec, decoding settings and the cache budget (a mixin for the LangChain classes)."""

    model: str = Field(default=DEFAULT_MODEL, description="Model spec (see flashback_agents.load_model), "
                       "or an http(s) URL of an OpenAI-compatible server.")
    adapter: str | None = Field(default=DEFAULT_ADAPTER, description="FlashBack adapter: 'auto' (the default: the "
                                "one shipped for the model, if any), None (no adapter) or the directory of a trained one.")
    temperature: float = 0.0
    max_tokens: int | None = 256
    stop: str | list[str] | None = None  # a str is ONE stop string
    timeout: float | None = Field(default=None, description="Seconds a call waits for a free cached context "
                                  "(local model) or for the server's reply (server URL) before raising "
                                  "PoolTimeoutError / ServerStreamError; None: the engine's default (300 s).")
    top_p: float = 1.0
    seed: int | None = None
    streaming: bool = False
    max_cached_bytes: int | None = None
    max_context_tokens: int | None = None
    on_overflow: str = "evict"  # "evict" (oldest tool results/documents -> stubs), "shift" or "error"
    min_tokens: int = 0  # EOS masked until this many tokens (fixed-length benchmark runs)
    kv_store_dir: str | Path | None = Field(default=None, description="Directory of the disk KV tier: contexts evicted "
                                     "from memory (or left at exit) are saved there and restored instead of "
                                     "recomputed, also by the next process (flashback_agents.kvstore).")
    kv_store_max_bytes: int | None = Field(default=None, description="Byte budget of kv_store_dir (LRU; "
                                           "default 16 GiB).")
    chat_template: str | None = Field(default=None, description="A Jinja chat template replacing the model's own "
                                      "(for a base model without one, which is otherwise rendered with a "
                                      "fallback and a ChatTemplateWarning).")
    #: exact multi-token decoding (flashback_agents.speculation): prompt-lookup speculation (None: on for
    #: greedy), drafts per forward, grammar jump-forward on constrained calls; a server backend ignores them
    speculate: bool | None = None
    draft_tokens: int = 8
    jump_forward: bool = True
    repeat_calls: str = Field(default=DEFAULT_REPEAT_CALLS, description="The loop guard of ChatFlashBack: 'forbid' "
                              "makes the model answer in text instead of repeating a tool call (same name and "
                              "arguments) already answered in the conversation; 'allow' returns it as written. "
                              "When it acts, response_metadata['repeat_calls_forbidden'] counts the calls.")

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    # A wrong type (temperature="hot") is our SettingTypeError (a FlashBackError) saying what to pass,
    # not pydantic's bare ValidationError; a numeric string still converts, as before.
    @field_validator(*SETTING_EXAMPLES, mode="before")
    @classmethod
    def _number_fields(cls, value: Any, info: ValidationInfo) -> Any:
        return check_field(info.field_name, value, cls.model_fields[info.field_name].annotation)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "adapter": self.adapter, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "top_p": self.top_p, "seed": self.seed}

    def _engine_for_model(self, model: str) -> ChatEngine:
        return engine_for(EngineSettings.from_fields(self, model=model))

    @property
    def engine(self) -> ChatEngine:
        """The process-wide engine (weights + context pool) for this model spec."""
        return self._engine_for_model(self.model)

    def _timeout(self, kwargs: dict) -> float | None:
        """The call's ``timeout`` (a per-call kwarg wins over the field)."""
        return kwargs.get("timeout", self.timeout)

    def _config(self, stop: str | list[str] | None, kwargs: dict) -> GenerationConfig:
        """Decoding settings from the fields, overridable per call (a str stop is one stop string)."""
        stops = normalize_stop(stop if stop is not None else (kwargs.get("stop") or self.stop or []))
        max_tokens = check_field("max_tokens", kwargs.get("max_tokens", self.max_tokens), optional=True)
        return GenerationConfig(max_new_tokens=max_tokens if max_tokens is not None else 256,
                                min_new_tokens=check_field("min_tokens", kwargs.get("min_tokens", self.min_tokens) or 0),
                                temperature=check_field("temperature", kwargs.get("temperature", self.temperature) or 0.0),
                                top_p=check_field("top_p", kwargs.get("top_p", self.top_p)),
                                seed=kwargs.get("seed", self.seed),
                                stop=tuple(stops), speculate=kwargs.get("speculate", self.speculate),
                                draft_tokens=kwargs.get("draft_tokens", self.draft_tokens),
                                jump_forward=kwargs.get("jump_forward", self.jump_forward))
