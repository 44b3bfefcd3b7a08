"""The disk tier of the context pool (issue 19): round trips equal a recompute, longest prefix across
memory and disk, the disk budget, corrupt / foreign / torn files never trusted, and a second process
continuing an agent run from the first one's stored context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from flashback_agents import CachedContext, ContextPool, GenerationConfig, Message, load_model
from flashback_agents.engines import local_engine, shared_engine
from flashback_agents.testing import assert_cache_matches_recompute
from flashback_agents.kvstore import (BLOCK_TOKENS, DiskKVStore, KVStoreWarning, model_key, read_context, read_meta,
                                      shared_store)

TOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore::flashback_agents.pool.PoolBudgetWarning")


@pytest.fixture(scope="module")
def lm(tiny_dir_2k):
    return load_model(str(tiny_dir_2k), device="cpu")


def ids_of(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 440, (n,), generator=g).tolist()


def filled(lm, ids) -> CachedContext:
    ctx = CachedContext(lm)
    ctx.append(ids)
    return ctx


def ns_files(store: DiskKVStore, lm) -> list[Path]:
    return sorted((store.directory / model_key(lm)).glob("*.safetensors"))


def test_roundtrip_and_prefix_load_equal_recompute(lm, tmp_path):
    store = DiskKVStore(tmp_path / "kv")
    ids = ids_of(1000)
    path = store.put(filled(lm, ids))
    assert path is not None and path.parent.name == model_key(lm)
    meta = read_meta(path)  # header only: ids and per-block CRCs, no tensor bytes
    assert meta["token_ids"] == ids and meta["kv_tokens"] == 1000 and len(meta["checksums"][0][0]) == 4
    # the whole context
    entry, n = store.longest_prefix(lm, ids + ids_of(20, 1))
    assert entry is not None and n == 1000
    ctx = store.load(entry, lm, n, ids + ids_of(20, 1))
    assert ctx.token_ids == ids
    assert_cache_matches_recompute(ctx, TOL)
    # a request sharing only 700 tokens (not on a block boundary): only those are loaded and used
    other = ids[:700] + ids_of(50, 2)
    entry, n = store.longest_prefix(lm, other)
    assert n == 700
    ctx = store.load(entry, lm, n, other)
    assert ctx.token_ids == ids[:700] and ctx.cached_tokens == 700
    ctx.sync(other)
    assert ctx.stats.tokens_computed == 50
    assert_cache_matches_recompute(ctx, TOL)
    # fewer than one block in common: no candidate (not worth a read)
    assert store.longest_prefix(lm, ids[:100] + ids_of(300, 3)) == (None, 0)
    assert store.stats.restores == 2 and store.stats.tokens_restored == 1700


def test_save_load_share_the_store_format(lm, tmp_path):
    ctx = filled(lm, ids_of(300))
    ctx.save(tmp_path / "c.safetensors")
    loaded = CachedContext.load(lm, tmp_path / "c.safetensors")
    assert loaded.token_ids == ctx.token_ids
    assert_cache_matches_recompute(loaded, TOL)
    # a file CachedContext.save wrote is a store entry, and a store entry loads with CachedContext.load
    store = DiskKVStore(tmp_path / "kv")
    d = store.directory / model_key(lm)
    d.mkdir(parents=True)
    os.replace(tmp_path / "c.safetensors", d / "saved.safetensors")
    entry, n = store.longest_prefix(lm, ctx.token_ids + [5])
    assert n == 300
    assert_cache_matches_recompute(CachedContext.load(lm, entry.path), TOL)


def test_pool_restores_an_evicted_context_from_disk(lm, tmp_path):
    store = DiskKVStore(tmp_path / "kv")
    pool = ContextPool(lm, max_bytes=1, store=store)  # memory keeps only the context just used
    a, b = ids_of(600, 10), ids_of(600, 11)
    with pool.acquire(a):
        pass
    with pool.acquire(b):  # a is evicted: written to disk
        pass
    assert len(pool) == 1 and store.stats.writes == 1
    with pool.acquire(a + ids_of(40, 12)) as lease:
        assert lease.restored == 600 and lease.sync.reused == 600 and lease.sync.computed == 40
        assert_cache_matches_recompute(lease.ctx, TOL)
    # memory wins when it holds as much: b is in memory and on disk (b was evicted by the last call)
    with pool.acquire(a + ids_of(40, 12) + [7]) as lease:
        assert lease.restored == 0 and lease.sync.computed == 1
    # the stored prefix of a is replaced by the longer a+40 when that one is evicted in turn
    with pool.acquire(b + [9]) as lease:
        assert lease.restored == 600
    names = [read_meta(p)["token_ids"] for p in ns_files(store, lm)]
    assert a not in names and any(n[:600] == a for n in names)


def test_pool_without_store_recomputes(lm):
    pool = ContextPool(lm, max_bytes=1)
    a, b = ids_of(300, 10), ids_of(300, 11)
    for ids in (a, b):
        with pool.acquire(ids):
            pass
    with pool.acquire(a + [5]) as lease:
        assert lease.restored == 0 and lease.sync.computed == 301


def test_disk_budget_drops_least_recently_used(lm, tmp_path):
    one = DiskKVStore(tmp_path / "probe")
    size = one.put(filled(lm, ids_of(300, 20))).stat().st_size
    store = DiskKVStore(tmp_path / "kv", max_bytes=int(size * 2.5))
    c1, c2, c3 = (filled(lm, ids_of(300, s)) for s in (21, 22, 23))
    p1, p2 = store.put(c1), store.put(c2)
    os.utime(p1, (1, 1))
    os.utime(p2, (2, 2))
    entry, n = store.longest_prefix(lm, c1.token_ids)
    store.load(entry, lm, n, c1.token_ids)  # an access: c1 is now the most recently used
    p3 = store.put(c3)
    assert p1.exists() and p3.exists() and not p2.exists()
    assert store.nbytes <= store.max_bytes
    assert store.longest_prefix(lm, c2.token_ids) == (None, 0)
    # a context larger than the whole budget is not written at all
    tiny = DiskKVStore(tmp_path / "tiny", max_bytes=size // 2)
    assert tiny.put(c1) is None and not ns_files(tiny, lm)


def test_corrupt_file_is_skipped_with_a_warning_and_recomputed(lm, tmp_path):
    store = DiskKVStore(tmp_path / "kv")
    a = ids_of(600, 30)
    path = store.put(filled(lm, a))
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0xFF  # a flipped byte in the tensors: the header is fine, one block's CRC is not
    path.write_bytes(bytes(data))
    pool = ContextPool(lm, store=store)
    with pytest.warns(KVStoreWarning, match="checksum"):
        with pool.acquire(a + [5]) as lease:
            assert lease.restored == 0 and lease.sync.computed == 601
            assert_cache_matches_recompute(lease.ctx, TOL)
    assert not path.exists()  # never trusted, and not tried again


def test_foreign_file_is_skipped_with_a_warning(lm, tiny_dir_2k, tmp_path):
    other = load_model(str(tiny_dir_2k), device="cpu")
    with torch.no_grad():
        other.model.get_input_embeddings().weight[0] += 1.0
    other._fingerprint = None
    assert model_key(other) != model_key(lm)
    a = ids_of(400, 40)
    foreign = DiskKVStore(tmp_path / "other").put(filled(other, a))
    store = DiskKVStore(tmp_path / "kv")
    d = store.directory / model_key(lm)
    d.mkdir(parents=True)
    (d / foreign.name).write_bytes(foreign.read_bytes())  # copied into this model's directory
    pool = ContextPool(lm, store=store)
    with pytest.warns(KVStoreWarning, match="another model"):
        with pool.acquire(a + [5]) as lease:
            assert lease.restored == 0 and lease.sync.computed == 401
    with pytest.raises(Exception, match="another model or tokenizer"):
        read_context(lm, d / foreign.name)


def test_torn_write_is_ignored_and_truncated_file_skipped(lm, tmp_path):
    store = DiskKVStore(tmp_path / "kv")
    a = ids_of(600, 50)
    good = store.put(filled(lm, a))
    d = good.parent
    (d / f".{good.name}.123.deadbeef.tmp").write_bytes(good.read_bytes()[:5000])  # a writer that died
    truncated = d / ("ab" * 16 + ".safetensors")  # named as the store names its files: its own
    truncated.write_bytes(good.read_bytes()[:-4096])
    (d / "foreign.safetensors").write_bytes(good.read_bytes()[:-4096])  # not its naming: never deleted
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        entry, n = store.longest_prefix(lm, a)
    assert entry is not None and entry.path == good and n == 600  # the temp file is never read
    skipped = sorted(str(w.message) for w in seen if issubclass(w.category, KVStoreWarning))
    assert len(skipped) == 2 and all("truncated or padded" in w for w in skipped)
    assert truncated.name in skipped[0] and "foreign.safetensors" in skipped[1]
    assert not truncated.exists() and (d / f".{good.name}.123.deadbeef.tmp").exists()
    assert (d / "foreign.safetensors").exists()  # left in place, and not read or warned about again
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert store.longest_prefix(lm, a)[1] == 600
    assert not [w for w in seen if issubclass(w.category, KVStoreWarning)]
    ctx = store.load(entry, lm, n, a)
    assert_cache_matches_recompute(ctx, TOL)


def test_two_stores_share_a_directory(lm, tmp_path):
    """Two store objects (as two processes) see each other's files; one deleting is a miss for the other."""
    s1, s2 = DiskKVStore(tmp_path / "kv"), DiskKVStore(tmp_path / "kv")
    a = ids_of(500, 60)
    p = s1.put(filled(lm, a))
    entry, n = s2.longest_prefix(lm, a + [1])
    assert n == 500
    p.unlink()  # the other process evicted it between lookup and load
    assert s2.load(entry, lm, n, a + [1]) is None
    assert s2.longest_prefix(lm, a + [1]) == (None, 0)


_CHILD = textwrap.dedent("""
    import json, sys
    from flashback_agents import GenerationConfig, Message, load_model
    from flashback_agents.engines import local_engine
    model_dir, store_dir, out = sys.argv[1:4]
    lm = load_model(model_dir, device="cpu")
    engine = local_engine(lm, kv_store_dir=store_dir, acquire_timeout=None)
    msgs = json.loads(sys.argv[4])
    msgs = [Message(**m) for m in msgs]
    cfg = GenerationConfig(max_new_tokens=4, min_new_tokens=4)
    r1 = engine.chat(msgs[:2], config=cfg)
    msgs2 = msgs[:2] + [Message("assistant", r1.text), msgs[2]]
    r2 = engine.chat(msgs2, config=cfg)
    json.dump({"reply1": r1.text, "reply2": r2.text}, open(out, "w"))
    # no close(): the process just ends; the pool writes its contexts at exit
""")


@pytest.mark.slow
def test_a_restarted_process_continues_from_the_stored_context(lm, tiny_dir_2k, tmp_path):
    store_dir = tmp_path / "kv"
    tool = "2024-01-01 12:00:00 INFO server started on port 8080 ERROR disk full " * 12
    msgs = [{"role": "system", "content": "You are a log analysis agent. " * 8},
            {"role": "user", "content": "What went wrong? " + tool},
            {"role": "tool", "content": tool, "name": "grep"}]
    out = tmp_path / "child.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(tiny_dir_2k), str(store_dir), str(out), json.dumps(msgs)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    child = json.loads(out.read_text())
    files = sorted(store_dir.glob("*/*.safetensors"))
    assert files, "the first process left nothing on disk"
    stored = max((read_meta(p)["token_ids"] for p in files), key=len)

    # the second process (this one): same weights from the same directory, a new engine, the next step
    engine = local_engine(lm, kv_store_dir=store_dir, acquire_timeout=None)
    m = [Message(**d) for d in msgs]
    step = m[:2] + [Message("assistant", child["reply1"]), m[2], Message("assistant", child["reply2"]),
                    Message("tool", "grep: 3 matches", name="grep")]
    ids = engine.layout.render(step)
    from flashback_agents.context import common_prefix

    common = common_prefix(stored, ids)
    assert common >= BLOCK_TOKENS
    reply = engine.chat(step, config=GenerationConfig(max_new_tokens=2))
    assert reply.usage.cache_restored == common and reply.usage.cache_read == common
    assert reply.usage.computed == len(ids) - common  # only the new suffix is computed
    assert engine.kv_store.stats.restores == 1
    engine.close()


def test_engines_with_different_store_dirs_are_not_shared(tiny_dir_2k, tmp_path):
    a = shared_engine(str(tiny_dir_2k), kv_store_dir=tmp_path / "a")
    b = shared_engine(str(tiny_dir_2k), kv_store_dir=tmp_path / "b")
    c = shared_engine(str(tiny_dir_2k), kv_store_dir=str(tmp_path / "a"))
    plain = shared_engine(str(tiny_dir_2k))
    assert a is c and a is not b and plain is not a and plain.kv_store is None
    assert a.kv_store is shared_store(tmp_path / "a") and a.pool.store is a.kv_store
    for e in (a, b, plain):
        e.close()


def test_chatflashback_kv_store_dir(tiny_dir_2k, tmp_path):
    lc = pytest.importorskip("langchain_flashback")
    from langchain_core.messages import HumanMessage, SystemMessage

    llm = lc.ChatFlashBack(model=str(tiny_dir_2k), kv_store_dir=tmp_path / "kv", max_cached_bytes=1, max_tokens=2)
    store = llm.engine.kv_store
    assert store is not None and store.directory == (tmp_path / "kv").resolve()
    sys_msg = SystemMessage("You are a log analysis agent. " * 30)
    conv_a = [sys_msg, HumanMessage("first conversation " * 40)]
    conv_b = [sys_msg, HumanMessage("second conversation " * 40)]
    llm.invoke(conv_a)
    llm.invoke(conv_b)  # memory holds one: a goes to disk
    assert store.stats.writes >= 1
    before = store.stats.restores
    llm.invoke(conv_a + [HumanMessage("and now?")])
    assert store.stats.restores == before + 1
    llm.engine.close()


def test_llamaindex_kv_store_dir(tiny_dir_2k, tmp_path):
    li = pytest.importorskip("llama_index.llms.flashback")
    llm = li.FlashBack(model=str(tiny_dir_2k), kv_store_dir=str(tmp_path / "kv"), max_tokens=2)
    assert llm.engine.kv_store is not None and llm.engine.pool.store is llm.engine.kv_store
    llm.engine.close()


def test_bench_context_restore_and_bench_pool_smoke(tiny_dir_2k):
    from typer.testing import CliRunner

    from flashback_agents.cli import app

    res = CliRunner().invoke(app, ["bench", "context", "--restore", "--context", "600", "--repeats", "1",
                                   "-m", str(tiny_dir_2k), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{"):])
    assert data["context_tokens"] == 600 and data["logits_equal"] and data["restore_s"] > 0
    res = CliRunner().invoke(app, ["bench", "pool", "--conversations", "3", "--steps", "3", "--tokens", "160",
                                   "--generate", "2", "--hold", "1", "-m", str(tiny_dir_2k), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{"):])
    mem, disk = data["systems"]["memory"], data["systems"]["disk"]
    assert mem["tokens_restored"] == 0 and disk["tokens_restored"] > 0
    assert disk["tokens_recomputed"] < mem["tokens_recomputed"]
    assert disk["store"]["restores"] > 0 and "speedup" in data


def test_compaction_state_travels_with_the_stored_context(lm, tmp_path):
    """A compacted conversation restored from disk keeps its stubs: the re-sent full history matches."""
    store = DiskKVStore(tmp_path / "kv")
    pool = ContextPool(lm, max_bytes=1, max_context_tokens=900, on_overflow="evict", store=store)
    left, right = lm.marker_ids
    ids = ids_of(60, 70)
    for k in range(7):
        ids += [left] + ids_of(150, 71 + k) + [right] + ids_of(10, 90 + k)
    with pool.acquire(ids) as lease:
        assert lease.ctx.last_compaction is not None  # 1,200 tokens in a 900-token budget
        held = lease.ctx.token_ids
    with pool.acquire(ids_of(400, 99)):  # the compacted conversation goes to disk
        pass
    (path,) = [p for p in ns_files(store, lm) if read_meta(p)["token_ids"] == held[:len(read_meta(p)["token_ids"])]]
    assert read_meta(path)["evicted"]["stubs"]
    more = ids_of(5, 100)
    with pool.acquire(ids + more) as lease:  # the framework re-sends the full, uncompacted history
        assert lease.restored == len(held) and lease.sync.computed == 5
        assert lease.ctx.token_ids == held + more
        assert_cache_matches_recompute(lease.ctx, TOL)


def test_concurrent_writers_and_readers_share_a_directory(lm, tmp_path):
    import threading

    stores = [DiskKVStore(tmp_path / "kv", max_bytes=3 * 300 * 600) for _ in range(3)]
    ctxs = [filled(lm, ids_of(300, 200 + i)) for i in range(6)]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            s = stores[k % 3]
            for i in range(6):
                ctx = ctxs[(i + k) % 6]
                s.put(ctx)
                entry, n = s.longest_prefix(lm, ctx.token_ids)
                if entry is not None:
                    got = s.load(entry, lm, n, ctx.token_ids)
                    assert got is None or got.token_ids == ctx.token_ids[:n]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert not [w for w in seen if issubclass(w.category, KVStoreWarning)]  # a miss is never a "corrupt file"
    assert not list((tmp_path / "kv").glob("*/.*.tmp"))


def test_a_crafted_stub_record_or_rewritten_file_is_handled(lm, tmp_path):
    store = DiskKVStore(tmp_path / "kv")
    a = ids_of(400, 80)
    ctx = filled(lm, a)
    path = store.put(ctx)
    path.write_bytes(path.read_bytes()[:-10])  # damaged: skipped, deleted, warned
    other = DiskKVStore(tmp_path / "kv")  # as another process: it reads the header first
    with pytest.warns(KVStoreWarning, match="truncated"):
        assert other.longest_prefix(lm, a) == (None, 0)
    assert not path.exists()
    assert store.put(ctx) == path  # the same context written again, same name: found again
    assert other.longest_prefix(lm, a)[1] == 400
    # a stub record that parses but cannot be applied (a crafted key) is skipped, never raised
    entry, _ = other.longest_prefix(lm, a)
    entry.stubs = {"x+y:z": [1, 2]}
    with pytest.warns(KVStoreWarning, match="evicted blocks"):
        assert other.longest_prefix(lm, a, on_overflow="evict") == (None, 0)
