"""langchain-tests standard suites for ChatFlashBack (unit: no model load; integration: default model)."""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_flashback.chat_models import ChatFlashBack


class TestChatFlashBackUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatFlashBack]:
        return ChatFlashBack

    @property
    def chat_model_params(self) -> dict:
        return {"model": "smollm2-135m-instruct"}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True  # json_mode is constrained by the schema when one is given

    @property
    def supports_model_override(self) -> bool:
        return False  # one local model per spec; a per-call `model=` works but no second model ships


@pytest.mark.model
class TestChatFlashBackIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatFlashBack]:
        return ChatFlashBack

    @property
    def chat_model_params(self) -> dict:
        # The shipped FlashBack adapter: with it SmolLM2-135M calls a tool under tool_choice=None (auto),
        # which test_agent_loop needs; the lazy call grammar (ChatEngine.lazy_tool_grammar) keeps the
        # call's arguments valid. Without the adapter the model answers test_agent_loop in prose.
        return {"max_tokens": 64, "adapter": "auto"}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def tool_choice_value(self) -> str:
        return "any"  # SmolLM2-135M calls tools reliably only when decoding is constrained

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False):
        """Send a conversation twice: the second call reads the whole prompt from the cache."""
        llm = ChatFlashBack(max_tokens=8)
        prompt = "Repeat after me: the cache remembers."
        llm.invoke(prompt)
        if stream:
            full = None
            for chunk in llm.stream(prompt):
                full = chunk if full is None else full + chunk
            return full
        return llm.invoke(prompt)
