"""Quick benchmark runs as smoke tests (tiny model): the JSON they print and the counts they report."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flashback_agents.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    from flashback_agents.testing import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-bench"), max_positions=4096)


def _json(output: str) -> dict:
    return json.loads(output[output.index("{"):])


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


def test_bench_long_quick(long_dir):
    res = runner.invoke(app, ["bench", "long", "--quick", "--budget", "2048", "--model", str(long_dir), "--json"])
    assert res.exit_code == 0, res.output
    data = _json(res.output)
    fb = data["systems"][0]
    assert fb["system"] == "ChatFlashBack (evict)" and len(fb["steps"]) == 12
    assert fb["compactions"] >= 1
    assert all(s["prompt_tokens"] <= data["budget"] for s in fb["steps"])
    assert "speedup_vs_chathf_trim" in data
