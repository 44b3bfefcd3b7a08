"""A model without a chat template: a warning naming the fallback, ``chat_template=`` to fix it, no
system text the user did not send; and every model load is quiet (no progress bar, no FutureWarning)."""

from __future__ import annotations

import json
import warnings

import pytest

from flashback_agents import load_model
from flashback_agents.layout import DEFAULT_SYSTEM, Layout, Message
from flashback_agents.models import ChatTemplateWarning, ModelLoadError
from flashback_agents.testing import CHATML_TEMPLATE, build_tiny_model_dir

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
