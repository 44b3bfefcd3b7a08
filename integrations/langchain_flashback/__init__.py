"""LangChain integration for flashback-agents: chat model, completion LLM and retriever."""

from .chat_models import ChatFlashBack, to_flashback_messages
from .llms import FlashBackLLM
from .retrievers import FlashBackRetriever, create_rag_chain, rag_messages

__all__ = ["ChatFlashBack", "FlashBackLLM", "FlashBackRetriever", "create_rag_chain", "rag_messages",
           "to_flashback_messages"]
