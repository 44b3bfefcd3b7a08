"""Quick benchmark runs as smoke tests (tiny model): the JSON they print and the counts they report."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flashback_agents.cli import app

runner = CliRunner()


def _json(output: str) -> dict:
    return json.loads(output[output.index("{"):])


@pytest.mark.slow
def test_bench_agent_quick(long_dir):
    res = runner.invoke(app, ["bench", "agent", "--quick", "--model", str(long_dir), "--json",
                              "--systems", "ideal,ChatHuggingFace,ChatFlashBack,LlamaIndex FlashBackLLM"])
    assert res.exit_code == 0, res.output
    data = _json(res.output)
    rows = {r["system"]: r for r in data["systems"]}
    assert set(rows) == {"ideal", "ChatHuggingFace", "ChatFlashBack", "LlamaIndex FlashBackLLM"}
    assert all(len(r["steps"]) == 4 for r in rows.values())
    assert rows["ChatHuggingFace"]["tokens_reused"] == 0
    for name in ("ideal", "ChatFlashBack", "LlamaIndex FlashBackLLM"):
        steps = rows[name]["steps"]
        # from step 2 on, everything before the new tool result is reused
        assert all(s["tokens_reused"] > 0 for s in steps[1:]), name
        assert all(s["tokens_computed"] < steps[0]["tokens_computed"] + 200 for s in steps[1:]), name
    assert rows["ChatFlashBack"]["vs_ideal_total"] > 0


@pytest.mark.slow
def test_bench_long_quick(long_dir):
    res = runner.invoke(app, ["bench", "long", "--quick", "--budget", "2048", "--model", str(long_dir), "--json"])
    assert res.exit_code == 0, res.output
    data = _json(res.output)
    fb = data["systems"][0]
    assert fb["system"] == "ChatFlashBack (evict)" and len(fb["steps"]) == 12
    assert fb["compactions"] >= 1
    assert all(s["prompt_tokens"] <= data["budget"] for s in fb["steps"])
    assert "speedup_vs_chathf_trim" in data


@pytest.mark.slow
def test_bench_agent_tool_calls_with_and_without_speculation(long_dir):
    """``--tool-calls --no-speculation``: constrained calls each step; ours with and without speculation
    decode the same tokens, with speculation in fewer forwards; the baselines generate as many."""
    res = runner.invoke(app, ["bench", "agent", "--quick", "--tool-calls", "--no-speculation", "--model",
                              str(long_dir), "--json", "--systems", "ideal,ChatHuggingFace,ChatFlashBack"])
    assert res.exit_code == 0, res.output
    data = _json(res.output)
    rows = {r["system"]: r for r in data["systems"]}
    assert set(rows) == {"ideal", "ChatHuggingFace", "ChatFlashBack", "ChatFlashBack (no speculation)"}
    fast, plain = rows["ChatFlashBack"], rows["ChatFlashBack (no speculation)"]
    lengths = [s["output_tokens"] for s in fast["steps"]]
    assert lengths == [s["output_tokens"] for s in plain["steps"]] == [s["output_tokens"] for s in rows["ideal"]["steps"]]
    assert fast["forced"] > 0 and fast["forwards_per_token"] < plain["forwards_per_token"]
    assert plain["drafted"] == 0 and "speedup_vs_no_speculation_total" in fast


@pytest.mark.slow
def test_bench_long_and_decode_no_speculation_rows(long_dir):
    res = runner.invoke(app, ["bench", "long", "--steps", "3", "--tool-tokens", "64", "--generate", "8", "--budget",
                              "2048", "--no-speculation", "--model", str(long_dir), "--json"])
    assert res.exit_code == 0, res.output
    data = _json(res.output)
    rows = {r["system"]: r for r in data["systems"]}
    fast, plain = rows["ChatFlashBack (evict)"], rows["ChatFlashBack (evict) (no speculation)"]
    assert [s["output_tokens"] for s in fast["steps"]] == [s["output_tokens"] for s in plain["steps"]]
    assert fast["forwards_per_token"] < plain["forwards_per_token"] and fast["forced"] > 0
    assert "speedup_vs_no_speculation" in data and "speedup_vs_chathf_trim_no_speculation" in data
    res = runner.invoke(app, ["bench", "decode", "--context", "64", "--tokens", "8", "--no-speculation",
                              "--model", str(long_dir), "--json"])
    assert res.exit_code == 0, res.output
    gen = _json(res.output)["points"][0]["generate"]
    assert gen["identical_tokens"] and gen["no_speculation_forwards_per_token"] == 7 / 8
