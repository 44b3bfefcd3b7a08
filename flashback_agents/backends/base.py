"""The execution side of the chat engine: one interface (Backend, BackendRun, Constraint, Usage), two implementations.

Rendering (``flashback_agents.layout``) is one code path; *where* the rendered token ids run is a
backend: the in-process transformers backend (:class:`~flashback_agents.backends.local.LocalBackend`,
a :class:`~flashback_agents.pool.ContextPool` of persistent KV caches) or an OpenAI-compatible server
with prefix caching (:class:`~flashback_agents.backends.server.ServerBackend`: llama.cpp, vLLM,
SGLang). Both receive the same plan (prompt ids, decoding settings, an optional output constraint)
and report the same usage (``cache_read`` = prompt tokens the backend did not have to compute).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..contextbase import DecodeCounts
from ..generation import GenerationConfig, GenerationResult


@dataclass
class Constraint:
    """What the output must be: ``kind="tool_call"`` (``<tool_call>{schema}</tool_call>``), ``"json"``,
    ``"tool_call_auto"`` (free text, but a call the model opens must follow ``schema``), or
    ``"no_tool_call"`` (free text that cannot open a call: ``tool_choice="none"``, the repeat-call guard;
    ``schema`` is empty, ``fmt`` says what opens a call).

    ``schema`` is the JSON schema of the call body / the JSON output; ``tools`` and ``choice`` are
    kept for backends that build their own grammar from them (the local xgrammar path).
    """

    kind: str
    schema: dict
    tools: list[dict] = field(default_factory=list)
    choice: str | None = None
    #: the model's tool-call syntax (a :class:`~flashback_agents.toolformat.ToolCallFormat`; None: Hermes
    #: ``<tool_call>``); ``schema`` stays the Hermes body (``"arguments"``), ``toolformat.call_schema`` adapts it
    fmt: Any = None


@dataclass
class ChatUsage(DecodeCounts):  # + forwards/drafted/accepted/forced (local backend: multi-token decoding)
    """Token accounting of one call; ``cache_read`` = prompt tokens reused from the cache."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read: int = 0
    computed: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compacted: bool = False  # this call compacted the context (on_overflow="evict"/"shift")
    tokens_evicted: int = 0  # tokens removed by that compaction
    tokens_recomputed: int = 0  # tail tokens recomputed because of it
    cache_restored: int = 0  # of ``cache_read``: tokens read back from the disk KV store (kv_store_dir)
    #: the repeat-call guard (``repeat_calls="forbid"``): calls of this reply that repeated a call already
    #: answered in the conversation and were forbidden, and the tokens of a reply decoded then replaced
    #: because of them (its decode time is in ``decode_seconds``)
    repeat_calls_forbidden: int = 0
    tokens_discarded: int = 0
    #: tokens the budget guard wrote to close a required call / JSON reply that max_tokens (or the
    #: context window) would have cut (flashback_agents.constrained.CloseGuard); 0: the model closed it
    forced_close: int = 0

    @property
    def forwards_per_token(self) -> float | None:
        """Decode forwards per generated token (1.0 without speculation; None: nothing generated)."""
        return self.forwards / self.output_tokens if self.output_tokens else None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


#: the backend-neutral name of the usage record
Usage = ChatUsage


class BackendRun(ABC):
    """One generation on a backend: iterate for raw text deltas (tool-call markup included).

    After iteration ``result`` (a :class:`GenerationResult`) and ``usage`` (a ``ChatUsage``) are set.
    ``cancel()`` asks the run to stop at the next token; iteration then ends normally.
    """

    def __init__(self, ids: list[int], config: GenerationConfig):
        self.ids, self.config = ids, config
        #: seconds to wait for the backend's resources (a pooled context; a server's answer), None: no limit
        self.timeout: float | None = None
        self.result: GenerationResult | None = None
        self.usage: Any = None
        self._cancelled = threading.Event()

    @abstractmethod
    def __iter__(self) -> Iterator[str]:
        ...

    def cancel(self) -> None:
        self._cancelled.set()


class Backend(ABC):
    """Runs prompts given as token ids of the engine's layout."""

    @abstractmethod
    def prepare(self, ids: list[int], config: GenerationConfig, constraint: Constraint | None) -> Any:
        """Validate and compile what a call needs before any compute (errors raise here)."""

    @abstractmethod
    def start(self, ids: list[int], config: GenerationConfig, prepared: Any) -> BackendRun:
        """Begin a run; nothing is computed until the run is iterated."""

    def close(self) -> None:  # pragma: no cover - default: nothing to release
        """Release connections or memory held by the backend."""
