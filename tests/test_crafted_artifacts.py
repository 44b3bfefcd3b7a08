"""Crafted but well-formed artifacts: training checkpoints that load with ``weights_only=True`` and
adapter directories whose files parse, each with one field, tensor or file wrong.

Every one is refused with our error (a :class:`FlashBackError`: :class:`CheckpointError` or
:class:`ModelLoadError`), never a raw ``KeyError``/``AttributeError``/size mismatch, never a silent
load (NaN weights would make the model answer nothing); the message names the artifact, the problem
and what to do; and what was loaded before keeps working. All cases are built from one real tiny run
(a 1-step checkpoint of a 2-step schedule, which is also a complete adapter) made once per module.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from safetensors.torch import load_file, save_file  # noqa: E402

from flashback_agents import GenerationConfig, load_model  # noqa: E402
from flashback_agents.engines import local_engine  # noqa: E402
from flashback_agents.errors import FlashBackError  # noqa: E402
from flashback_agents.layout import Message  # noqa: E402
from flashback_agents.models import ModelLoadError  # noqa: E402
from flashback_agents.testing import full_logits  # noqa: E402
from flashback_agents.training import (CheckpointError, TrainConfig, TrainError, checkpoints,  # noqa: E402
                                       conversation_samples, parse_conversation, train)

STATE, WEIGHTS, CKPT = "trainer_state.pt", "adapter_model.safetensors", "step-000001"


def _conversations(n: int = 4) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"add {i} and {i + 1}"},
                          {"role": "assistant", "content": f"The answer is {2 * i + 1}."}]} for i in range(n)]


def _run(tiny_model_dir: Path, out: Path, **kw: Any):
    """A 2-step schedule of a rank-4 LoRA on the tiny model (one fresh load: train wraps it in place)."""
    lm = load_model(str(tiny_model_dir), device="cpu", adapter=None)
    convs = [parse_conversation(c, source=f"c{i}") for i, c in enumerate(_conversations())]
    samples, _ = conversation_samples(lm, convs, max_length=128)
    config = TrainConfig(model=str(tiny_model_dir), output_dir=str(out), steps=2, batch_size=2, r=4, save_every=0,
                         eval_every=0, progress=False, **kw)
    return train(config, samples, [], lm=lm)


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Stopped after step 1 of 2: ``checkpoints/step-000001`` holds the trainer state and an adapter."""
    out = tmp_path_factory.mktemp("crafted") / "run"
    result = _run(tiny_model_dir, out, max_steps_this_run=1)
    assert result.step == 1 and not result.finished
    assert [p.name for p in checkpoints(out)] == [CKPT]
    return out


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    """The tiny model without an adapter, an engine on it and its logits: must survive every refusal."""
    lm = load_model(str(tiny_model_dir), device="cpu", adapter=None)
    ids = lm.encode("The quick brown fox")
    return lm, local_engine(lm, acquire_timeout=None), ids, full_logits(lm, ids)


def _still_usable(base) -> None:
    lm, engine, ids, logits = base
    assert torch.equal(full_logits(lm, ids), logits)
    reply = engine.chat([Message("user", "hi")], config=GenerationConfig(max_new_tokens=2))
    assert reply.finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------- checkpoints

def _state(change: Callable[[dict], Any], replace: bool = False) -> Callable[[Path], None]:
    """Rewrite trainer_state.pt: ``change`` edits the loaded dict in place (``replace``: returns a new state)."""
    def apply(ckpt: Path) -> None:
        state = torch.load(ckpt / STATE, weights_only=True)
        new = change(state)
        torch.save(new if replace else state, ckpt / STATE)
    return apply


def _first(mapping: dict) -> Any:
    return next(iter(mapping))


def _set_rng(value: Any) -> Callable[[Path], None]:
    return lambda ckpt: torch.save(value, ckpt / "rng_0.pt")


def _truncate(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[: (d / name).stat().st_size // 2])


#: case -> (how the checkpoint is damaged, what the message must say)
CHECKPOINT_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "step-negative": (_state(lambda s: s.update(step=-7)), "at step -7, outside 0..steps=2"),
    "step-beyond-steps": (_state(lambda s: s.update(step=99)), "pass steps >= 99"),
    "step-float": (_state(lambda s: s.update(step=1.0)), "'step' is a float, not an integer"),
    "step-bool": (_state(lambda s: s.update(step=True)), "'step' is a bool"),
    "state-is-a-list": (_state(lambda s: [s], replace=True), f"{STATE} holds a list"),
    "missing-optimizer": (_state(lambda s: s.pop("optimizer")), "lacks 'optimizer'"),
    "missing-trainable": (_state(lambda s: s.pop("trainable")), "lacks 'trainable'"),
    "trainable-is-a-list": (_state(lambda s: s.update(trainable=list(s["trainable"].values()))),
                            "'trainable' is a list"),
    "config-is-a-list": (_state(lambda s: s.update(config=[1])), "'config' is a list"),
    "config-differs": (_state(lambda s: s["config"].update(r=8)), "the config differs in ['r']"),
    "param-wrong-shape": (_state(lambda s: s["trainable"].update({_first(s["trainable"]): torch.zeros(3, 3)})),
                          "is a (3, 3) torch.float32 tensor, this model's is"),
    "param-wrong-dtype": (_state(lambda s: s["trainable"].update({k: v.double() for k, v in s["trainable"].items()})),
                          "torch.float64 tensor, this model's is"),
    "param-not-a-tensor": (_state(lambda s: s["trainable"].update({_first(s["trainable"]): [1.0, 2.0]})), "is a list"),
    "param-missing": (_state(lambda s: s["trainable"].pop(_first(s["trainable"]))), "missing ['"),
    "param-unknown": (_state(lambda s: s["trainable"].update(bogus=torch.zeros(2))), "unknown ['bogus']"),
    "param-nan": (_state(lambda s: s["trainable"].update({k: v * math.nan for k, v in s["trainable"].items()})),
                  "holds NaN or infinite values"),
    "optimizer-no-groups": (_state(lambda s: s["optimizer"].update(param_groups=[])), "optimizer state is not one"),
    "optimizer-group-too-short": (_state(lambda s: s["optimizer"]["param_groups"][0]["params"].pop()),
                                  "param_groups do not match"),
    "optimizer-lacks-lr": (_state(lambda s: s["optimizer"]["param_groups"][0].pop("lr")), "lack one of"),
    "optimizer-lr-string": (_state(lambda s: s["optimizer"]["param_groups"][0].update(lr="fast")),
                            "optimizer setting 'lr' is 'fast'"),
    "optimizer-moment-wrong-shape": (_state(lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(5))),
                                     "'exp_avg' of parameter 0 is a (5,) torch.float32 tensor"),
    "optimizer-moment-inf": (_state(lambda s: s["optimizer"]["state"][0]["exp_avg_sq"].fill_(math.inf)),
                             "'exp_avg_sq' of parameter 0"),
    "optimizer-unknown-param": (_state(lambda s: s["optimizer"]["state"].update({999: {}})), "unknown parameter 999"),
    "scheduler-base-lrs-none": (_state(lambda s: s["scheduler"].update(base_lrs=None)), "scheduler state is not one"),
    "scheduler-stray-attribute": (_state(lambda s: s["scheduler"].update(optimizer=1)), "scheduler state is not one"),
    "scheduler-other-step": (_state(lambda s: s["scheduler"].update(last_epoch=5)), "scheduler is at step 5"),
    "history-not-pairs": (_state(lambda s: s.update(history={"train_loss": 5})), "'history' must map"),
    "state-not-a-torch-file": (lambda d: (d / STATE).write_bytes(b"\x00garbage" * 8), "can read safely"),
    "state-truncated": (_truncate(STATE), "can read safely"),
    "rng-not-a-state": (_set_rng({"python": 5}), "rng_0.pt is not a saved random state"),
    "rng-wrong-torch-state": (_set_rng({"python": [3, torch.zeros(625, dtype=torch.int64), None],
                                        "torch": torch.zeros(3)}), "rng_0.pt is not a saved random state"),
}


def _crafted_run(run_dir: Path, tmp_path: Path, change: Callable[[Path], None]) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    change(out / "checkpoints" / CKPT)
    return out, out / "checkpoints" / CKPT


def _assert_checkpoint_refusal(exc: BaseException, ckpt: Path, fragment: str) -> None:
    assert isinstance(exc, FlashBackError) and isinstance(exc, TrainError) and isinstance(exc, CheckpointError)
    text = str(exc)
    assert str(ckpt) in text and fragment in text, text
    assert "Delete that checkpoint directory" in text and "without --resume" in text, text


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_crafted_checkpoint_is_refused_with_a_clear_error(case, run_dir, tiny_model_dir, tmp_path):
    change, fragment = CHECKPOINT_CASES[case]
    out, ckpt = _crafted_run(run_dir, tmp_path, change)
    with pytest.raises(CheckpointError) as info:
        _run(tiny_model_dir, out, resume=True)
    _assert_checkpoint_refusal(info.value, ckpt, fragment)


def test_the_untouched_checkpoint_resumes(run_dir, tiny_model_dir, tmp_path):
    """The control: the checkpoint every case is crafted from resumes to the end."""
    out, _ = _crafted_run(run_dir, tmp_path, lambda d: None)
    result = _run(tiny_model_dir, out, resume=True)
    assert result.resumed_from == 1 and result.step == 2 and result.finished


def test_following_the_advice_trains_again(run_dir, tiny_model_dir, tmp_path):
    """After a refusal the output directory is usable: delete the bad checkpoint and resume."""
    out, ckpt = _crafted_run(run_dir, tmp_path, CHECKPOINT_CASES["step-negative"][0])
    with pytest.raises(CheckpointError):
        _run(tiny_model_dir, out, resume=True)
    shutil.rmtree(ckpt)
    result = _run(tiny_model_dir, out, resume=True)
    assert result.resumed_from is None and result.step == 2 and result.finished
    assert torch.isfinite(full_logits(load_model(str(tiny_model_dir), adapter=str(out), device="cpu"), [1, 2])).all()


def test_an_interrupted_save_is_never_resumed_from(run_dir, tmp_path):
    out, ckpt = _crafted_run(run_dir, tmp_path, lambda d: None)
    shutil.copytree(ckpt, ckpt.with_name("step-000002.tmp"))  # a save killed before its rename
    shutil.copytree(ckpt, ckpt.with_name("step-x"))
    assert [p.name for p in checkpoints(out)] == [CKPT]


def test_cli_train_resume_with_a_bad_checkpoint_exits_2_without_traceback(run_dir, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from flashback_agents.cli import app

    out, ckpt = _crafted_run(run_dir, tmp_path, CHECKPOINT_CASES["step-negative"][0])
    data = tmp_path / "t.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in _conversations()) + "\n")
    res = CliRunner().invoke(app, ["train", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out),
                                   "--steps", "2", "--batch-size", "2", "--lora-r", "4", "--max-length", "128",
                                   "--save-every", "0", "--eval-every", "0", "--resume"])
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "error: Cannot resume from" in res.stderr and "step -7" in res.stderr and str(ckpt) in res.stderr
    assert "Traceback" not in res.output


# ----------------------------------------------------------------------------- adapters

def _json(name: str, change: Callable[[dict], Any]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        data = json.loads((d / name).read_text())
        change(data)
        (d / name).write_text(json.dumps(data))
    return apply


def _meta(**fields: Any) -> Callable[[Path], None]:
    return _json("flashback_adapter.json", lambda m: m.update(fields))


def _fingerprint(**fields: Any) -> Callable[[Path], None]:
    return _json("flashback_adapter.json", lambda m: m["base_fingerprint"].update(fields))


def _config(**fields: Any) -> Callable[[Path], None]:
    return _json("adapter_config.json", lambda c: c.update(fields))


def _weights(change: Callable[[dict[str, torch.Tensor]], Any]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        tensors = load_file(d / WEIGHTS)
        change(tensors)
        save_file(tensors, d / WEIGHTS, metadata={"format": "pt"})
    return apply


def _each(change: Callable[[torch.Tensor], torch.Tensor], which: str = "") -> Callable[[dict], None]:
    return lambda t: t.update({k: change(v) for k, v in t.items() if which in k})


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _more_tokens(d: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
    tok.add_tokens([f"<extra{i}>" for i in range(100)])
    tok.save_pretrained(str(d))


def _drop_one(t: dict) -> None:
    del t[next(k for k in sorted(t) if "lora_B" in k)]


def _other_tokenizer(d: Path) -> None:
    """The tokenizer of another (smaller) vocabulary: the markers land on other ids."""
    from flashback_agents.testing import _tiny_tokenizer

    _tiny_tokenizer(d / "other", 300)
    shutil.move(d / "other" / "tokenizer.json", d / "tokenizer.json")
    shutil.rmtree(d / "other")


ADVICE = "adapter=None"
#: case -> (how the adapter is damaged, what the message must say)
ADAPTER_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # flashback_adapter.json
    "meta-garbage-json": (_write("flashback_adapter.json", b"\x00\x01 not json"), "is not readable JSON"),
    "meta-a-list": (_write("flashback_adapter.json", b"[1, 2]"), "must hold a JSON object"),
    "meta-fingerprint-list": (_meta(base_fingerprint=[1, 2]), "'base_fingerprint' must be an object, got a list"),
    "meta-fingerprint-string": (_meta(base_fingerprint="llama"), "'base_fingerprint' must be an object, got a string"),
    "meta-fingerprint-number": (_meta(base_fingerprint=5), "'base_fingerprint' must be an object"),
    "meta-probe-string": (_fingerprint(probe="abc"), "'base_fingerprint.probe' must be a list of finite numbers"),
    "meta-probe-strings": (_fingerprint(probe=["a"] * 64), "'base_fingerprint.probe' must be a list of finite"),
    "meta-probe-nested": (_fingerprint(probe=[[1.0, 2.0]] * 64), "'base_fingerprint.probe' must be a list of finite"),
    "meta-probe-nan": (_fingerprint(probe=[math.nan] * 64), "'base_fingerprint.probe' must be a list of finite"),
    "meta-probe-bools": (_fingerprint(probe=[True] * 64), "'base_fingerprint.probe' must be a list of finite"),
    "meta-fingerprint-field-object": (_fingerprint(hidden_size={"a": 1}),
                                      "'base_fingerprint.hidden_size' must be a number or a string"),
    "meta-marker-ids-int": (_meta(marker_ids=5), "'marker_ids' must be a list, got an integer"),
    "meta-marker-ids-strings": (_meta(marker_ids=["a", "b"]), "'marker_ids' must be two token ids"),
    "meta-marker-ids-three": (_meta(marker_ids=[448, 449, 450]), "'marker_ids' must be two token ids"),
    "meta-marker-ids-negative": (_meta(marker_ids=[-1, 449]), "'marker_ids' must be two token ids"),
    "meta-marker-ids-out-of-range": (_meta(marker_ids=[448, 10**6]), "are outside this model's vocabulary"),
    "meta-vocab-size-string": (_meta(vocab_size="450"), "'vocab_size' must be an integer, got a string"),
    "meta-vocab-size-other": (_meta(vocab_size=9999), "vocabulary of 9999 tokens"),
    "meta-base-model-list": (_meta(base_model=["x"]), "'base_model' must be a string"),
    # adapter_config.json
    "config-a-list": (_write("adapter_config.json", b"[1, 2]"), "must hold a JSON object"),
    "config-peft-type": (_config(peft_type="PREFIX_TUNING"), "'peft_type' must be 'LORA'"),
    "config-r-string": (_config(r="four"), "'r' must be a positive integer"),
    "config-r-zero": (_config(r=0), "'r' must be a positive integer"),
    "config-alpha-string": (_config(lora_alpha="x"), "'lora_alpha' must be a finite number"),
    "config-alpha-overflows": (_config(lora_alpha=1e300), "NaN or infinite (its LoRA weights or lora_alpha"),
    "config-targets-int": (_config(target_modules=5), "'target_modules' must be a module name"),
    "config-targets-unknown": (_config(target_modules=["nope_proj"]), "peft cannot load it on this model"),
    "config-token-indices-out-of-range": (_config(trainable_token_indices={"embed_tokens": [448, 5000]}),
                                          "'trainable_token_indices' [5000] are outside this model's vocabulary"),
    "config-token-indices-negative": (_config(trainable_token_indices={"embed_tokens": [-1, 449]}),
                                      "'trainable_token_indices' [-1] are outside"),
    "config-token-indices-string": (_config(trainable_token_indices="abc"), "'trainable_token_indices' must list"),
    "config-token-indices-floats": (_config(trainable_token_indices={"embed_tokens": [448.0, 449.5]}),
                                    "'trainable_token_indices' must list"),
    "config-token-indices-unknown-module": (_config(trainable_token_indices={"nope": [448]}),
                                            "peft cannot load it on this model"),
    # tokenizer files
    "tokenizer-json-garbage": (_write("tokenizer.json", b"\xff\x00garbage"), "its tokenizer files cannot be loaded"),
    "tokenizer-json-empty-object": (_write("tokenizer.json", b"{}"), "its tokenizer files cannot be loaded"),
    "tokenizer-json-truncated": (_truncate("tokenizer.json"), "its tokenizer files cannot be loaded"),
    "tokenizer-config-garbage": (_write("tokenizer_config.json", b"{garbage"), "its tokenizer files cannot be loaded"),
    "tokenizer-of-another-vocabulary": (_other_tokenizer, "it was trained for another tokenizer"),
    "tokenizer-too-many-tokens": (_more_tokens, "it belongs to another model"),
    # adapter_model.safetensors
    "weights-missing": (lambda d: (d / WEIGHTS).unlink(), f"it has no {WEIGHTS}"),
    "weights-a-directory": (lambda d: ((d / WEIGHTS).unlink(), (d / WEIGHTS).mkdir()), f"it has no {WEIGHTS}"),
    "weights-empty": (_write(WEIGHTS, b""), "is truncated or not a safetensors file"),
    "weights-garbage": (_write(WEIGHTS, b"\x00garbage" * 32), "is truncated or not a safetensors file"),
    "weights-truncated": (_truncate(WEIGHTS), "is truncated or not a safetensors file"),
    "weights-no-tensors": (_weights(lambda t: t.clear()), "holds no tensors"),
    "weights-all-nan": (_weights(_each(lambda v: torch.full_like(v, math.nan))), "holds NaN or infinite values"),
    "weights-one-inf": (_weights(lambda t: t[next(k for k in sorted(t) if "lora_B" in k)].view(-1).__setitem__(
        0, math.inf)), "holds NaN or infinite values"),
    "weights-nan-marker-rows": (_weights(_each(lambda v: v * math.nan, "trainable_tokens")), "holds NaN or infinite"),
    "weights-integer": (_weights(_each(lambda v: v.to(torch.int32))), "not floating point"),
    "weights-wrong-shape": (_weights(_each(lambda v: torch.zeros(3, v.shape[1]), "lora_A")), "size mismatch"),
    "weights-tensor-missing": (_weights(_drop_one), "its weights do not match its config on this model (missing"),
    "weights-tensor-unknown": (_weights(lambda t: t.update({"base_model.model.model.layers.0.self_attn.zz.lora_A"
                                                            ".weight": torch.zeros(4, 64)})), "unexpected ['"),
    "weights-huge": (_weights(_each(lambda v: torch.full_like(v, 1e30), "lora_")), "merging it makes the weight"),
}


@pytest.fixture(scope="module")
def adapter_src(run_dir, tmp_path_factory) -> Path:
    """The checkpoint's adapter files (LoRA, marker rows, tokenizer, flashback_adapter.json) alone."""
    src = tmp_path_factory.mktemp("adapter") / "adapter"
    shutil.copytree(run_dir / "checkpoints" / CKPT, src, ignore=shutil.ignore_patterns("*.pt"))
    return src


def test_the_untouched_adapter_loads_and_answers(adapter_src, tiny_model_dir):
    """The control: the adapter every case is crafted from loads, and its model gives finite logits."""
    lm = load_model(str(tiny_model_dir), adapter=str(adapter_src), device="cpu")
    assert lm.adapter == str(adapter_src)
    assert torch.isfinite(full_logits(lm, lm.encode("hello world"))).all()


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_crafted_adapter_is_refused_with_a_clear_error(case, adapter_src, tiny_model_dir, base, tmp_path):
    change, fragment = ADAPTER_CASES[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_src, adapter)
    change(adapter)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tiny_model_dir), adapter=str(adapter), device="cpu")
    exc = info.value
    assert isinstance(exc, FlashBackError)
    text = str(exc)
    assert str(adapter) in text and fragment in text and ADVICE in text, text
    assert "re-train" in text or "trained" in text, text
    _still_usable(base)


def test_cli_chat_with_a_nan_adapter_is_one_error_line(adapter_src, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from flashback_agents.cli import app

    adapter = tmp_path / "nan-adapter"
    shutil.copytree(adapter_src, adapter)
    ADAPTER_CASES["weights-all-nan"][0](adapter)
    res = CliRunner().invoke(app, ["chat", "--model", str(tiny_model_dir), "--adapter", str(adapter)], input="hi\n")
    assert res.exit_code != 0 and "NaN or infinite" in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("meta", [b"\x00\x01 not json", b"[1, 2]"])
def test_export_of_an_adapter_with_a_damaged_meta_file_is_a_train_error(meta, adapter_src, tmp_path):
    from flashback_agents.training import export_merged

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_src, adapter)
    (adapter / "flashback_adapter.json").write_bytes(meta)
    with pytest.raises(TrainError, match="flashback_adapter.json .*re-train the adapter"):
        export_merged(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
