"""Adapters (flashback_agents/adapters.py). The shipped adapter: attached by default (``adapter="auto"``,
:data:`DEFAULT_ADAPTER`), off with ``adapter=None``, and an adapter trained on another base model refused
with a clear error."""

from __future__ import annotations

import json

import pytest
import torch

from flashback_agents import CachedContext, load_model
from flashback_agents.layout import Layout
from flashback_agents.models import (AUTO_ADAPTER, DEFAULT_ADAPTER, DEFAULT_MODEL, ModelLoadError, base_fingerprint, resolve_adapter,
                                     shipped_adapter)
from flashback_agents.testing import build_tiny_model_dir
from flashback_agents.training import TrainConfig, train
from flashback_agents.training.samples import packed_ralm_sample

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    lm = load_model(str(tiny_model_dir), device="cpu", adapter=None)
    layout = Layout(lm)
    text = lm.encode("The quick brown fox jumps over the lazy dog. ERROR disk full on node 7. " * 6)[:96]
    samples = [packed_ralm_sample(text, [(16, layout.marked("ERROR disk full")), (48, layout.marked("fox"))], 16)] * 4
    out = tmp_path_factory.mktemp("adapter") / "a"
    train(TrainConfig(model=str(tiny_model_dir), output_dir=str(out), steps=2, batch_size=1, save_every=0,
                      eval_every=0, progress=False), samples, eval_samples=[], lm=lm)
    return out


def test_adapter_records_its_base_and_loads_on_it(tiny_model_dir, tiny_adapter):
    meta = json.loads((tiny_adapter / "flashback_adapter.json").read_text())
    base = load_model(str(tiny_model_dir), device="cpu", adapter=None)
    assert meta["base_fingerprint"] == base_fingerprint(base.model)
    lm = load_model(str(tiny_model_dir), device="cpu", adapter=str(tiny_adapter))
    assert lm.adapter == str(tiny_adapter)
    a, b = CachedContext(lm), CachedContext(base)
    ids = base.encode("ERROR disk full")
    a.append_evidence("ERROR disk full")
    b.append_evidence("ERROR disk full")
    assert ids and not torch.allclose(a.next_token_logits(), b.next_token_logits())  # the adapter does something


def test_adapter_of_another_base_model_is_refused(tiny_adapter, tmp_path):
    other = build_tiny_model_dir(tmp_path / "other", seed=1)  # same shapes and tokenizer, other weights
    with pytest.raises(ModelLoadError, match="trained on another base model") as err:
        load_model(str(other), device="cpu", adapter=str(tiny_adapter))
    assert "adapter=None" in str(err.value)
    bigger = build_tiny_model_dir(tmp_path / "bigger", hidden=96, heads=4, kv_heads=2)
    with pytest.raises(ModelLoadError, match="hidden_size"):
        load_model(str(bigger), device="cpu", adapter=str(tiny_adapter))


def test_adapter_argument_resolution(tmp_path):
    assert resolve_adapter("some-model", None) is None
    assert resolve_adapter("some-model", AUTO_ADAPTER) is None  # nothing shipped for it
    assert resolve_adapter("x", str(tmp_path)) == tmp_path
    assert resolve_adapter(DEFAULT_MODEL, AUTO_ADAPTER) == shipped_adapter("default") == shipped_adapter(DEFAULT_MODEL)
    with pytest.raises(ModelLoadError, match="adapter must be"):
        resolve_adapter("x", 3)  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match="not an adapter directory"):
        load_model_dir = build_tiny_model_dir(tmp_path / "m")
        load_model(str(load_model_dir), device="cpu", adapter=str(tmp_path / "empty"))


@pytest.mark.model
def test_default_model_ships_an_adapter_that_auto_attaches_and_none_turns_off():
    shipped = shipped_adapter(DEFAULT_MODEL)
    assert shipped is not None and (shipped / "adapter_model.safetensors").is_file()
    card = (shipped / "README.md").read_text()
    assert "flashback-agents train" in card and "seed" in card
    with_adapter = load_model(adapter=AUTO_ADAPTER)
    without = load_model(adapter=None)
    assert with_adapter.adapter == str(shipped) and without.adapter is None
    assert DEFAULT_ADAPTER == AUTO_ADAPTER and load_model().adapter == str(shipped)  # on by default
    a, b = CachedContext(with_adapter), CachedContext(without)
    for ctx in (a, b):
        ctx.append("The observatory was founded in")
        ctx.append_evidence("The observatory was founded in 1875 by the astronomer Jules Janssen.")
    assert not torch.allclose(a.next_token_logits(), b.next_token_logits())


def test_integrations_default_to_the_shipped_adapter():
    """LangChain and LlamaIndex classes attach what load_model attaches when no adapter is named."""
    from langchain_flashback import ChatFlashBack, FlashBackLLM
    from llama_index.llms.flashback import FlashBack

    for cls in (ChatFlashBack, FlashBackLLM, FlashBack):
        assert cls.model_fields["adapter"].default == DEFAULT_ADAPTER == AUTO_ADAPTER, cls


def test_attaching_an_adapter_is_quiet(tiny_model_dir, tiny_adapter, capfd):
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning) and the weights
    load with a progress bar: neither reaches the user of a library call."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(str(tiny_model_dir), device="cpu", adapter=str(tiny_adapter))
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]
    assert "Loading weights" not in capfd.readouterr().err
