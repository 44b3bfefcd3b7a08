"""Every command and subcommand of ``flashback-agents`` with bad arguments: exit code 2, an ``error:`` line,
no traceback (reliability issue, item 10).

Bad arguments are negative / NaN / infinite numbers, values of the wrong type, missing or unreadable files,
a file where a directory is expected (and the reverse), garbage model / adapter / GGUF files made in
``tmp_path``, and non-UTF-8 stdin for ``chat``. No case loads the real default model: options are checked
before any model loads, and the cases that need a model get a garbage one or the tiny random one.
One parametrized case per command line (the ids name them): ``pytest -q tests/test_cli_sweep.py`` counts them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from typer.testing import CliRunner

from flashback_agents.cli import app
from flashback_agents.models import SHIPPED_ADAPTERS

runner = CliRunner()
GOOD_ADAPTER = SHIPPED_ADAPTERS / "smollm2-135m-instruct"  # valid JSON; never loaded by these cases


@pytest.fixture(scope="module")
def f(tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    """The files the cases point at (all under one scratch directory)."""
    d = tmp_path_factory.mktemp("cli-sweep")
    n = SimpleNamespace(d=d, tiny=str(tiny_model_dir), missing=str(d / "missing"), out=str(d / "out"))
    (d / "a-file.txt").write_text("hello world\n")
    n.file = str(d / "a-file.txt")
    (d / "a-dir").mkdir()
    n.dir = str(d / "a-dir")
    # GGUF files: empty, random bytes, a damaged header
    (d / "empty.gguf").write_bytes(b"")
    (d / "garbage.gguf").write_bytes(os.urandom(512))
    (d / "header.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 16 + os.urandom(64))
    n.empty_gguf, n.garbage_gguf, n.header_gguf = (str(d / x) for x in ("empty.gguf", "garbage.gguf", "header.gguf"))
    # model directories: unreadable config, truncated weights, no tokenizer
    (d / "bad-config").mkdir()
    (d / "bad-config" / "config.json").write_text("{not json")
    n.bad_config = str(d / "bad-config")
    trunc = d / "truncated"
    trunc.mkdir()
    for p in Path(tiny_model_dir).iterdir():
        data = p.read_bytes()
        (trunc / p.name).write_bytes(data[: len(data) // 2] if p.suffix == ".safetensors" else data)
    n.truncated = str(trunc)
    notok = d / "no-tokenizer"
    notok.mkdir()
    for p in Path(tiny_model_dir).iterdir():
        if not p.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (notok / p.name).write_bytes(p.read_bytes())
    n.no_tokenizer = str(notok)
    # adapters: garbage adapter_config.json, garbage flashback_adapter.json, a list instead of an object
    for name, files in (("bad-adapter", {"adapter_config.json": "{garbage"}),
                        ("bad-meta", {"adapter_config.json": "{}", "flashback_adapter.json": "\x00\x01 not json"}),
                        ("list-adapter", {"adapter_config.json": "[1, 2]"})):
        (d / name).mkdir()
        for fname, text in files.items():
            (d / name / fname).write_text(text)
    n.bad_adapter, n.bad_meta, n.list_adapter = (str(d / x) for x in ("bad-adapter", "bad-meta", "list-adapter"))
    # a valid transcript file (so train gets past its data)
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (d / "t.jsonl").write_text(json.dumps(conv) + "\n")
    n.data = str(d / "t.jsonl")
    return n


def _train(f, *extra: str) -> list[str]:
    return ["train", "--data", f.data, "--out", f.out, "--model", f.tiny, *extra]


def _gen(f, *extra: str) -> list[str]:
    return ["generate", "--store", f.dir, "--prompt", "hi", "--model", f.tiny, *extra]


def _index(f, *extra: str) -> list[str]:
    return ["index", f.file, "--store", str(f.d / "store"), "--retriever", "bm25", "--tokenizer", f.tiny, *extra]


#: case id -> command line (built from the fixture's files)
CASES: dict[str, Callable[[SimpleNamespace], list[str]]] = {
    # the root group
    "root-unknown-option": lambda f: ["--bogus"],
    "root-unknown-command": lambda f: ["chatt"],
    "bench-unknown-command": lambda f: ["bench", "warp"],
    "eval-unknown-command": lambda f: ["eval", "vibes"],
    # chat
    "chat-max-new-tokens-negative": lambda f: ["chat", "--max-new-tokens", "-5"],
    "chat-max-new-tokens-zero": lambda f: ["chat", "--max-new-tokens", "0"],
    "chat-max-new-tokens-not-int": lambda f: ["chat", "--max-new-tokens", "ten"],
    "chat-temperature-nan": lambda f: ["chat", "--temperature", "nan"],
    "chat-temperature-inf": lambda f: ["chat", "--temperature", "inf"],
    "chat-temperature-negative": lambda f: ["chat", "--temperature", "-1"],
    "chat-model-missing-path": lambda f: ["chat", "--model", f.missing + "/model"],
    "chat-model-empty-gguf": lambda f: ["chat", "--model", f.empty_gguf],
    "chat-model-garbage-gguf": lambda f: ["chat", "--model", f.garbage_gguf],
    "chat-model-damaged-gguf-header": lambda f: ["chat", "--model", f.header_gguf],
    "chat-model-unreadable-config": lambda f: ["chat", "--model", f.bad_config],
    "chat-model-truncated-weights": lambda f: ["chat", "--model", f.truncated],
    "chat-model-no-tokenizer": lambda f: ["chat", "--model", f.no_tokenizer],
    "chat-model-is-a-plain-file": lambda f: ["chat", "--model", f.file],
    "chat-adapter-not-an-adapter": lambda f: ["chat", "--model", f.tiny, "--adapter", f.dir],
    "chat-adapter-garbage-json": lambda f: ["chat", "--model", f.tiny, "--adapter", f.bad_adapter],
    # info
    "info-load-garbage-gguf": lambda f: ["info", "--load", "--model", f.garbage_gguf],
    "info-load-truncated-weights": lambda f: ["info", "--load", "--model", f.truncated],
    "info-load-unknown-spec": lambda f: ["info", "--load", "--model", "no-such-model"],
    # index / search / generate
    "index-missing-path": lambda f: ["index", f.missing, "--store", str(f.d / "s1")],
    "index-store-is-a-file": lambda f: ["index", f.dir, "--store", f.file],
    "index-chunk-tokens-negative": lambda f: _index(f, "--chunk-tokens", "-5"),
    "index-overlap-negative": lambda f: _index(f, "--overlap", "-1"),
    "index-overlap-not-below-chunk": lambda f: _index(f, "--chunk-tokens", "32", "--overlap", "32"),
    "index-port-out-of-range": lambda f: _index(f, "--chroma-port", "70000"),
    "index-unknown-retriever": lambda f: ["index", f.file, "--store", str(f.d / "s2"), "--retriever", "faiss"],
    "search-k-zero": lambda f: ["search", "q", "--store", f.dir, "-k", "0"],
    "search-k-not-int": lambda f: ["search", "q", "--store", f.dir, "-k", "many"],
    "search-store-is-a-file": lambda f: ["search", "q", "--store", f.file],
    "generate-stride-negative": lambda f: _gen(f, "--stride", "-5"),
    "generate-query-tokens-zero": lambda f: _gen(f, "--query-tokens", "0"),
    "generate-top-k-negative": lambda f: _gen(f, "--top-k", "-1"),
    "generate-unknown-pattern": lambda f: _gen(f, "--pattern", "sideways"),
    "generate-max-new-tokens-negative": lambda f: _gen(f, "--max-new-tokens", "-5"),
    "generate-adapter-missing": lambda f: _gen(f, "--adapter", f.missing),
    "generate-store-is-a-file": lambda f: ["generate", "--store", f.file, "--prompt", "hi"],
    # train
    "train-lr-nan": lambda f: _train(f, "--lr", "nan"),
    "train-lr-inf": lambda f: _train(f, "--lr", "inf"),
    "train-lr-negative": lambda f: _train(f, "--lr", "-0.1"),
    "train-mixed-precision-fp8": lambda f: _train(f, "--mixed-precision", "fp8"),
    "train-out-is-a-file": lambda f: ["train", "--data", f.data, "--out", f.file],
    "train-out-under-a-file": lambda f: ["train", "--data", f.data, "--out", f.file + "/adapter"],
    "train-steps-zero": lambda f: _train(f, "--steps", "0"),
    "train-batch-size-negative": lambda f: _train(f, "--batch-size", "-2"),
    "train-grad-accum-zero": lambda f: _train(f, "--grad-accum", "0"),
    "train-max-length-zero": lambda f: _train(f, "--max-length", "0"),
    "train-warmup-negative": lambda f: _train(f, "--warmup-steps", "-1"),
    "train-lora-dropout-above-one": lambda f: _train(f, "--lora-dropout", "1.5"),
    "train-lora-dropout-nan": lambda f: _train(f, "--lora-dropout", "nan"),
    "train-lora-r-zero": lambda f: _train(f, "--lora-r", "0"),
    "train-seed-negative": lambda f: _train(f, "--seed", "-1"),
    "train-seed-too-large": lambda f: _train(f, "--seed", str(2**70)),
    "train-threads-negative": lambda f: _train(f, "--threads", "-1"),
    "train-stop-after-zero": lambda f: _train(f, "--stop-after", "0"),
    "train-data-missing": lambda f: ["train", "--data", f.missing, "--out", f.out],
    "train-ralm-corpus-missing": lambda f: ["train", "--ralm-corpus", f.missing, "--out", f.out],
    "train-retriever-store-is-a-file": lambda f: ["train", "--ralm-corpus", f.file, "--retriever-store", f.file,
                                                  "--out", f.out],
    "train-steps-not-int": lambda f: _train(f, "--steps", "lots"),
    "train-model-truncated-weights": lambda f: ["train", "--data", f.data, "--out", f.out, "--model", f.truncated],
    # export
    "export-adapter-garbage-json": lambda f: ["export", "--adapter", f.bad_adapter, "--out", f.out],
    "export-adapter-garbage-meta-json": lambda f: ["export", "--adapter", f.bad_meta, "--out", f.out],
    "export-adapter-json-not-an-object": lambda f: ["export", "--adapter", f.list_adapter, "--out", f.out],
    "export-adapter-missing": lambda f: ["export", "--adapter", f.missing, "--out", f.out],
    "export-adapter-is-a-file": lambda f: ["export", "--adapter", f.file, "--out", f.out],
    "export-adapter-not-an-adapter": lambda f: ["export", "--adapter", f.dir, "--out", f.out],
    "export-out-is-a-file": lambda f: ["export", "--adapter", str(GOOD_ADAPTER), "--out", f.file],
    "export-unknown-dtype": lambda f: ["export", "--adapter", str(GOOD_ADAPTER), "--out", f.out, "--dtype", "float8"],
    "export-unknown-base": lambda f: ["export", "--adapter", str(GOOD_ADAPTER), "--out", f.out, "--base", "no-such-model"],
    "export-gguf-is-a-dir": lambda f: ["export", "--adapter", str(GOOD_ADAPTER), "--out", f.out, "--gguf", f.dir],
    "export-gguf-base-missing": lambda f: ["export", "--adapter", str(GOOD_ADAPTER), "--out", f.out, "--gguf",
                                           str(f.d / "m.gguf"), "--gguf-base", f.missing + ".gguf"],
    "export-gguf-dtype-q4": lambda f: ["export", "--adapter", str(GOOD_ADAPTER), "--out", f.out, "--gguf",
                                       str(f.d / "m.gguf"), "--gguf-dtype", "q4_0"],
    # bench context / decode / pool / agent / long / shift-drift / ralm
    "bench-context-negative": lambda f: ["bench", "context", "--context", "-5"],
    "bench-context-not-ints": lambda f: ["bench", "context", "--context", "64,lots"],
    "bench-context-append-zero": lambda f: ["bench", "context", "--append", "0"],
    "bench-context-repeats-negative": lambda f: ["bench", "context", "--repeats", "-1"],
    "bench-context-plot-is-a-dir": lambda f: ["bench", "context", "--plot", f.dir],
    "bench-context-store-dir-is-a-file": lambda f: ["bench", "context", "--restore", "--store-dir", f.file],
    "bench-context-model-garbage-gguf": lambda f: ["bench", "context", "--model", f.garbage_gguf, "--context", "64"],
    "bench-decode-context-negative": lambda f: ["bench", "decode", "--context", "-5"],
    "bench-decode-context-empty": lambda f: ["bench", "decode", "--context", ","],
    "bench-decode-tokens-zero": lambda f: ["bench", "decode", "--tokens", "0"],
    "bench-decode-model-no-tokenizer": lambda f: ["bench", "decode", "--model", f.no_tokenizer, "--context", "64"],
    "bench-pool-conversations-zero": lambda f: ["bench", "pool", "--conversations", "0"],
    "bench-pool-unknown-system": lambda f: ["bench", "pool", "--systems", "tape"],
    "bench-pool-generate-negative": lambda f: ["bench", "pool", "--generate", "-1"],
    "bench-pool-store-dir-is-a-file": lambda f: ["bench", "pool", "--store-dir", f.file],
    "bench-pool-model-truncated": lambda f: ["bench", "pool", "--model", f.truncated, "--conversations", "2",
                                             "--steps", "1", "--tokens", "16", "--hold", "1"],
    "bench-agent-steps-zero": lambda f: ["bench", "agent", "--steps", "0"],
    "bench-agent-unknown-backend": lambda f: ["bench", "agent", "--backend", "carrier-pigeon"],
    "bench-agent-plot-is-a-dir": lambda f: ["bench", "agent", "--plot", f.dir],
    "bench-agent-model-unreadable-config": lambda f: ["bench", "agent", "--quick", "--model", f.bad_config],
    "bench-long-budget-negative": lambda f: ["bench", "long", "--budget", "-5"],
    "bench-long-generate-zero": lambda f: ["bench", "long", "--generate", "0"],
    "bench-long-tool-tokens-negative": lambda f: ["bench", "long", "--tool-tokens", "-1"],
    "bench-shift-drift-budget-zero": lambda f: ["bench", "shift-drift", "--budget", "0"],
    "bench-shift-drift-model-empty-gguf": lambda f: ["bench", "shift-drift", "--model", f.empty_gguf],
    "bench-ralm-data-missing": lambda f: ["bench", "ralm", "--data", f.missing],
    "bench-ralm-data-is-a-file": lambda f: ["bench", "ralm", "--data", f.file],
    "bench-ralm-plot-is-a-dir": lambda f: ["bench", "ralm", "--plot", f.dir],
    "bench-ralm-model-truncated": lambda f: ["bench", "ralm", "--model", f.truncated],
    # eval ppl / agents / docqa
    "eval-ppl-tokens-negative": lambda f: ["eval", "ppl", "--tokens", "-5"],
    "eval-ppl-window-zero": lambda f: ["eval", "ppl", "--window", "0"],
    "eval-ppl-stride-zero": lambda f: ["eval", "ppl", "--stride", "0"],
    "eval-ppl-query-tokens-negative": lambda f: ["eval", "ppl", "--query-tokens", "-3"],
    "eval-ppl-threads-zero": lambda f: ["eval", "ppl", "--threads", "0"],
    "eval-ppl-train-steps-negative": lambda f: ["eval", "ppl", "--train-adapter-steps", "-1"],
    "eval-ppl-plot-is-a-dir": lambda f: ["eval", "ppl", "--plot", f.dir],
    "eval-agents-out-is-a-dir": lambda f: ["eval", "agents", "--out", f.dir],
    "eval-agents-max-tokens-zero": lambda f: ["eval", "agents", "--max-tokens", "0"],
    "eval-agents-limit-not-int": lambda f: ["eval", "agents", "--limit", "few"],
    "eval-docqa-threads-zero": lambda f: ["eval", "docqa", "--threads", "0"],
    "eval-docqa-adapter-is-a-file": lambda f: ["eval", "docqa", "--adapter", f.file],
    # serve
    "serve-garbage-gguf": lambda f: ["serve", "--model", f.garbage_gguf],
    "serve-empty-gguf": lambda f: ["serve", "--model", f.empty_gguf],
    "serve-damaged-gguf-header": lambda f: ["serve", "--model", f.header_gguf],
    "serve-port-out-of-range": lambda f: ["serve", "--port", "70000"],
    "serve-port-zero": lambda f: ["serve", "--port", "0"],
    "serve-ctx-size-zero": lambda f: ["serve", "--ctx-size", "0"],
    "serve-parallel-negative": lambda f: ["serve", "--parallel", "-1"],
    "serve-threads-zero": lambda f: ["serve", "--threads", "0"],
    "serve-cache-ram-negative": lambda f: ["serve", "--cache-ram-mib", "-5"],
    "serve-port-not-int": lambda f: ["serve", "--port", "http"],
}


def _check(exit_code: int, output: str, what: object) -> None:
    assert exit_code == 2, (what, exit_code, output[-2000:])
    assert "Traceback" not in output, (what, output[-2000:])
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and len(errors[0]) > len("error: ") + 10, (what, output[-2000:])


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Conversions of GGUF files (none should happen) land in a scratch cache, not the user's."""
    monkeypatch.setenv("FLASHBACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FLASHBACK_DEBUG", "")
    return tmp_path / "cache"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_command_line_is_one_error_line_and_exit_2(f, case, cache_dir):
    args = CASES[case](f)
    res = runner.invoke(app, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), (case, repr(res.exception), res.output)
    _check(res.exit_code, res.output, (case, args))
    assert not (Path(f.out) / "adapter_model.safetensors").exists()  # nothing ran
    assert not cache_dir.exists() or not any(cache_dir.iterdir()), "a garbage GGUF reached the converter"


def test_help_lists_every_command_the_sweep_covers():
    """The sweep covers every command and subcommand ``--help`` lists (a new command needs cases here)."""
    from flashback_agents.cli import COMMAND_MODULES  # noqa: F401 - the groups are registered on import

    def listed(args: list[str]) -> set[str]:
        out = runner.invoke(app, args + ["--help"]).output
        names = set()
        in_commands = False
        for line in out.splitlines():
            if "Commands" in line:
                in_commands = True
                continue
            if in_commands and line.startswith("│ "):
                word = line[2:].split(" ", 1)[0].strip()
                if word:
                    names.add(word)
            elif in_commands and line.startswith("╰"):
                in_commands = False
        return names

    top = listed([])
    assert {"chat", "info", "index", "search", "generate", "train", "export", "bench", "eval", "serve"} <= top
    covered = {c.split("-")[0] for c in CASES}
    for group in ("bench", "eval"):
        for sub in listed([group]):
            assert any(c.startswith(f"{group}-{sub}-") for c in CASES), f"no bad-argument case for {group} {sub}"
    for name in top - {"bench", "eval"}:
        assert name in covered, f"no bad-argument case for {name}"


def test_chat_refuses_non_utf8_stdin_cli_runner(f):
    """In process (CliRunner decodes stdin strictly, a buffer at a time): one error line, exit 2."""
    res = runner.invoke(app, ["chat", "--model", f.tiny, "--max-new-tokens", "2"], input=b"hello\n\xff\xfe\xfa oops\n")
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    _check(res.exit_code, res.output, "non-UTF-8 stdin")
    assert "stdin is not UTF-8" in res.output


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "utf-8"},  # strict decoding: UnicodeDecodeError
                                 {"PYTHONUTF8": "1", "LC_ALL": "C"}],  # surrogateescape: lone surrogates
                         ids=["strict-stdin", "surrogateescape-stdin"])
@pytest.mark.slow
def test_chat_refuses_non_utf8_stdin_subprocess(f, env, tmp_path):
    """The real console script: bytes that are not UTF-8 on stdin are one error line and exit 2."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "FLASHBACK_CACHE_DIR": str(tmp_path / "cache"), **env}
    full.pop("FLASHBACK_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "flashback_agents.cli", "chat", "--model", f.tiny,
                           "--max-new-tokens", "2"], input=b"\xff\xfe caf\xe9\n", capture_output=True, timeout=300)
    output = proc.stdout.decode("utf-8", "replace") + proc.stderr.decode("utf-8", "replace")
    _check(proc.returncode, output, env)
    assert "UTF-8" in output


def test_sweep_size():
    commands = {" ".join(c.split("-")[:2]) if c.startswith(("bench-", "eval-")) else c.split("-")[0] for c in CASES}
    print(f"\nbad command lines tried: {len(CASES)} in process + 3 non-UTF-8 stdin runs, over {len(commands)} "
          f"commands: {sorted(commands)}")
    assert len(CASES) >= 50
