"""The embedded llama.cpp server's knobs (flash attention, batch sizes, KV cache type) reach llama.cpp's
params and the child's command line; the server bench's prefix check. No server is started here."""

from __future__ import annotations

import subprocess

import pytest

from flashback_agents.evaluation.server_bench import shared_prefix_length
from flashback_agents.llamacpp import ServeConfig, ServerProcess, check_config, main

xlc = pytest.importorskip("xllamacpp")


def test_defaults_leave_llama_cpp_defaults():
    from flashback_agents.llamacpp import build_params

    p = build_params(ServeConfig(threads=1))
    plain = xlc.CommonParams()
    assert p.n_batch == plain.n_batch and p.n_ubatch == plain.n_ubatch
    assert p.cache_type_k == plain.cache_type_k and p.cache_type_v == plain.cache_type_v
    assert int(p.flash_attn_type) == -1  # auto
    assert p.cpuparams.n_threads == 1 and p.cpuparams_batch.n_threads == 1 and p.cache_prompt


def test_knobs_reach_params():
    from flashback_agents.llamacpp import build_params

    p = build_params(ServeConfig(threads=1, flash_attn="off", batch_size=1024, ubatch_size=256, cache_type="f32"))
    assert int(p.flash_attn_type) == 0 and p.n_batch == 1024 and p.n_ubatch == 256
    assert p.cache_type_k == xlc.ggml_type.GGML_TYPE_F32 and p.cache_type_v == xlc.ggml_type.GGML_TYPE_F32
    assert int(build_params(ServeConfig(threads=1, flash_attn="on")).flash_attn_type) == 1


@pytest.mark.parametrize("bad", [dict(flash_attn="yes"), dict(cache_type="q4_9"), dict(ubatch_size=0),
                                 dict(batch_size=-1), dict(threads=0)])
def test_bad_knobs_rejected(bad):
    with pytest.raises(ValueError):
        check_config(ServeConfig(**bad))


def test_child_command_line(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_popen(cmd, **kw):
        seen["cmd"] = cmd
        raise Stop

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    proc = ServerProcess(ServeConfig(port=1234, threads=1, flash_attn="on", ubatch_size=128, cache_type="f16"))
    with pytest.raises(Stop):
        proc.start()
    cmd = seen["cmd"]
    assert cmd[cmd.index("--flash-attn") + 1] == "on" and cmd[cmd.index("--ubatch-size") + 1] == "128"
    assert cmd[cmd.index("--cache-type") + 1] == "f16" and "--batch-size" not in cmd


def test_main_passes_knobs(monkeypatch):
    got = {}
    monkeypatch.setattr("flashback_agents.llamacpp.serve_forever", lambda cfg: got.setdefault("cfg", cfg))
    main(["--flash-attn", "off", "--batch-size", "512", "--ubatch-size", "64", "--cache-type", "q8_0"])
    cfg = got["cfg"]
    assert (cfg.flash_attn, cfg.batch_size, cfg.ubatch_size, cfg.cache_type) == ("off", 512, 64, "q8_0")


def test_shared_prefix_length():
    assert shared_prefix_length([], [1, 2]) == 0
    assert shared_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert shared_prefix_length([1, 2], [1, 2, 3]) == 2
    assert shared_prefix_length([5], [1]) == 0


class _StubLM:
    def encode(self, text):
        return [ord(c) for c in text]


def _stub_backend():
    from flashback_agents.backends.server.backend import ServerBackend

    b = object.__new__(ServerBackend)
    b.lm = _StubLM()
    return b


TOOLS = [{"type": "function", "function": {"name": "search_logs", "description": "d", "parameters": {
    "type": "object", "properties": {"pattern": {"type": "string"}}, "required": ["pattern"]}}}]


@pytest.mark.parametrize("fmt_name,opener,closer,args_key", [
    (None, "<tool_call>", "</tool_call>", "arguments"), ("hermes", "<tool_call>", "</tool_call>", "arguments"),
    ("mistral", "[TOOL_CALLS][", "]", "arguments"), ("llama3_json", "", "", "parameters")])
def test_required_call_uses_the_family_syntax_over_the_server(fmt_name, opener, closer, args_key):
    from flashback_agents.backends.base import Constraint
    from flashback_agents.generation import GenerationConfig
    from flashback_agents.toolformat import FORMATS, tool_call_schema

    fmt = FORMATS[fmt_name] if fmt_name else None
    c = Constraint("tool_call", tool_call_schema(TOOLS, "search_logs"), tools=TOOLS, choice="search_logs", fmt=fmt)
    prep = _stub_backend().prepare([1, 2], GenerationConfig(max_new_tokens=8), c)
    assert prep.prefix_text == opener and prep.suffix_text == closer
    assert prep.prefix_ids == [ord(ch) for ch in opener] and prep.suffix_ids == [ord(ch) for ch in closer]
    assert args_key in prep.schema["properties"] and args_key in prep.schema["required"]
    if args_key != "arguments":
        assert "arguments" not in prep.schema["properties"]
