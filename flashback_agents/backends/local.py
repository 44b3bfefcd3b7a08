"""The in-process backend: transformers weights and a pool of persistent KV caches.

A call acquires the pooled context with the longest common prefix (only the new tail is computed),
decodes on it (generated tokens stay cached for the next step) and reports what it reused.
Constraints become xgrammar logits processors (see :mod:`flashback_agents.constrained`).
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from ..callmask import no_call_processor
from ..constrained import json_schema_processor, lazy_calls_supported, tool_call_processor
from ..generation import GenerationConfig, GenerationResult, stream
from ..pool import ContextPool
from .base import Backend, BackendRun, ChatUsage, Constraint


class LocalRun(BackendRun):
    """One generation on a pooled context; the lease is held only while iterating."""

    def __init__(self, pool: ContextPool, ids: list[int], config: GenerationConfig, processors: list):
        super().__init__(ids, config)
        self.pool, self.processors = pool, processors

    def __iter__(self) -> Iterator[str]:
        t0 = time.perf_counter()
        with self.pool.acquire(self.ids, timeout=self.timeout, reserve=self.config.max_new_tokens) as lease:
            ctx = lease.ctx
            held = len(ctx)  # the prompt as held (after any compaction)
            event = ctx.last_compaction
            prefill = time.perf_counter() - t0  # the lease computes the new prompt tokens on entry
            decode0 = ctx.stats.decode_seconds
            run = stream(ctx, self.config, self.processors)
            raw = ""
            for delta in run:
                raw += delta
                yield delta
                if self._cancelled.is_set():
                    break
            result = run.result or GenerationResult(text=raw, token_ids=[], finish_reason="stop")
            if run.result is None:  # cancelled: what was decoded so far
                n = len(ctx) - held
                result.token_ids = ctx.token_ids[held:] if n > 0 else []
            usage = ChatUsage(input_tokens=held, output_tokens=len(result.token_ids),
                              cache_read=lease.sync.reused, computed=lease.sync.computed,
                              prefill_seconds=prefill, decode_seconds=ctx.stats.decode_seconds - decode0,
                              forwards=result.forwards, drafted=result.drafted, accepted=result.accepted,
                              forced=result.forced)
            usage.cache_restored = lease.restored
            usage.forced_close = result.forced_close
            if event is not None:
                usage.compacted = True
                usage.tokens_evicted = event.tokens_evicted
                usage.tokens_recomputed = event.tokens_recomputed
        self.result, self.usage = result, usage


class LocalBackend(Backend):
    """Runs on a :class:`ContextPool` in this process (today's default)."""

    def __init__(self, pool: ContextPool):
        self.pool = pool
        self.lm = pool.lm

    def prepare(self, ids: list[int], config: GenerationConfig, constraint: Constraint | None) -> list:
        """Logits processors for the constraint, built now (so schema errors raise early): xgrammar
        grammars, or for ``"no_tool_call"`` the mask of :mod:`flashback_agents.callmask`."""
        if constraint is None:
            return []
        budget = config.max_new_tokens  # the schema's caps follow the reply's budget (constrained.bounds_for)
        if constraint.kind == "json":
            return [json_schema_processor(self.lm, constraint.schema, max_new_tokens=budget)]
        if constraint.kind == "no_tool_call":
            return [no_call_processor(self.lm, constraint.fmt)]
        if constraint.kind == "tool_call_auto":
            if not lazy_calls_supported(self.lm, constraint.fmt):
                return []
            return [tool_call_processor(self.lm, constraint.tools, fmt=constraint.fmt, auto=True,
                                        max_new_tokens=budget)]
        return [tool_call_processor(self.lm, constraint.tools, constraint.choice, fmt=constraint.fmt,
                                    max_new_tokens=budget)]

    def start(self, ids: list[int], config: GenerationConfig, prepared: Any) -> LocalRun:
        return LocalRun(self.pool, ids, config, list(prepared or []))

    def close(self) -> None:
        """Drop the pool's idle cached contexts (written to the disk tier first where there is one)."""
        self.pool.clear()
