"""The disk tier of the context pool (issue 19): round trips equal a recompute, longest prefix across
memory and disk, the disk budget, corrupt / foreign / torn files never trusted, and a second process
continuing an agent run from the first one's stored context.

The disk tier touches only what it wrote, and no stored file can break a call.

Ownership: its byte budget, ``clear()`` and the clean-up of dead writers' temporary files delete only
``<model key>/<content hash>.safetensors`` (and their ``.tmp``) in real sub-directories of the store:
a model's ``model.safetensors``, other folders, anything behind a symbolic link are left alone.

Malformed files: a header with bad ``data_offsets``, one nested 100k levels deep, or a FIFO named
``*.safetensors`` is skipped with :class:`KVStoreWarning` (a FIFO without being opened), and the
engine keeps answering.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from flashback_agents import CachedContext, ContextLoadError, ContextPool, GenerationConfig, Message, load_model
from flashback_agents.engines import local_engine, shared_engine
from flashback_agents.testing import assert_cache_matches_recompute, run_in_thread
from flashback_agents.kvstore import (BLOCK_TOKENS, FORMAT, MARKER, DiskKVStore, KVStoreWarning, model_key,
                                      read_context, read_meta, shared_store)

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


# --------------------------------------------------------------------------- ownership and malformed files
OLD = time.time() - 7200  # two hours ago: older than the store's one-hour limit for temporary files


def _write(path: Path, data: bytes, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def foreign_layout(root: Path, outside: Path, lm) -> dict[str, Path]:
    """Files a store at ``root`` did not write, some reached only through symbolic links."""
    blob = os.urandom(50_000)
    files = {
        "top model": _write(root / "model.safetensors", blob, OLD),
        "model dir": _write(root / "llama" / "model.safetensors", blob, OLD),
        "nested": _write(root / "x" / "y.safetensors", blob, OLD),
        "old tmp": _write(root / "llama" / "old.tmp", b"partial", OLD),
        "behind link": _write(outside / "a" / "z.safetensors", blob, OLD),
        "behind link tmp": _write(outside / "a" / "old.tmp", b"partial", OLD),
        # a symlinked directory named like a model key, holding files named like the store's own
        "behind key link": _write(outside / "k" / ("cd" * 16 + ".safetensors"), blob, OLD),
        "behind key link tmp": _write(outside / "k" / f".{'cd' * 16}.safetensors.1.deadbeef.tmp", b"x", OLD),
        # a context CachedContext.save wrote, copied into this model's directory: read, never deleted
        "saved": root / model_key(lm) / "saved.safetensors",
    }
    (root / "link").symlink_to(outside / "a", target_is_directory=True)
    (root / ("ef" * 12)).symlink_to(outside / "k", target_is_directory=True)
    ctx = filled(lm, ids_of(40, 99))
    files["saved"].parent.mkdir(parents=True, exist_ok=True)
    ctx.save(files["saved"])
    os.utime(files["saved"], (OLD, OLD))
    return files


def _intact(files: dict[str, Path], before: dict[str, bytes]) -> None:
    for name, path in files.items():
        assert path.exists(), f"the store deleted a file it did not write: {name} ({path})"
        assert path.read_bytes() == before[name], name


def test_clear_and_budget_delete_only_the_stores_own_files(tiny_lm, tmp_path):
    root, outside = tmp_path / "models", tmp_path / "outside"
    files = foreign_layout(root, outside, tiny_lm)
    before = {k: p.read_bytes() for k, p in files.items()}
    probe = DiskKVStore(tmp_path / "probe", min_tokens=8).put(filled(tiny_lm, ids_of(40, 1)))
    size = probe.stat().st_size
    store = DiskKVStore(root, max_bytes=int(size * 1.5), min_tokens=8)
    paths = []
    for seed in (1, 2, 3):  # each put is over the budget with the one before: the older one goes
        paths.append(store.put(filled(tiny_lm, ids_of(40, seed))))
        assert paths[-1] is not None and paths[-1].exists()
        _intact(files, before)
    assert store.stats.evicted_files == 2 and not paths[0].exists() and not paths[1].exists()
    assert store.nbytes == paths[2].stat().st_size  # foreign files are not counted in the budget
    # a dead writer's temporary file of the store's own is cleaned up; nobody else's is
    own_tmp = _write(paths[2].parent / f".{'ab' * 16}.safetensors.7.0badf00d.tmp", b"partial", OLD)
    store.put(filled(tiny_lm, ids_of(40, 4)))
    assert not own_tmp.exists()
    _intact(files, before)
    store.clear()
    assert not list((root / model_key(tiny_lm)).glob("[0-9a-f]" * 32 + ".safetensors"))
    _intact(files, before)
    assert store.nbytes == 0


def test_the_saved_context_in_the_store_is_still_used(tiny_lm, tmp_path):
    root = tmp_path / "kv"
    ids = ids_of(300, 5)  # more than one 256-token block: an index entry
    saved = root / model_key(tiny_lm) / "saved.safetensors"
    saved.parent.mkdir(parents=True)
    filled(tiny_lm, ids).save(saved)
    store = DiskKVStore(root, min_tokens=8, max_bytes=1)
    entry, n = store.longest_prefix(tiny_lm, ids + [5])
    assert entry is not None and entry.path == saved and n == 300
    store.clear()
    assert saved.exists()


def test_a_key_directory_that_is_a_symlink_is_never_followed(tiny_lm, tmp_path):
    root, outside = tmp_path / "kv", tmp_path / "elsewhere"
    outside.mkdir()
    root.mkdir()
    (root / model_key(tiny_lm)).symlink_to(outside, target_is_directory=True)
    ctx = filled(tiny_lm, ids_of(40, 6))
    ctx.save(outside / ("ab" * 16 + ".safetensors"))
    store = DiskKVStore(root, min_tokens=8)
    with pytest.warns(KVStoreWarning, match="symbolic link"):
        assert store.longest_prefix(tiny_lm, ctx.token_ids) == (None, 0)  # not read through the link
    assert store.put(filled(tiny_lm, ids_of(40, 7))) is None  # not written through it
    store.clear()
    assert sorted(p.name for p in outside.iterdir()) == ["ab" * 16 + ".safetensors"]


def test_a_new_store_directory_is_marked(tmp_path):
    DiskKVStore(tmp_path / "new")
    assert "flashback-agents KV store" in (tmp_path / "new" / MARKER).read_text()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "model.safetensors").write_bytes(b"x")
    DiskKVStore(tmp_path / "used")
    assert not (tmp_path / "used" / MARKER).exists()  # a directory with other files is not claimed


# ------------------------------------------------------------------ malformed files
def raw_file(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _meta_header(**tensors) -> dict:
    return {**tensors, "__metadata__": {"format": FORMAT, "meta": "{}"}}


def _offsets(value) -> bytes:
    return raw_file(json.dumps(_meta_header(**{"k.0": {"dtype": "F32", "shape": [1], "data_offsets": value}})).encode(),
                    b"\0" * 4)


DEEP = 100_000
CRAFTED: dict[str, bytes] = {
    "offsets-str": _offsets("ab"),
    "offsets-short": _offsets([0]),
    "offsets-long": _offsets([0, 4, 8]),
    "offsets-null": _offsets(None),
    "offsets-dict": _offsets({"1": 4}),
    "offsets-str-items": _offsets([0, "4"]),
    "offsets-bool": _offsets([False, True]),
    "offsets-reversed": _offsets([4, 0]),
    "tensor-not-object": raw_file(json.dumps(_meta_header(**{"k.0": [1, 2]})).encode()),
    "header-deep": raw_file(b'{"k.0": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    "meta-deep": raw_file(json.dumps({"__metadata__": {"format": FORMAT, "meta": "[" * DEEP + "]" * DEEP}}).encode()),
    "meta-deep-object": raw_file(json.dumps({"__metadata__": {"format": FORMAT,
                                                               "meta": '{"a":' * DEEP + "1" + "}" * DEEP}}).encode()),
}


def _name(i: int) -> str:
    return f"{i:032x}.safetensors"


@pytest.mark.parametrize("case", list(CRAFTED))
def test_each_malformed_file_is_a_context_load_error(tiny_lm, tmp_path, case):
    path = _write(tmp_path / "c.safetensors", CRAFTED[case])
    with pytest.raises(ContextLoadError):
        read_meta(path)
    with pytest.raises(ContextLoadError):
        read_context(tiny_lm, path)
    with pytest.raises(ContextLoadError):
        CachedContext.load(tiny_lm, path)


def _in_thread(fn, deadline: float = 20.0):
    return run_in_thread(fn, deadline)


def _unblock(fifo: Path) -> None:
    """Let a reader stuck on the FIFO go (only the unfixed store gets stuck there)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_malformed_files_and_a_fifo_are_skipped_and_the_engine_keeps_answering(tiny_lm, tmp_path):
    root = tmp_path / "kv"
    engine = local_engine(tiny_lm, kv_store_dir=root)
    d = root / model_key(tiny_lm)
    d.mkdir(parents=True)
    for i, data in enumerate(CRAFTED.values()):
        _write(d / _name(i), data)
    fifo = d / _name(len(CRAFTED))
    os.mkfifo(fifo)
    msgs = [Message("user", "hello there")]
    cfg = GenerationConfig(max_new_tokens=2)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            done, value = _in_thread(lambda: engine.chat(msgs, config=cfg))
        assert done, "a call blocked on a FIFO in the store"
    finally:
        _unblock(fifo)
    assert not isinstance(value, BaseException), repr(value)
    assert value.text is not None
    warned = [str(w.message) for w in seen if issubclass(w.category, KVStoreWarning)]
    for i in range(len(CRAFTED) + 1):
        assert sum(_name(i) in w for w in warned) == 1, (i, warned)
    assert any("not a regular file" in w for w in warned)
    # every later call: nothing raised, nothing warned again, the FIFO still never opened
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        done, value = _in_thread(lambda: engine.chat(msgs, config=cfg))
    _unblock(fifo)
    assert done and not isinstance(value, BaseException), repr(value)
    assert not [w for w in seen if issubclass(w.category, KVStoreWarning)]
    assert fifo.exists()


def test_a_fifo_passed_to_the_readers_is_refused_without_blocking(tiny_lm, tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs FIFOs")
    fifo = tmp_path / "c.safetensors"
    os.mkfifo(fifo)
    try:
        for fn in (read_meta, lambda p: read_context(tiny_lm, p)):
            done, value = _in_thread(lambda: fn(fifo), deadline=10)
            assert done, "blocked on a FIFO"
            assert isinstance(value, ContextLoadError) and "regular file" in str(value), repr(value)
    finally:
        _unblock(fifo)


def test_a_new_store_directory_is_private_to_its_owner(tmp_path):
    """The checksums catch damage, not tampering (kvstore's **Trust** note): a new store directory is
    created owner-only, so only those trusted with the weights can write stored values."""
    old = os.umask(0o022)
    try:
        DiskKVStore(tmp_path / "new" / "kv")
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "kv").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "new" / "kv" / MARKER).exists()
