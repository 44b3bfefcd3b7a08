"""Generation (flashback_agents/generation.py): stream equals generate, stop strings (also split across
byte-level tokens, and a plain ``str`` stop everywhere), seeded sampling."""

from __future__ import annotations

import pytest
import torch

from flashback_agents import CachedContext, GenerationConfig, generate, stream


def test_generation_greedy_stream_equals_generate_and_stays_in_context(tiny_lm):
    cfg = GenerationConfig(max_new_tokens=12, stop_at_eos=False)
    a = CachedContext(tiny_lm)
    a.append("the quick brown fox")
    res = generate(a, cfg)
    b = CachedContext(tiny_lm)
    b.append("the quick brown fox")
    run = stream(b, cfg)
    text = "".join(run)
    assert text == res.text and run.result.token_ids == res.token_ids
    assert a.token_ids[-12:] == res.token_ids and len(a) == len(tiny_lm.encode("the quick brown fox")) + 12


def test_stop_strings_are_cut_and_sampling_is_seeded(tiny_lm):
    ctx = CachedContext(tiny_lm)
    ctx.append("hello")
    probe = generate(ctx.fork(), GenerationConfig(max_new_tokens=8, stop_at_eos=False))
    if len(probe.text) >= 3:
        stop = probe.text[1:3]
        res = generate(ctx.fork(), GenerationConfig(max_new_tokens=8, stop=[stop], stop_at_eos=False))
        assert res.finish_reason == "stop" and res.stop_string == stop
        assert res.text == probe.text[: probe.text.find(stop)]
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=3, stop_at_eos=False)
    assert generate(ctx.fork(), cfg).token_ids == generate(ctx.fork(), cfg).token_ids
    with pytest.raises(ValueError, match="top_p"):
        generate(ctx, GenerationConfig(top_p=0))


def _forcing(ids: list[int]):
    """A logits processor that makes the model emit exactly ``ids`` (then EOS)."""
    state = {"i": 0}

    def proc(input_ids, scores):
        i = state["i"]
        state["i"] += 1
        out = torch.full_like(scores, float("-inf"))
        out[0, ids[i] if i < len(ids) else 0] = 0.0
        return out
    return proc


@pytest.mark.parametrize("stop", [" 中", "中文", "😀 中"])
def test_stream_equals_generate_with_a_multibyte_stop_string(tiny_lm, stop):
    ids = tiny_lm.encode("ok 😀 中文 after")
    assert len(ids) > len("ok 😀 中文 after")  # byte-level: the CJK/emoji chars span several tokens
    cfg = GenerationConfig(max_new_tokens=len(ids) + 2, stop=[stop], stop_at_eos=False)
    prompt = tiny_lm.encode("say:")
    a = CachedContext(tiny_lm)
    a.append(prompt)
    full = generate(a, cfg, [_forcing(ids)])
    b = CachedContext(tiny_lm)
    b.append(prompt)
    run = stream(b, cfg, [_forcing(ids)])
    deltas = list(run)
    assert full.text == "ok 😀 中文 after".split(stop)[0]
    assert "".join(deltas) == full.text == run.result.text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_as_a_plain_string_everywhere(tiny_lm, tiny_model_dir):
    from langchain_flashback import ChatFlashBack
    from llama_index.llms.flashback import FlashBack

    assert GenerationConfig(stop="END").stop == ("END",)
    cfg = GenerationConfig()
    cfg.stop = "END"
    cfg.validate()
    assert cfg.stop == ("END",)
    assert ChatFlashBack(model=str(tiny_model_dir), stop="END")._config(None, {}).stop == ("END",)
    assert ChatFlashBack(model=str(tiny_model_dir))._config("END", {}).stop == ("END",)
    assert FlashBack(model=tiny_lm, stop="END")._config({}).stop == ("END",)
    assert FlashBack(model=tiny_lm)._config({"stop": "END"}).stop == ("END",)
    # and it stops at "END", not at "E"
    ids = tiny_lm.encode("AN END here")
    ctx = CachedContext(tiny_lm)
    ctx.append(tiny_lm.encode("x"))
    out = generate(ctx, GenerationConfig(max_new_tokens=len(ids), stop="END", stop_at_eos=False), [_forcing(ids)])
    assert out.text == "AN " and out.stop_string == "END"
