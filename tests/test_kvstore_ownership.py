"""The disk tier touches only what it wrote, and no stored file can break a call.

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
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from flashback_agents import CachedContext, ContextLoadError, GenerationConfig, Message
from flashback_agents.engines import local_engine
from flashback_agents.kvstore import FORMAT, MARKER, DiskKVStore, KVStoreWarning, model_key, read_context, read_meta

pytestmark = pytest.mark.filterwarnings("ignore::flashback_agents.pool.PoolBudgetWarning")

OLD = time.time() - 7200  # two hours ago: older than the store's one-hour limit for temporary files


def ids_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 440, (n,), generator=g).tolist()


def filled(lm, ids) -> CachedContext:
    ctx = CachedContext(lm)
    ctx.append(ids)
    return ctx


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
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            out["value"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(deadline)
    return (not t.is_alive()), out.get("value")


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
