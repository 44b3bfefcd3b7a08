"""Models (flashback_agents/models.py): loading, model specs, marker tokens, clear load errors."""

from __future__ import annotations

import pytest
import torch

from flashback_agents import CachedContext, GenerationConfig, Layout, Message, ModelLoadError, generate, load_model


def test_markers_added_as_special_tokens_with_mean_rows(tiny_lm):
    left, right = tiny_lm.marker_ids
    tok = tiny_lm.tokenizer
    assert tok.convert_ids_to_tokens([left, right]) == ["<MARK_L>", "<MARK_R>"]
    assert tiny_lm.encode("<MARK_L>x<MARK_R>")[0] == left  # one token each, never split
    emb = tiny_lm.model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    mean = emb[:left].mean(0)
    assert torch.allclose(emb[left], mean, atol=1e-6) and torch.allclose(emb[right], mean, atol=1e-6)


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="Unknown model spec 'no-such-model'"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelLoadError, match="Model path not found"):
        load_model(str(tmp_path / "nothing" / "here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a Hugging Face model directory"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="server address"):
        load_model("http://127.0.0.1:8080/v1")


def test_resolve_spec_is_the_one_spec_resolver(tmp_path, tiny_model_dir):
    from flashback_agents.export_gguf import base_gguf_for
    from flashback_agents.models import DEFAULT_MODEL, default_gguf_path, resolve_spec
    from flashback_agents.llamacpp import resolve_gguf

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_spec(" smollm2 ").kind == "default" and resolve_spec("default").name == DEFAULT_MODEL
    assert resolve_spec("default").gguf == default_gguf_path() == resolve_gguf("default") == base_gguf_for(None)
    r = resolve_spec(str(gguf))
    assert (r.kind, r.name, r.gguf) == ("gguf", "m", gguf) and r.tokenizer_source() == (str(tmp_path), {"gguf_file": "m.gguf"})
    assert resolve_gguf(str(gguf)) == gguf == base_gguf_for(str(gguf))
    r = resolve_spec(str(tiny_model_dir))
    assert (r.kind, r.directory, r.source()) == ("dir", tiny_model_dir, str(tiny_model_dir))
    assert resolve_spec("org/model").kind == "hub" and resolve_spec("http://h:1/v1").kind == "server"
    for bad in ("", "no-such-model", str(tmp_path / "x.gguf"), str(tmp_path / "nothing" / "here")):
        with pytest.raises(ModelLoadError):
            resolve_spec(bad)
    with pytest.raises(ModelLoadError, match="is not one"):
        base_gguf_for(str(tiny_model_dir))


def test_hub_id_without_network_says_how_to_get_it_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="download it on a machine that has one"):
        load_model("someone/not-a-cached-model")


def test_not_a_causal_lm_is_refused(tmp_path):
    from transformers import DistilBertConfig

    DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=16).save_pretrained(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(str(tmp_path))


@pytest.mark.model
def test_default_model_loads_offline_and_answers(default_lm):
    lay = Layout(default_lm)
    ctx = CachedContext(default_lm)
    ctx.sync(lay.render([Message("user", "What is the capital of France? Answer in one word.")]))
    res = generate(ctx, GenerationConfig(max_new_tokens=20))
    assert "Paris" in res.text
    assert res.finish_reason == "stop"
    assert default_lm.max_positions == 8192
