"""A cache pool never makes a call wait: with every context leased (streams open and unread), the
next call runs at once on a temporary context outside the pool (counted in usage and in the byte
budget while it runs, dropped afterwards, written to the disk tier if there is one);
``max_contexts=0`` keeps nothing in memory and never blocks. Also: the longest-prefix choice, locks and
eviction, and one byte budget shared by every pool of a model."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from flashback_agents import ContextError, ContextPool, FlashBackError, GenerationConfig, Message
from flashback_agents.engines import local_engine
from flashback_agents.kvstore import DiskKVStore
from flashback_agents.testing import run_in_thread

pytestmark = pytest.mark.filterwarnings("ignore::flashback_agents.pool.PoolBudgetWarning")
MSGS = [Message("system", "You are terse."), Message("user", "Say something.")]


def _in_thread(fn, deadline: float = 15.0):
    return run_in_thread(fn, deadline)


def ids_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 440, (n,), generator=g).tolist()


def test_the_17th_call_does_not_wait_behind_16_idle_streams(tiny_lm):
    engine = local_engine(tiny_lm)  # the default acquire_timeout (300 s) and max_contexts (16)
    assert engine.pool.max_contexts == 16
    hold = GenerationConfig(max_new_tokens=60, min_new_tokens=60)
    streams = []
    try:
        for i in range(16):
            run = engine.stream_chat([Message("user", f"conversation number {i}")], config=hold)
            it = iter(run)
            next(it)  # the stream holds its context, then is left unread
            streams.append((run, it))
        assert len(engine.pool) == 16 and all(e.busy for e in engine.pool._entries)
        t0 = time.monotonic()
        done, reply = _in_thread(lambda: engine.chat([Message("user", "the seventeenth")],
                                                     config=GenerationConfig(max_new_tokens=3)))
        elapsed = time.monotonic() - t0
        assert done, "the 17th call waited for a pooled context"
        assert not isinstance(reply, BaseException), repr(reply)
        assert elapsed < 10 and reply.text is not None
        assert reply.usage.input_tokens > 0 and reply.usage.computed == reply.usage.input_tokens  # counted
        assert engine.pool.temporary_contexts == 1
        assert len(engine.pool) == 16 and len(engine.pool._entries) == 16  # the temporary one was dropped
    finally:
        for run, _ in streams:
            run.close()
    assert not any(e.busy for e in engine.pool._entries) and len(engine.pool) <= 16
    # the pool works as before once the streams are closed
    reply = engine.chat([Message("user", "conversation number 3")], config=GenerationConfig(max_new_tokens=2))
    assert reply.usage.cache_read > 0


def test_max_contexts_zero_never_blocks_and_keeps_nothing(tiny_lm):
    pool = ContextPool(tiny_lm, max_contexts=0)

    def call():
        with pool.acquire([5, 6, 7, 8]) as lease:
            return lease.sync.computed, len(pool)

    done, value = _in_thread(call)
    assert done, "ContextPool(max_contexts=0).acquire() waited forever"
    assert value == (4, 0)
    assert len(pool) == 0 and not pool._entries and pool.nbytes == 0
    assert pool.temporary_contexts == 1


def test_a_temporary_context_is_in_the_byte_budget_while_used_then_dropped(tiny_lm):
    pool = ContextPool(tiny_lm, max_contexts=1)
    a, b = ids_of(100, 1), ids_of(80, 2)

    def calls():
        with pool.acquire(a) as outer:
            with pool.acquire(b) as inner:  # the only context is leased: a temporary one, at once
                assert inner.ctx is not outer.ctx and inner.sync.computed == 80
                assert len(pool) == 1 and pool.nbytes == outer.ctx.nbytes + inner.ctx.nbytes
            assert len(pool) == 1 and pool._entries[0].ctx is outer.ctx  # dropped on release
        with pool.acquire(a + [9]) as lease:  # the pooled one still serves its conversation
            assert lease.ctx is outer.ctx and lease.sync.reused == 100

    done, value = _in_thread(calls)
    assert done, "a call waited for the pool's only context"
    assert value is None, repr(value)


def test_a_dropped_temporary_context_goes_to_the_disk_tier(tiny_lm, tmp_path):
    store = DiskKVStore(tmp_path / "kv", min_tokens=8)
    pool = ContextPool(tiny_lm, max_contexts=0, store=store)
    a = ids_of(300, 3)

    def calls():
        with pool.acquire(a):
            pass
        writes = store.stats.writes
        with pool.acquire(a + [7, 8]) as lease:  # restored from disk instead of recomputed
            return writes, lease.restored, lease.sync.computed, len(pool)

    done, value = _in_thread(calls)
    assert done, "ContextPool(max_contexts=0).acquire() waited"
    assert value == (1, 300, 2, 0)


@pytest.mark.parametrize("bad", [-1, "16", 2.5, True, None])
def test_max_contexts_must_be_a_non_negative_integer(tiny_lm, bad):
    with pytest.raises(ContextError, match="max_contexts must be a non-negative integer") as info:
        ContextPool(tiny_lm, max_contexts=bad)
    assert isinstance(info.value, FlashBackError)


def test_pool_picks_longest_prefix_locks_and_evicts(tiny_lm):
    pool = ContextPool(tiny_lm, max_contexts=3)
    a = list(range(10, 160))
    b = list(range(200, 240))
    with pool.acquire(a) as lease:
        assert lease.sync.computed == 150
        ctx_a = lease.ctx
    with pool.acquire(b) as lease:
        assert lease.ctx is not ctx_a and lease.sync.computed == 40
    with pool.acquire(a + [7, 8]) as lease:
        assert lease.ctx is ctx_a and (lease.sync.reused, lease.sync.computed) == (150, 2)
        # a context in use is never handed out twice
        with pool.acquire(a + [7, 8, 9]) as inner:
            assert inner.ctx is not ctx_a
    # divergence far back forks the shared prefix instead of destroying the long context
    with pool.acquire(a[:10] + [400] * 80) as lease:
        assert lease.ctx is not ctx_a and lease.sync.reused == 10
    assert len(pool) <= 3
    tiny = ContextPool(tiny_lm, max_bytes=1)
    with tiny.acquire(a):
        pass
    assert len(tiny) == 1  # over the byte budget, but the newest conversation is kept (PoolBudgetWarning)


def test_busy_pool_runs_the_call_on_a_temporary_context_at_once(tiny_lm):
    engine = local_engine(tiny_lm, acquire_timeout=None)
    engine.pool.max_contexts = 1
    run = engine.stream_chat(MSGS, config=GenerationConfig(max_new_tokens=50, min_new_tokens=50))
    it = iter(run)
    next(it)  # the stream holds the only context
    t0 = time.monotonic()
    done, value = _in_thread(lambda: engine.chat([Message("user", "other")], timeout=0.3,
                                                 config=GenerationConfig(max_new_tokens=2)), deadline=10.0)
    assert done, "chat() waited forever for a context"
    assert not isinstance(value, BaseException), value  # no PoolTimeoutError: the call is not made to wait
    assert value.usage.computed > 0 and len(engine.pool) == 1 and engine.pool.temporary_contexts == 1
    assert time.monotonic() - t0 < 5
    run.close()  # releases at once
    assert not any(e.busy for e in engine.pool._entries)
    assert engine.chat([Message("user", "other")], config=GenerationConfig(max_new_tokens=2), timeout=1).text is not None


def test_pools_of_one_model_share_one_byte_budget(tiny_lm):
    a = local_engine(tiny_lm, max_context_tokens=400)
    b = local_engine(tiny_lm, max_context_tokens=450)
    assert a.pool.budget is b.pool.budget
    budget, saved = a.pool.budget, a.pool.budget.max_bytes
    try:
        per_ctx = None
        for i in range(6):
            eng = (a, b)[i % 2]
            eng.chat([Message("user", f"conversation {i} " * 8)], config=GenerationConfig(max_new_tokens=2))
            per_ctx = per_ctx or max(e.ctx.nbytes for e in eng.pool._entries)
        assert a.pool.nbytes + b.pool.nbytes >= 5 * per_ctx
        budget.max_bytes = 2 * per_ctx  # what local_engine(..., max_cached_bytes=) sets for all pools of the model
        a.chat([Message("user", "one more " * 8)], config=GenerationConfig(max_new_tokens=2))
        total = a.pool.nbytes + b.pool.nbytes
        assert total <= 2 * per_ctx + max(e.ctx.nbytes for e in a.pool._entries)
        assert budget.nbytes >= total
    finally:
        budget.max_bytes = saved


def test_a_conversation_larger_than_the_budget_is_kept(tiny_lm):
    from flashback_agents.pool import PoolBudgetWarning

    pool = ContextPool(tiny_lm, max_bytes=1)
    ids = list(range(10, 160))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pool.acquire(ids):
            pass
        with pool.acquire(ids + [5, 6]) as lease:
            assert lease.sync.reused == 150  # reused, not recomputed
    assert len(pool) == 1
    assert sum(issubclass(w.category, PoolBudgetWarning) for w in caught) == 1
    assert "max_cached_bytes" in str(next(w for w in caught if issubclass(w.category, PoolBudgetWarning)).message)
    with pool.acquire(list(range(300, 320))):
        pass
    assert len(pool) == 1  # the older one is evicted, the newest kept
