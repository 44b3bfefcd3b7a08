"""Soak (issue 16): a 500-step tool-calling conversation under ``on_overflow="evict"`` and 200 short
conversations through one ``ChatFlashBack``, on the tiny model. After warm-up, resident memory and
cache bytes stay flat (bounds below), and every step between compactions is a pure append.

Marked ``slow`` (about a minute on one core) but meant to run in CI: ``pytest -m slow tests/test_soak.py``.
"""

from __future__ import annotations

import gc

import pytest
from flashback_agents.engines import local_engine
from flashback_agents.generation import GenerationConfig
from flashback_agents.layout import Layout, Message, ToolCall

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.slow

MiB = 1 << 20
#: resident memory at the end may exceed the warm level by at most this much (measured: +3.4 MiB on
#: the 500-step run, +0.1 MiB on the 200 conversations); a leak of one tiny-model context per step
#: (~50 KiB) or of the rendered ids per step would pass it well within the run
RSS_BOUND = 16 * MiB
#: transient peak above the warm level (a compaction recomputes ~20k tokens; the allocator keeps
#: some of that working memory for a while: measured +28.5 MiB)
RSS_PEAK_BOUND = 64 * MiB

READ = {"type": "function", "function": {
    "name": "read_page", "description": "Read one page of the log.",
    "parameters": {"type": "object", "properties": {"page": {"type": "string", "maxLength": 4}},
                   "required": ["page"]}}}


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def soak_lm(tmp_path_factory):
    from flashback_agents import load_model
    from flashback_agents.testing import build_tiny_model_dir

    return load_model(str(build_tiny_model_dir(tmp_path_factory.mktemp("tiny-soak"), max_positions=32768)),
                      device="cpu")


def test_500_step_tool_conversation_under_evict(soak_lm):
    # Assistant turns, role wrappers and eviction stubs are never evicted (~40 tokens a step here), so 500 steps need a
    # budget above 500 x 30 tokens; tool results (~60 tokens each) overflow it many times over.
    budget = 24000
    engine = local_engine(soak_lm, max_context_tokens=budget, on_overflow="evict")
    engine.min_constrained_tokens = 24
    msgs = [Message("system", "You read log pages one by one."), Message("user", "Read every page.")]
    per_token = None
    prev = None
    compactions = appends = 0
    warm_step = warm_rss = warm_bytes = None
    peak_rss = peak_bytes = 0
    series: list[tuple[int, float]] = []
    for step in range(500):
        tool_choice = "read_page" if step % 5 == 0 else None  # a constrained call every 5th step
        reply = engine.chat(msgs, tools=[READ], tool_choice=tool_choice, config=GenerationConfig(max_new_tokens=3))
        u = reply.usage
        assert u.input_tokens + u.output_tokens <= budget
        if prev is not None:
            if u.compacted:
                compactions += 1
                assert u.tokens_evicted > 0 and u.cache_read + u.tokens_recomputed <= prev
            else:  # pure append: the whole previous prompt and reply came from the cache
                assert u.cache_read == prev, (step, prev, u)
                appends += 1
        prev = u.input_tokens + u.output_tokens
        call = reply.tool_calls or [ToolCall("read_page", {"page": str(step % 100)}, id=f"c{step}")]
        msgs.append(Message("assistant", reply.text, tool_calls=reply.tool_calls))
        msgs.append(Message("tool", f"page {step}: " + f"ERROR disk full on node{step % 7} " * 6, name="read_page",
                            tool_call_id=call[0].id if reply.tool_calls else None))
        held = engine.pool.nbytes
        if per_token is None:
            per_token = held / max(1, u.input_tokens)
        if warm_step is None and compactions:  # warm: the context has reached its budget once
            warm_step, warm_rss, warm_bytes = step, rss(), held
        elif warm_step is not None:
            peak_bytes = max(peak_bytes, held)
            if step % 25 == 0:
                series.append((step, rss() / MiB))
                peak_rss = max(peak_rss, series[-1][1] * MiB)
    end_rss = rss()
    peak_rss = max(peak_rss, end_rss)
    growth, end_growth = peak_rss - warm_rss, end_rss - warm_rss
    print("\nRSS after warm-up (step, MiB):", [(st, round(m, 1)) for st, m in series])
    print(f"500-step soak: {appends} pure appends, {compactions} compactions, warm at step {warm_step}; RSS "
          f"{warm_rss / MiB:.1f} MiB when warm, {end_growth / MiB:+.1f} MiB at the end (bound {RSS_BOUND / MiB:.0f}), "
          f"peak {growth / MiB:+.1f} MiB (bound {RSS_PEAK_BOUND / MiB:.0f}); cache {warm_bytes / 1024:.0f} KiB when "
          f"warm, peak after {peak_bytes / 1024:.0f} KiB")
    assert compactions >= 3 and appends >= 450 and warm_step < 400
    assert end_growth <= RSS_BOUND and growth <= RSS_PEAK_BOUND
    assert peak_bytes <= warm_bytes * 1.05  # flat: the budget caps the one context's cache
    assert peak_bytes <= 2.2 * per_token * budget
    assert len(engine.pool) <= 2


def test_200_short_conversations_through_one_chat_model(soak_lm):
    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_flashback import ChatFlashBack

    llm = ChatFlashBack(model=soak_lm.name, max_tokens=3)
    engine = local_engine(soak_lm, max_cached_bytes=4 * MiB)
    llm_engine = type(llm)._engine_for_model
    type(llm)._engine_for_model = lambda self, model: engine
    try:
        warm_rss = None
        peak_rss = peak_bytes = 0
        for i in range(200):
            history = [SystemMessage("You answer briefly."), HumanMessage(f"Question {i}: what failed on node {i}?")]
            first = llm.invoke(history)
            second = llm.invoke(history + [first, HumanMessage("And why?")])
            cached = second.usage_metadata["input_token_details"]["cache_read"]
            assert cached == first.usage_metadata["input_tokens"] + first.usage_metadata["output_tokens"], i
            if i == 50:
                warm_rss = rss()
            elif i > 50:
                peak_bytes = max(peak_bytes, engine.pool.nbytes)
                if i % 25 == 0:
                    peak_rss = max(peak_rss, rss())
        end_rss = rss()
        peak_rss = max(peak_rss, end_rss)
    finally:
        type(llm)._engine_for_model = llm_engine
    growth = end_rss - warm_rss
    print(f"\n200 conversations: RSS after warm-up {growth:+.0f} B at the end, peak {(peak_rss - warm_rss) / MiB:+.1f} MiB "
          f"(bound {RSS_BOUND / MiB:.0f}); pool "
          f"{len(engine.pool)} contexts, peak {peak_bytes / 1024:.0f} KiB (budget {engine.pool.max_bytes / 1024:.0f} KiB)")
    assert growth <= RSS_BOUND and peak_rss - warm_rss <= RSS_BOUND
    assert len(engine.pool) <= engine.pool.max_contexts
    assert peak_bytes <= engine.pool.max_bytes + max(e.ctx.nbytes for e in engine.pool._entries)
    assert len(engine.layout._enc_cache) <= Layout.ENC_CACHE_ENTRIES
    assert len(engine.layout.memo._data) <= engine.layout.memo._max
