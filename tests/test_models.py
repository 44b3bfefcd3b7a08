"""Models (flashback_agents/models.py): loading, model specs, marker tokens, clear load errors.

Chat templates: a model without one gets a warning naming the fallback, ``chat_template=`` fixes it, no
system text the user did not send; and every model load is quiet (no progress bar, no FutureWarning).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from flashback_agents import CachedContext, GenerationConfig, Layout, Message, ModelLoadError, generate, load_model
from flashback_agents.layout import DEFAULT_SYSTEM
from flashback_agents.models import ChatTemplateWarning
from flashback_agents.testing import CHATML_TEMPLATE, build_tiny_model_dir


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


# --------------------------------------------------------------------------- chat templates
PLAIN_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}### assistant: {% endif %}")


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory):
    """The tiny model with its chat template removed (as a base model's GGUF or folder ships)."""
    d = build_tiny_model_dir(tmp_path_factory.mktemp("no-template"))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_no_template_warns_naming_the_fallback_and_injects_no_system_text(bare_dir):
    with pytest.warns(ChatTemplateWarning, match=r"no chat template.*ChatML.*chat_template="):
        lm = load_model(str(bare_dir), adapter=None)
    text = lm.tokenizer.decode(Layout(lm).render([Message("user", "hi")]))
    assert "system" not in text and DEFAULT_SYSTEM not in text
    assert text.startswith("<|im_start|>user\nhi")
    with_sys = lm.tokenizer.decode(Layout(lm).render([Message("system", "Be brief."), Message("user", "hi")]))
    assert with_sys.startswith("<|im_start|>system\nBe brief.")  # what the user sent is kept


def test_the_users_chat_template_is_used_without_a_warning(bare_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChatTemplateWarning)
        lm = load_model(str(bare_dir), adapter=None, chat_template=PLAIN_TEMPLATE)
    text = lm.tokenizer.decode(Layout(lm).render([Message("user", "hi")]))
    assert "### user: hi" in text and text.endswith("### assistant: ")


@pytest.mark.parametrize("bad", ["", "   ", 5, "{% for m in messages %}", "{{ messages[0]['content'] | nosuchfilter }}"])
def test_a_bad_chat_template_is_our_error(bare_dir, bad):
    with pytest.raises(ModelLoadError, match="chat_template"):
        load_model(str(bare_dir), adapter=None, chat_template=bad)


def test_a_model_with_a_template_keeps_the_default_system_text(tmp_path):
    lm = load_model(str(build_tiny_model_dir(tmp_path / "tpl")), adapter=None)
    assert lm.tokenizer.chat_template == CHATML_TEMPLATE
    assert DEFAULT_SYSTEM in lm.tokenizer.decode(Layout(lm).render([Message("user", "hi")]))


def test_model_loads_are_quiet(bare_dir, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(str(bare_dir), adapter=None, chat_template=CHATML_TEMPLATE)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]


def test_both_integrations_pass_chat_template_through(bare_dir):
    from langchain_flashback import ChatFlashBack
    from llama_index.llms.flashback import FlashBack

    with warnings.catch_warnings():
        warnings.simplefilter("error", ChatTemplateWarning)
        lc = ChatFlashBack(model=str(bare_dir), adapter=None, chat_template=PLAIN_TEMPLATE, max_tokens=2)
        li = FlashBack(model=str(bare_dir), adapter=None, chat_template=PLAIN_TEMPLATE, max_tokens=2)
    assert lc.engine.lm.tokenizer.chat_template == PLAIN_TEMPLATE
    assert li._engine.lm is lc.engine.lm  # one shared model for the same spec, adapter and template
    lc.invoke("hi")
