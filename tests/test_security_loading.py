"""Nothing we load runs code or prompts for it: a model, adapter or tokenizer directory with an
``auto_map`` (transformers' hook for Python shipped with the weights) is refused with a clear
:class:`ModelLoadError` before transformers reads it; every ``from_pretrained`` passes
``trust_remote_code=False``."""

from __future__ import annotations

import ast
import builtins
import json
import shutil
from pathlib import Path

import pytest

import flashback_agents
from flashback_agents.models import ModelLoadError, load_model

ROOT = Path(flashback_agents.__file__).resolve().parent
INTEGRATIONS = ROOT.parent / "integrations"


@pytest.fixture
def no_prompt(monkeypatch):
    """``input()`` records that it was called and answers 'y' (what an attacker hopes a user types)."""
    asked: list[str] = []

    def fake_input(prompt: str = "") -> str:
        asked.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", fake_input)
    return asked


def _evil_module(d: Path, name: str, marker: Path, cls: str) -> None:
    (d / f"{name}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        f"class {cls}(PreTrainedTokenizerFast if 'Tok' in {cls!r} else LlamaConfig):\n"
        "    pass\n")


def crafted_model_dir(src: Path, dst: Path, marker: Path, model_type: str = "evil") -> Path:
    """A copy of a real model directory whose config asks for its own Python (``auto_map``)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "evil_config.EvilConfig", "AutoModelForCausalLM": "evil_config.EvilConfig"}
    (dst / "config.json").write_text(json.dumps(cfg))
    _evil_module(dst, "evil_config", marker, "EvilConfig")
    return dst


def crafted_tokenizer_dir(src: Path, dst: Path, marker: Path) -> Path:
    """A directory whose tokenizer_config.json names a tokenizer class of its own (``auto_map``)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "EvilTokenizerFast"
    tc["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizerFast"]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    _evil_module(dst, "evil_tok", marker, "EvilTokenizerFast")
    return dst


def crafted_adapter_dir(src: Path, dst: Path, marker: Path) -> Path:
    d = crafted_tokenizer_dir(src, dst, marker)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                       "target_modules": ["q_proj"]}))
    return d


def _assert_refused(exc: BaseException, what: Path, asked: list[str], marker: Path) -> None:
    text = str(exc)
    assert "auto_map" in text and "never runs" in text and str(what) in text, text
    assert not asked, f"a prompt was shown: {asked}"
    assert not marker.exists(), "the directory's Python ran"


def test_model_dir_with_auto_map_is_refused_without_prompt_or_code(tiny_model_dir, tmp_path, no_prompt):
    marker = tmp_path / "ran"
    d = crafted_model_dir(tiny_model_dir, tmp_path / "evil-model", marker)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(d), device="cpu", adapter=None)
    _assert_refused(info.value, d / "config.json", no_prompt, marker)


def test_known_architecture_with_auto_map_is_refused_too(tiny_model_dir, tmp_path, no_prompt):
    marker = tmp_path / "ran"
    d = crafted_model_dir(tiny_model_dir, tmp_path / "llama-with-code", marker, model_type="llama")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(d), device="cpu", adapter=None)
    _assert_refused(info.value, d / "config.json", no_prompt, marker)
    assert "remove the `auto_map`" in str(info.value)


def test_model_dir_with_a_tokenizer_auto_map_is_refused(tiny_model_dir, tmp_path, no_prompt):
    marker = tmp_path / "ran"
    d = tmp_path / "tok-code"
    shutil.copytree(tiny_model_dir, d)
    crafted_tokenizer_dir(tiny_model_dir, d, marker)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(d), device="cpu", adapter=None)
    _assert_refused(info.value, d / "tokenizer_config.json", no_prompt, marker)


def test_adapter_dir_with_auto_map_is_refused(tiny_model_dir, tmp_path, no_prompt):
    marker = tmp_path / "ran"
    adapter = crafted_adapter_dir(tiny_model_dir, tmp_path / "evil-adapter", marker)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tiny_model_dir), device="cpu", adapter=str(adapter))
    _assert_refused(info.value, adapter / "tokenizer_config.json", no_prompt, marker)


def test_adapter_is_also_checked_when_attached_directly(tiny_lm, tiny_model_dir, tmp_path, no_prompt):
    from flashback_agents.models import _attach_adapter

    marker = tmp_path / "ran"
    adapter = crafted_adapter_dir(tiny_model_dir, tmp_path / "evil-adapter", marker)
    with pytest.raises(ModelLoadError) as info:
        _attach_adapter(tiny_lm.model, tiny_lm.tokenizer, adapter)
    _assert_refused(info.value, adapter / "tokenizer_config.json", no_prompt, marker)


def test_cli_chat_adapter_answering_yes_runs_nothing(tiny_model_dir, tmp_path, no_prompt):
    from typer.testing import CliRunner

    from flashback_agents.cli import app

    marker = tmp_path / "ran"
    adapter = crafted_adapter_dir(tiny_model_dir, tmp_path / "evil-adapter", marker)
    res = CliRunner().invoke(app, ["chat", "--model", str(tiny_model_dir), "--adapter", str(adapter)],
                             input="y\ny\n")
    assert res.exit_code != 0
    assert "auto_map" in res.output and "Traceback" not in res.output, res.output
    assert not marker.exists() and not no_prompt


def test_server_tokenizer_and_chunking_refuse_auto_map(tiny_model_dir, tmp_path, no_prompt):
    from flashback_agents.backends.server.tokenizer import load_server_tokenizer
    from flashback_agents.retrieval.chunking import load_tokenizer

    marker = tmp_path / "ran"
    d = crafted_tokenizer_dir(tiny_model_dir, tmp_path / "evil-tok", marker)
    (d / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError) as info:
        load_server_tokenizer(str(d))
    _assert_refused(info.value, d / "tokenizer_config.json", no_prompt, marker)
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(str(d))
    _assert_refused(info.value, d / "tokenizer_config.json", no_prompt, marker)


def test_a_plain_model_dir_still_loads(tiny_model_dir, no_prompt):
    lm = load_model(str(tiny_model_dir), device="cpu", adapter=None)
    assert lm.encode("hello") and not no_prompt


def _from_pretrained_calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
            yield node


def test_every_from_pretrained_passes_trust_remote_code_false():
    """A source check: a new ``from_pretrained`` without ``trust_remote_code=False`` fails here.
    (peft's ``PeftModel.from_pretrained`` runs no code from the directory and takes no such flag.)"""
    missing, seen = [], 0
    for path in sorted([*ROOT.rglob("*.py"), *INTEGRATIONS.rglob("*.py")]):
        for call in _from_pretrained_calls(path):
            owner = ast.unparse(call.func.value)
            if owner == "PeftModel":
                continue
            seen += 1
            flag = next((k.value for k in call.keywords if k.arg == "trust_remote_code"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is False):
                missing.append(f"{path.relative_to(ROOT.parent)}:{call.lineno} {ast.unparse(call)[:80]}")
    assert seen >= 8
    assert not missing, "from_pretrained without trust_remote_code=False:\n" + "\n".join(missing)
