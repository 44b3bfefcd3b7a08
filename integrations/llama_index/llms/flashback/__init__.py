"""LlamaIndex integration of flashback-agents: ``from llama_index.llms.flashback import FlashBack``.

``FlashBackLLM`` is the deprecated former name of ``FlashBack`` (it warns on construction).
"""

from llama_index.llms.flashback.base import FlashBack, FlashBackLLM
from llama_index.llms.flashback.convert import DOCUMENTS_KEY, to_flashback_messages, usage_dict
from llama_index.llms.flashback.templates import (
    FLASHBACK_REFINE_PROMPT,
    FLASHBACK_TEXT_QA_PROMPT,
    FlashBackPromptTemplate,
    chroma_vector_store,
    flashback_query_engine,
    offline_embed_model,
    split_documents,
)

__all__ = [
    "FlashBack", "FlashBackLLM", "DOCUMENTS_KEY", "to_flashback_messages", "usage_dict",
    "FLASHBACK_TEXT_QA_PROMPT", "FLASHBACK_REFINE_PROMPT", "FlashBackPromptTemplate",
    "flashback_query_engine", "offline_embed_model", "chroma_vector_store", "split_documents",
]
