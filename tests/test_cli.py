"""The command line: help everywhere, clear errors, JSON output of the engine benchmarks."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flashback_agents.cli import app

runner = CliRunner()


def test_help_everywhere():
    for args in (["--help"], ["chat", "--help"], ["info", "--help"], ["bench", "--help"],
                 ["bench", "context", "--help"], ["bench", "decode", "--help"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args, res.output)
        assert "Usage" in res.output


def test_info_json():
    res = runner.invoke(app, ["info", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["model"] == "smollm2-135m-instruct" and "cache_dir" in data


def test_bench_context_json_on_tiny_model(tiny_model_dir):
    res = runner.invoke(app, ["bench", "context", "--model", str(tiny_model_dir), "--context", "64,128",
                              "--append", "8", "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{"):])
    assert data["context_tokens"] == 128 and data["append_tokens"] == 8
    assert data["ratio"] == data["full_recompute_s"] / data["cached_append_s"]
    assert [p["context_tokens"] for p in data["curve"]] == [64, 128]


def test_bench_context_too_long_is_a_clear_error(tiny_model_dir):
    res = runner.invoke(app, ["bench", "context", "--model", str(tiny_model_dir), "--context", "9999"])
    assert res.exit_code == 2
    assert "exceeds the model window" in res.output


def test_unknown_model_is_a_clear_error():
    res = runner.invoke(app, ["info", "--load", "--model", "nonexistent-model"])
    assert res.exit_code != 0
    assert "error: Unknown model spec" in res.output


def test_chat_reads_stdin_and_reports_counts(tiny_model_dir):
    res = runner.invoke(app, ["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4"],
                        input="hello\nagain\n\n")
    assert res.exit_code == 0, res.output
    assert res.output.count("tokens computed") == 2
    assert "reused 0" in res.output


def test_a_broken_command_module_is_reported_by_help(monkeypatch):
    """A command module that fails to import is named, with its error, by --help (not silently dropped)."""
    import importlib

    from flashback_agents import cli

    real = importlib.import_module

    def broken(name, *args, **kwargs):
        if name == "flashback_agents.cli.train":
            raise ImportError("simulated: No module named 'peft_broken'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", broken)
    broken_app, _, failed = cli.build_app()
    assert set(failed) == {"train"} and "peft_broken" in failed["train"]
    res = runner.invoke(broken_app, ["--help"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.replace("│", " ").split())
    assert "Command group 'train' failed to load" in text and "peft_broken" in text
    assert "index" in text  # the other groups are still there
    res = runner.invoke(broken_app, ["train", "--help"])
    assert res.exit_code != 0


def test_every_command_group_loads():
    from flashback_agents.cli import FAILED_GROUPS

    assert FAILED_GROUPS == {}
