"""Context budget: evict (exact, recompute the tail once) and shift (RoPE rotation, approximate)."""

from __future__ import annotations

import pytest
import torch

from flashback_agents import CachedContext, ContextOverflowError, Layout, Message, ToolCall
from flashback_agents.compaction import find_blocks
from flashback_agents.kvcache import layer_tensors
from flashback_agents.testing import assert_cache_matches_recompute, full_logits


@pytest.fixture(scope="module")
def long_lm(long_dir):
    """The tiny Llama with a 4,096-token window (long_dir, conftest.py), so budgets hold many steps."""
    from flashback_agents import load_model

    return load_model(str(long_dir))


def _conversation(steps: int, result_words: int = 12) -> list[Message]:
    msgs = [Message("system", "You analyse logs."), Message("user", "count errors")]
    for i in range(steps):
        call = ToolCall("grep", {"q": f"e{i}"}, id=f"c{i}")
        msgs.append(Message("assistant", "", tool_calls=[call]))
        msgs.append(Message("tool", " ".join(f"line{i}-{j} ERROR disk" for j in range(result_words)),
                            tool_call_id=f"c{i}", name="grep"))
    return msgs


def test_evict_keeps_running_pure_appends_between_compactions(long_lm):
    tiny_lm = long_lm
    lay = Layout(tiny_lm)
    budget = 2000
    ctx = CachedContext(tiny_lm, max_context_tokens=budget, on_overflow="evict")
    prev_len = 0
    compactions = 0
    for step in range(1, 17):
        ids = lay.render(_conversation(step, result_words=40))
        res = ctx.sync(ids)  # the framework re-sends the full history every time
        ev = ctx.last_compaction
        if ev is None:
            assert res.reused == prev_len, f"step {step}: not a pure append"
            assert res.computed == len(ctx) - prev_len
        else:
            compactions += 1
            # exactly the tail after the first evicted block is recomputed (once)
            assert res.reused == min(prev_len, ev.first_changed)
            assert res.computed == len(ctx) - res.reused
            # down to the low-water mark, but never evicting the result just appended
            if len(ctx) > int(budget * 0.75):
                blocks = find_blocks(ctx.token_ids, tiny_lm.marker_ids)[:-1]
                assert all("[evicted" in tiny_lm.decode(ctx.token_ids[b.start:b.end]) for b in blocks)
        assert len(ctx) <= budget
        prev_len = len(ctx)
        assert_cache_matches_recompute(ctx, 1e-4)
    assert compactions >= 2
    # system block, user message and assistant turns stay; the newest tool result is intact
    text = tiny_lm.decode(ctx.token_ids)
    assert "You analyse logs." in text and "count errors" in text
    assert "line15-39 ERROR disk" in text
    assert "[evicted grep:" in text


def test_oldest_results_are_evicted_first(long_lm):
    tiny_lm = long_lm
    lay = Layout(tiny_lm)
    ctx = CachedContext(tiny_lm, max_context_tokens=1500, on_overflow="evict")
    ctx.sync(lay.render(_conversation(8, result_words=40)))
    blocks = find_blocks(ctx.token_ids, tiny_lm.marker_ids)
    texts = [tiny_lm.decode(ctx.token_ids[b.start:b.end]) for b in blocks]
    evicted = [i for i, t in enumerate(texts) if "[evicted" in t]
    kept = [i for i, t in enumerate(texts) if "[evicted" not in t]
    assert evicted and kept and max(evicted) < min(kept)


def test_single_oversized_result_is_cut_not_fatal(tiny_lm):
    lay = Layout(tiny_lm)
    msgs = _conversation(1, result_words=120)  # one tool result far larger than the budget
    ctx = CachedContext(tiny_lm, max_context_tokens=200, on_overflow="evict")
    ctx.sync(lay.render(msgs))
    assert len(ctx) <= 200
    assert "[... cut" in tiny_lm.decode(ctx.token_ids)
    assert_cache_matches_recompute(ctx, 1e-4)
    strict = CachedContext(tiny_lm, max_context_tokens=200)
    with pytest.raises(ContextOverflowError):
        strict.sync(lay.render(msgs))
    assert len(strict) == 0


def test_shift_first_layer_exact_and_deeper_drift_measured(long_lm):
    tiny_lm = long_lm
    lay = Layout(tiny_lm)
    conv = _conversation(10)
    ids = lay.render(conv)
    shift = CachedContext(tiny_lm, max_context_tokens=len(ids) - 5, on_overflow="shift")
    first_ids = lay.render(conv[:-1])
    shift.sync(first_ids)
    shift.sync(ids)
    assert shift.last_compaction is not None
    # reference: the same compacted ids, computed from scratch
    ref = CachedContext(tiny_lm)
    ref.sync(shift.token_ids)
    ref.flush()
    shift.flush()
    got, want = layer_tensors(shift.cache), layer_tensors(ref.cache)
    assert torch.allclose(got[0][0], want[0][0], atol=1e-5)  # layer 0 keys: rotation is exact
    assert torch.allclose(got[0][1], want[0][1], atol=1e-5)  # layer 0 values
    drift = (shift.next_token_logits() - full_logits(tiny_lm, shift.token_ids)).abs().max().item()
    assert drift == drift  # measured (reported by `bench long`), not asserted small
    assert shift.stats.tokens_recomputed < ref.stats.tokens_computed


def test_unevictable_overflow_says_so(tiny_lm):
    lay = Layout(tiny_lm)
    ctx = CachedContext(tiny_lm, max_context_tokens=60, on_overflow="evict")
    with pytest.raises(ContextOverflowError, match="even after evicting"):
        ctx.sync(lay.render([Message("user", "word " * 80)]))
    assert len(ctx) == 0


def test_bad_overflow_mode_is_clear(tiny_lm):
    with pytest.raises(ValueError, match="on_overflow must be one of"):
        CachedContext(tiny_lm, on_overflow="drop")


# --------------------------------------------------------------- rare compactions (issue 19, part 3)
def _agent_conversation(steps: int, words: int = 12) -> list[Message]:
    """An agent loop: every step an assistant tool call (with a long argument) and its result."""
    msgs = [Message("system", "You analyse logs."), Message("user", "count errors")]
    for i in range(steps):
        call = ToolCall("grep", {"q": f"e{i} " + "a long regular expression " * 4}, id=f"c{i}")
        msgs.append(Message("assistant", "", tool_calls=[call]))
        msgs.append(Message("tool", " ".join(f"line{i}-{j} ERROR disk" for j in range(words)),
                            tool_call_id=f"c{i}", name="grep"))
    return msgs


def test_compactions_are_rare_and_every_other_step_is_a_pure_append(long_lm):
    tiny_lm = long_lm
    lay = Layout(tiny_lm)
    budget, steps, reserve = 3000, 64, 64
    ctx = CachedContext(tiny_lm, max_context_tokens=budget, on_overflow="evict")
    prev_len, compacted_at = 0, []
    for step in range(1, steps + 1):
        msgs = _agent_conversation(step)
        res = ctx.sync(lay.render(msgs), reserve=reserve)
        ev = ctx.last_compaction
        if ev is None:  # a pure append: exactly the new tokens computed
            assert res.reused == prev_len and res.computed == len(ctx) - prev_len, f"step {step}"
        else:
            compacted_at.append(step)
            assert res.reused == min(prev_len, ev.first_changed)
            assert res.computed == len(ctx) - res.reused
            # the stubs and the tool-call turns between them went into one stub
            blocks = [tiny_lm.decode(ctx.token_ids[b.start:b.end]) for b in find_blocks(ctx.token_ids, tiny_lm.marker_ids)]
            assert ev.stubs_merged == 1 and "[evicted grep:" in blocks[0]
            assert not any("[evicted" in b for b in blocks[1:])
        assert len(ctx) <= budget - reserve
        prev_len = len(ctx)
    assert 2 <= len(compacted_at) <= steps // 8, compacted_at
    assert all(b - a >= 8 for a, b in zip(compacted_at, compacted_at[1:])), compacted_at
    assert_cache_matches_recompute(ctx, 1e-4)
    text = tiny_lm.decode(ctx.token_ids)
    # system, user, the oldest call, one merged stub naming the tool, the newest call and result
    assert "You analyse logs." in text and "count errors" in text and '"e0 ' in text
    assert text.count("[evicted grep: ") == 1 and " results, " in text
    assert f'"e{steps - 1} ' in text and f"line{steps - 1}-11 ERROR disk" in text


def test_merged_view_is_prefix_stable_for_resent_and_compacted_histories(long_lm):
    tiny_lm = long_lm
    lay = Layout(tiny_lm)
    ctx = CachedContext(tiny_lm, max_context_tokens=1500, on_overflow="evict")
    for step in range(1, 30):
        ctx.sync(lay.render(_agent_conversation(step)))
    assert ctx.stats.compactions >= 2
    full = lay.render(_agent_conversation(29))
    view = ctx.view_of(full)
    assert view == ctx.token_ids  # the full history maps to what is held
    assert ctx.view_of(view) == view  # and the view is a fixed point
    longer = lay.render(_agent_conversation(30))
    assert ctx.view_of(longer)[:len(view)] == view  # a history that grew maps to a view that grew
    # a copy (saved and loaded, or forked) maps the same way
    assert ctx.compactor.copy().apply(longer) == ctx.view_of(longer)


def test_user_turns_stop_merging(long_lm):
    """Stubs merge only across tool-call turns: a user message between two results is never evicted."""
    tiny_lm = long_lm
    lay = Layout(tiny_lm)
    msgs = _agent_conversation(3, words=40)
    msgs.append(Message("user", "now look at the disks"))
    for i in range(3, 6):
        call = ToolCall("grep", {"q": f"d{i}"}, id=f"d{i}")
        msgs += [Message("assistant", "", tool_calls=[call]),
                 Message("tool", " ".join(f"disk{i}-{j} full" for j in range(60)), tool_call_id=f"d{i}", name="grep")]
    ctx = CachedContext(tiny_lm, max_context_tokens=len(lay.render(msgs)) - 50, on_overflow="evict")
    ctx.sync(lay.render(msgs))
    text = tiny_lm.decode(ctx.token_ids)
    assert "now look at the disks" in text
    assert text.count("[evicted") >= 2  # one stub before the user turn, one after
    assert_cache_matches_recompute(ctx, 1e-4)
