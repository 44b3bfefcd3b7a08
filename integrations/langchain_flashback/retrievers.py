"""FlashBackRetriever (LangChain retriever over the project's retrievers) and a RAG chain helper.

The RAG chain uses the append layout: the question comes first, the retrieved documents after it,
each wrapped in ``<MARK_L> ... <MARK_R>``, so a follow-up turn reuses everything already cached.
"""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda
from pydantic import ConfigDict

from .chat_models import DOCUMENTS_KEY

DEFAULT_RAG_SYSTEM = ("Answer the user's question using the marked documents that follow it. "
                      "If they do not contain the answer, say so.")


def _to_document(hit: Any) -> Document:
    """A project retrieval hit (``.text``, ``.id``, ``.score``, ``.metadata``) -> LangChain Document."""
    text = getattr(hit, "text", None)
    if text is None:
        text = getattr(hit, "page_content", None)
    if not isinstance(text, str):
        raise TypeError(f"retriever returned a {type(hit).__name__} without a .text string")
    metadata = dict(getattr(hit, "metadata", None) or {})
    hit_id = getattr(hit, "id", None)
    score = getattr(hit, "score", None)
    if hit_id is not None:
        metadata.setdefault("id", hit_id)
    if score is not None:
        metadata.setdefault("score", float(score))
    return Document(page_content=text, metadata=metadata, id=str(hit_id) if hit_id is not None else None)


class FlashBackRetriever(BaseRetriever):
    """Wraps any object with ``retrieve(query, k)`` (flashback_agents.retrieval) as a LangChain retriever."""

    retriever: Any
    k: int = 4

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        if not hasattr(self.retriever, "retrieve"):
            raise TypeError(f"{type(self.retriever).__name__} has no retrieve(query, k) method")
        return [_to_document(h) for h in self.retriever.retrieve(query, self.k)]

    async def _aget_relevant_documents(self, query: str, *,
                                       run_manager: AsyncCallbackManagerForRetrieverRun) -> list[Document]:
        hits = await asyncio.to_thread(self.retriever.retrieve, query, self.k)
        return [_to_document(h) for h in hits]


def rag_messages(question: str, documents: list[Document], system: str | None = DEFAULT_RAG_SYSTEM) -> list:
    """Messages in the append layout: [system][question][<MARK_L> doc <MARK_R>]..."""
    msgs: list = [SystemMessage(system)] if system else []
    msgs.append(HumanMessage(question, additional_kwargs={DOCUMENTS_KEY: [d.page_content for d in documents]}))
    return msgs


def create_rag_chain(llm: BaseChatModel, retriever: BaseRetriever, *, system: str | None = DEFAULT_RAG_SYSTEM,
                     return_documents: bool = False) -> Runnable:
    """question (str, or dict with "question"/"input") -> answer text (or a dict with the documents).

    Documents are passed to the model in ``HumanMessage.additional_kwargs["documents"]``, which
    ChatFlashBack renders as marked evidence after the question.
    """

    def _question(inp: Any) -> str:
        if isinstance(inp, str):
            return inp
        if isinstance(inp, dict):
            for key in ("question", "input", "query"):
                if isinstance(inp.get(key), str):
                    return inp[key]
        raise ValueError("RAG chain input must be a string or a dict with a 'question' string.")

    def _run(inp: Any, config: Any = None) -> Any:
        question = _question(inp)
        docs = retriever.invoke(question, config=config)
        answer = llm.invoke(rag_messages(question, docs, system), config=config)
        text = answer.text if hasattr(answer, "text") else str(answer)
        if return_documents:
            return {"question": question, "documents": docs, "answer": text, "message": answer}
        return text

    async def _arun(inp: Any, config: Any = None) -> Any:
        question = _question(inp)
        docs = await retriever.ainvoke(question, config=config)
        answer = await llm.ainvoke(rag_messages(question, docs, system), config=config)
        text = answer.text if hasattr(answer, "text") else str(answer)
        if return_documents:
            return {"question": question, "documents": docs, "answer": text, "message": answer}
        return text

    return RunnableLambda(_run, afunc=_arun, name="flashback_rag")
