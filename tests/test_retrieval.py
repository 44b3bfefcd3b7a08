"""Retrieval: chunking, BM25 and Chroma stores (persistence across processes, offline), CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flashback_agents.retrieval import (ChunkingConfig, RetrievalError, chunk_text, index_paths, is_store,
                                        open_store)

REPO = Path(__file__).resolve().parents[1]

CORPUS = {
    "lobster.txt": "The European lobster is blue until it is cooked.\nIt lives in the eastern Atlantic Ocean.\n",
    "paris.md": "# Cities\nParis is the capital of France and sits on the Seine.\n",
    "code/math.py": "def add(a, b):\n    \"\"\"Add two integers.\"\"\"\n    return a + b\n",
}


def write_corpus(root: Path) -> Path:
    for name, text in CORPUS.items():
        p = root / "docs" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root / "docs"


@pytest.fixture
def tok(tiny_lm):
    return tiny_lm.tokenizer


# ------------------------------------------------------------------------------------ chunking
def test_chunks_are_verbatim_slices_with_exact_line_ranges(tok):
    lines = [f"line {i}: the server answered request number {i} with status {200 + i % 3}" for i in range(1, 41)]
    text = "\n".join(lines) + "\n"
    chunks = chunk_text(text, "log.txt", tok, ChunkingConfig(chunk_tokens=40, overlap=8))
    assert len(chunks) > 5
    for c in chunks:
        assert c.text in text and len(tok(c.text, add_special_tokens=False)["input_ids"]) <= 40 + 1
        first = c.text.strip().splitlines()[0]
        last = c.text.strip().splitlines()[-1]
        assert first in lines[c.start_line - 1], (c.start_line, first)
        assert last in lines[c.end_line - 1], (c.end_line, last)
    # overlap: each chunk starts before the previous one ended, and together they cover the text
    for a, b in zip(chunks, chunks[1:]):
        assert text.index(b.text) < text.index(a.text) + len(a.text)
    assert chunks[0].start_line == 1 and chunks[-1].end_line == 40
    # stable ids: same text, same ids; other source, other ids
    again = chunk_text(text, "log.txt", tok, ChunkingConfig(chunk_tokens=40, overlap=8))
    assert [c.id for c in again] == [c.id for c in chunks]
    assert chunk_text(text, "other.txt", tok, ChunkingConfig(40, 8))[0].id != chunks[0].id


def test_chunking_config_is_validated(tok):
    with pytest.raises(RetrievalError, match="overlap"):
        chunk_text("hello world", "x", tok, ChunkingConfig(chunk_tokens=16, overlap=16))
    with pytest.raises(RetrievalError, match="chunk_tokens"):
        chunk_text("hello world", "x", tok, ChunkingConfig(chunk_tokens=2, overlap=0))


# ---------------------------------------------------------------------------------------- BM25
def test_bm25_returns_the_expected_chunk_and_persists(tmp_path, tiny_model_dir):
    docs = write_corpus(tmp_path)
    store = tmp_path / "store"
    rep = index_paths([docs], store, "bm25", tokenizer=str(tiny_model_dir), progress=False)
    assert rep.files == 3 and rep.chunks_added == 3 and rep.chunks_total == 3 and is_store(store)
    hits = open_store(store).retrieve("what colour is the lobster before cooking", 2)
    assert hits[0].metadata["source"].endswith("lobster.txt")
    assert (hits[0].metadata["start_line"], hits[0].metadata["end_line"]) == (1, 2)
    hits = open_store(store).retrieve("capital of France", 1)
    assert len(hits) == 1 and "Paris" in hits[0].text
    assert open_store(store).retrieve("zzzz qqqq", 3) == []  # nothing shares a term: nothing returned


def test_reindex_is_idempotent_and_follows_changes_and_deletions(tmp_path, tiny_model_dir):
    docs = write_corpus(tmp_path)
    store = tmp_path / "store"
    kw = dict(tokenizer=str(tiny_model_dir), progress=False)
    index_paths([docs], store, "bm25", **kw)
    rep = index_paths([docs], store, **kw)
    assert (rep.chunks_added, rep.chunks_removed, rep.chunks_unchanged, rep.chunks_total) == (0, 0, 3, 3)
    (docs / "lobster.txt").write_text("The lobster article was rewritten about crabs.\n", encoding="utf-8")
    rep = index_paths([docs], store, **kw)
    assert (rep.chunks_added, rep.chunks_removed, rep.chunks_total) == (1, 1, 3)
    r = open_store(store)
    assert "crabs" in r.retrieve("lobster", 1)[0].text
    assert not any("blue" in d.text for d in r.retrieve("blue cooked lobster", 3))
    (docs / "paris.md").unlink()
    rep = index_paths([docs], store, **kw)
    assert rep.chunks_removed == 1 and rep.chunks_total == 2
    assert open_store(store).retrieve("capital France Paris", 3) == []
    # a single deleted file named explicitly is dropped too
    (docs / "code" / "math.py").unlink()
    rep = index_paths([docs / "code" / "math.py"], store, **kw)
    assert rep.chunks_removed == 1 and rep.chunks_total == 1


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors_and_store_stays_usable(tmp_path, tiny_model_dir):
    docs = write_corpus(tmp_path)
    store = tmp_path / "store"
    kw = dict(tokenizer=str(tiny_model_dir), progress=False)
    with pytest.raises(RetrievalError, match="No store at"):
        open_store(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(RetrievalError, match="no text"):
        index_paths([empty], tmp_path / "s2", "bm25", **kw)
    assert not (tmp_path / "s2").exists()  # nothing was created
    with pytest.raises(RetrievalError, match="No such file"):
        index_paths([tmp_path / "nope.txt"], tmp_path / "s3", "bm25", **kw)

    index_paths([docs], store, "bm25", **kw)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(RetrievalError, match="binary"):
        index_paths([binary], store, **kw)
    with pytest.raises(RetrievalError, match=r"not UTF-8 text \(invalid byte 0xe9 at offset 3\)"):
        index_paths([latin1, docs], store, **kw)
    with pytest.raises(RetrievalError, match="built with the bm25 retriever"):
        index_paths([docs], store, "chroma", **kw)
    with pytest.raises(RetrievalError, match="not a flashback-agents store"):
        index_paths([docs], docs, "bm25", **kw)
    # the store is intact and usable
    r = open_store(store)
    assert r.count() == 3 and "lobster" in r.retrieve("lobster", 1)[0].text
    # in a directory walk, bad files are skipped (and reported), not fatal
    (docs / "blob.bin").write_bytes(binary.read_bytes())
    rep = index_paths([docs], store, **kw)
    assert rep.chunks_total == 3 and len(rep.skipped) == 1 and "binary" in rep.skipped[0]


def test_cli_errors_are_one_line_without_traceback(tmp_path, tiny_model_dir):
    from flashback_agents.cli import app

    runner = CliRunner()
    docs = write_corpus(tmp_path)
    store = tmp_path / "store"
    res = runner.invoke(app, ["search", "--store", str(tmp_path / "missing"), "hello"])
    assert res.exit_code == 2 and "error: No store at" in res.output and "Traceback" not in res.output
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x00\x01" * 50)
    res = runner.invoke(app, ["index", str(blob), "--store", str(store), "--retriever", "bm25",
                              "--tokenizer", str(tiny_model_dir)])
    assert res.exit_code == 2 and "error:" in res.output and "binary" in res.output
    assert "Traceback" not in res.output and not store.exists()
    res = runner.invoke(app, ["index", str(docs), "--store", str(store), "--retriever", "bm25",
                              "--tokenizer", str(tiny_model_dir), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["search", "--store", str(store), "capital of France", "-k", "1", "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.output[res.output.index("["):])
    assert len(hits) == 1 and hits[0]["metadata"]["source"].endswith("paris.md")


# -------------------------------------------------------------------------------------- Chroma
_GUARD = textwrap.dedent("""
    import atexit, ipaddress, socket, sys
    ATTEMPTS = []  # recorded even if a library swallows the error
    atexit.register(lambda: sys.stderr.write(f"\\nnetwork attempts: {ATTEMPTS!r}\\n"))
    def _local(addr):
        if not isinstance(addr, tuple):
            return True  # AF_UNIX
        host = addr[0]
        if host in ("localhost", ""):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False
    _connect = socket.socket.connect
    def guarded_connect(self, addr):
        if not _local(addr):
            ATTEMPTS.append(repr(addr))
            raise RuntimeError(f"network access attempted: {addr!r}")
        return _connect(self, addr)
    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = lambda self, addr: guarded_connect(self, addr) or 0
    _gai = socket.getaddrinfo
    def guarded_gai(host, *a, **k):
        if host not in (None, "localhost") and not _local((host,)):
            ATTEMPTS.append(repr(host))
            raise RuntimeError(f"DNS lookup attempted: {host!r}")
        return _gai(host, *a, **k)
    socket.getaddrinfo = guarded_gai
""")


def _run(code: str, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", _GUARD + textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "network attempts: []" in proc.stderr, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_chroma_persists_across_processes_and_never_touches_the_network(tmp_path, tiny_model_dir):
    docs = write_corpus(tmp_path)
    out = _run(f"""
        import json
        from flashback_agents.retrieval import index_paths, open_store
        rep = index_paths([{str(docs)!r}], "store", "chroma", tokenizer={str(tiny_model_dir)!r}, progress=False)
        r = open_store("store")
        print(json.dumps({{"added": rep.chunks_added, "total": rep.chunks_total,
                          "telemetry": r.client.get_settings().anonymized_telemetry}}))
    """, tmp_path)
    assert out == {"added": 3, "total": 3, "telemetry": False}
    out = _run(f"""
        import json
        from flashback_agents.retrieval import RetrievalError, index_paths, open_store
        r = open_store("store")
        hits = r.retrieve("Which city is the capital of France?", 2)
        fish = r.retrieve("blue crustacean in the Atlantic", 1)
        rep = index_paths([{str(docs)!r}], "store", tokenizer={str(tiny_model_dir)!r}, progress=False)
        try:
            r.retrieve("word " * 400, 1)
            err = None
        except RetrievalError as exc:
            err = str(exc)
        print(json.dumps({{"first": hits[0].metadata["source"], "lines": [hits[0].metadata["start_line"],
                          hits[0].metadata["end_line"]], "score": hits[0].score, "fish": fish[0].text,
                          "added": rep.chunks_added, "unchanged": rep.chunks_unchanged, "count": r.count(),
                          "err": err}}))
    """, tmp_path)
    assert out["first"].endswith("paris.md") and out["lines"] == [1, 2] and out["score"] > 0.3
    assert "lobster" in out["fish"]
    assert (out["added"], out["unchanged"], out["count"]) == (0, 3, 3)
    assert out["err"] and "embedding model reads at most 256" in out["err"]
