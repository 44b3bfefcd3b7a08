"""Adapter trainer: transcript readers, samples (inference layout), LoRA + marker training, save/load, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from flashback_agents import Layout, Message, load_model  # noqa: E402
from flashback_agents.training import (IGNORE, TrainConfig, TrainError, TranscriptError, checkpoints,  # noqa: E402
                                       conversation_sample, conversation_samples, evaluate, export_merged,
                                       length_batches, parse_conversation, read_transcripts, train)
from flashback_agents.training.transcripts import Conversation  # noqa: E402


def make_conversations(n: int = 12) -> list[dict]:
    """Short OpenAI-style agent conversations: a tool call, a tool result, an answer."""
    out = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        out.append({"messages": [
            {"role": "user", "content": f"add {a} and {b}"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"c{i}", "type": "function",
                 "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": str(a + b)},
            {"role": "assistant", "content": f"The answer is {a + b}."},
        ]})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture()
def fresh_lm(tiny_model_dir):
    """The trainer wraps the model in place: never hand it the session-wide tiny_lm."""
    return load_model(str(tiny_model_dir), device="cpu")


def samples_for(lm, n=12, max_length=256):
    convs = [parse_conversation(c, source=f"c{i}") for i, c in enumerate(make_conversations(n))]
    samples, stats = conversation_samples(lm, convs, max_length=max_length)
    assert stats.kept == n
    return samples


# ----------------------------------------------------------------------------- readers

def test_openai_reader_tool_calls_and_documents(tmp_path):
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why did it fail?", "documents": ["log line 1"]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "x1", "type": "function", "function": {"name": "grep", "arguments": '{"pattern": "ERROR"}'}},
            {"id": "x2", "type": "function", "function": {"name": "tail", "arguments": {"n": 5}}}]},
        {"role": "tool", "tool_call_id": "x1", "name": "grep", "content": "ERROR disk full"},
        {"role": "tool", "tool_call_id": "x2", "content": [{"type": "text", "text": "last lines"}]},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Disk is full."}],
        "documents": [["extra doc"], ["second turn doc"]],
        "tools": [{"type": "function", "function": {"name": "grep", "parameters": {}}}]}
    tr = read_transcripts(write_jsonl(tmp_path / "a.jsonl", [row]))
    assert len(tr) == 1 and tr.n_skipped == 0
    conv = tr.conversations[0]
    assert conv.source == f"{tmp_path / 'a.jsonl'}:1"
    m = conv.messages
    assert [x.role for x in m] == ["system", "user", "assistant", "tool", "tool", "user", "assistant"]
    assert m[1].documents == ["log line 1", "extra doc"] and m[5].documents == ["second turn doc"]
    assert [(c.name, c.arguments, c.id) for c in m[2].tool_calls] == [("grep", {"pattern": "ERROR"}, "x1"),
                                                                      ("tail", {"n": 5}, "x2")]
    assert (m[3].tool_call_id, m[3].name, m[3].content) == ("x1", "grep", "ERROR disk full")
    assert m[4].content == "last lines"
    assert conv.tools[0]["function"]["name"] == "grep"


def _reference_messages() -> list[Message]:
    conv = parse_conversation({"messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "res"},
        {"role": "assistant", "content": "done"}]})
    return conv.messages


def test_langchain_dump_reads_like_openai(tmp_path):
    lc = pytest.importorskip("langchain_core.messages")
    msgs = [lc.SystemMessage("sys"), lc.HumanMessage("hi"),
            lc.AIMessage("", tool_calls=[{"name": "f", "args": {"a": 1}, "id": "c1"}]),
            lc.ToolMessage("res", tool_call_id="c1", name="f"), lc.AIMessage([{"type": "text", "text": "done"}])]
    dump = lc.messages_to_dict(msgs)
    # a .json file with one dump, and a JSONL file with one dump per line
    (tmp_path / "one.json").write_text(json.dumps(dump))
    write_jsonl(tmp_path / "many.jsonl", [dump, {"messages": dump}])
    for path, fmt in ((tmp_path / "one.json", "langchain"), (tmp_path / "many.jsonl", "auto")):
        tr = read_transcripts(path, format=fmt)
        assert all(c.messages == _reference_messages() for c in tr)
    assert len(read_transcripts(tmp_path / "many.jsonl")) == 2


def test_llamaindex_history_reads_like_openai(tmp_path):
    types = pytest.importorskip("llama_index.core.base.llms.types")
    ChatMessage, ToolCallBlock = types.ChatMessage, types.ToolCallBlock
    history = [ChatMessage(role="system", content="sys"), ChatMessage(role="user", content="hi"),
               ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}),
               ChatMessage(role="tool", content="res", additional_kwargs={"tool_call_id": "c1", "name": "f"}),
               ChatMessage(role="assistant", content="done")]
    dump = [m.model_dump(mode="json") for m in history]
    tr = read_transcripts(write_jsonl(tmp_path / "li.jsonl", [dump]), format="llamaindex")
    assert tr.conversations[0].messages == _reference_messages()
    # newer llama-index: tool calls as blocks
    blocks = ChatMessage(role="assistant", blocks=[ToolCallBlock(tool_call_id="c1", tool_name="f", tool_kwargs={"a": 1})])
    dump[2] = blocks.model_dump(mode="json")
    assert parse_conversation(dump).messages == _reference_messages()


def test_malformed_lines_report_file_line_and_reason(tmp_path):
    good = make_conversations(1)[0]
    orphan = {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "zz", "content": "r"},
                           {"role": "assistant", "content": "y"}]}
    bad_args = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}
    rows = [good, "{broken json", {"messages": [{"role": "wizard", "content": "x"}]}, "", bad_args, orphan,
            {"messages": [{"role": "user", "content": "no reply"}]}, good]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(TranscriptError) as err:
        read_transcripts(path)
    assert str(err.value).startswith(f"{path}:2: invalid JSON")
    assert err.value.where == f"{path}:2"
    tr = read_transcripts(path, skip_invalid=True)
    assert len(tr) == 2 and tr.n_skipped == 5
    reasons = {e.where.rsplit(":", 1)[1]: e.reason for e in tr.skipped}
    assert set(reasons) == {"2", "3", "5", "6", "7"}  # line 4 is blank: not a conversation
    assert "'wizard'" in reasons["3"]
    assert "not valid JSON" in reasons["5"] and "'f'" in reasons["5"]
    assert "zz" in reasons["6"]
    assert "no assistant message" in reasons["7"]
    with pytest.raises(TranscriptError, match="cannot tell the format"):
        parse_conversation([{"foo": 1}])


# ----------------------------------------------------------------------------- samples

def test_conversation_sample_is_the_inference_rendering_with_assistant_only_labels(tiny_lm):
    layout = Layout(tiny_lm)
    conv = parse_conversation(make_conversations(1)[0])
    sample, truncated = conversation_sample(layout, conv, max_length=4096)
    assert not truncated
    # one code path: exactly the ids the integrations send at inference
    assert sample.input_ids == Layout(tiny_lm).render(conv.messages, add_generation_prompt=False)
    trained = [t for t in sample.labels if t != IGNORE]
    eos = tiny_lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    call = '<tool_call>{"name": "add", "arguments": {"a": 0, "b": 0}}</tool_call>'
    expected = tiny_lm.encode(call) + [eos] + tiny_lm.encode("The answer is 0.") + [eos]
    assert trained == expected
    # the assistant header (generation prompt) is never trained, the end of turn is
    head = layout.generation_prompt()
    ids = sample.input_ids
    starts = [i for i in range(len(ids)) if ids[i:i + len(head)] == head]
    assert len(starts) == 2
    for s in starts:
        assert all(sample.labels[j] == IGNORE for j in range(s, s + len(head)))
        assert sample.labels[s + len(head)] != IGNORE


def test_truncation_drops_whole_documents_and_turns(tiny_lm):
    layout = Layout(tiny_lm)
    docs = ["first retrieved document " * 3, "second retrieved document " * 3, "third " * 10]
    conv = Conversation([Message("user", "question?", documents=docs), Message("assistant", "short answer"),
                         Message("user", "more"), Message("assistant", "again " * 20)])
    full, _ = conversation_sample(layout, conv, max_length=4096)
    one_doc = layout.render([Message("user", "question?", documents=docs[:1]), Message("assistant", "short answer")],
                            add_generation_prompt=False)
    sample, truncated = conversation_sample(layout, conv, max_length=len(one_doc) + 3)
    assert truncated and len(sample) <= len(one_doc) + 3 < len(full)
    assert sample.input_ids == one_doc  # two whole documents and the last turns dropped, nothing cut
    left, right = tiny_lm.marker_ids
    assert sample.input_ids.count(left) == sample.input_ids.count(right) == 1
    assert sample.n_trained > 0
    # if not even one assistant reply fits, the conversation gives no sample
    assert conversation_sample(layout, conv, max_length=20)[0] is None


def test_length_batches_deterministic_and_complete():
    lengths = [5, 50, 7, 48, 6, 49, 8, 51, 9, 47, 4, 46]
    a = length_batches(lengths, 2, seed=1, epoch=0, bucket_batches=6)
    assert a == length_batches(lengths, 2, seed=1, epoch=0, bucket_batches=6)
    assert a != length_batches(lengths, 2, seed=1, epoch=1, bucket_batches=6)
    assert sorted(i for b in a for i in b) == list(range(12))
    assert all(abs(lengths[b[0]] - lengths[b[-1]]) <= 3 for b in a)  # bucketed: short with short


# ----------------------------------------------------------------------------- training

def _base_key(name: str) -> str | None:
    """State-dict key of the underlying base weight for a peft key (None for adapter weights)."""
    if "lora_" in name or "trainable_tokens" in name:
        return None
    return (name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".token_adapter", ""))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One 20-step run on a transcript file written here; shared by the checks below."""
    out = tmp_path_factory.mktemp("adapter")
    data = write_jsonl(out.parent / "train.jsonl", make_conversations(12))
    lm = load_model(str(tiny_model_dir), device="cpu")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    samples, _ = conversation_samples(lm, read_transcripts(data), max_length=256)
    config = TrainConfig(model=str(tiny_model_dir), output_dir=str(out / "run"), steps=20, learning_rate=1e-2,
                         batch_size=4, eval_every=10, save_every=10, seed=0, progress=False)
    result = train(config, samples, samples[:4], lm=lm)
    return {"lm": lm, "before": before, "samples": samples, "result": result, "config": config}


def test_training_lowers_loss_and_touches_only_lora_and_markers(trained, tiny_model_dir):
    result, before = trained["result"], trained["before"]
    assert result.step == 20 and result.finished and len(result.train_loss) == 20
    losses = [v for _, v in result.train_loss]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05
    assert [s for s, _ in result.eval_loss] == [10, 20]
    base_lm = load_model(str(tiny_model_dir), device="cpu")
    assert evaluate(result.model, trained["samples"][:4], 0, 4) < evaluate(base_lm.model, trained["samples"][:4], 0, 4)
    # base weights bit-identical inside the peft model; only LoRA and marker rows are trainable
    model = result.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n and ("k_proj" in n or "v_proj" in n)) or "trainable_tokens" in n
                             for n in trainable)
    seen = 0
    for name, value in model.state_dict().items():
        key = _base_key(name)
        if key is not None:
            assert torch.equal(value, before[key]), key
            seen += 1
    assert seen == len(before)  # every base tensor (the tied lm_head included) checked
    # after merge: every non-marker embedding row and every non-K/V weight bit-identical
    merged = load_model(str(tiny_model_dir), adapter=result.output_dir, device="cpu").model.state_dict()
    markers = list(base_lm.marker_ids)
    others = [i for i in range(before["model.embed_tokens.weight"].shape[0]) if i not in markers]
    emb = merged["model.embed_tokens.weight"]
    assert torch.equal(emb[others], before["model.embed_tokens.weight"][others])
    assert not torch.equal(emb[markers], before["model.embed_tokens.weight"][markers])
    for key, value in before.items():
        if key == "model.embed_tokens.weight" or key == "lm_head.weight":
            continue
        same = torch.equal(merged[key], value)
        assert same != ("k_proj" in key or "v_proj" in key), key


def test_saved_adapter_loads_with_identical_logits(trained, tiny_model_dir, tmp_path):
    result = trained["result"]
    out = Path(result.output_dir)
    meta = json.loads((out / "flashback_adapter.json").read_text())
    assert meta["base_model"] == str(tiny_model_dir) and meta["marker_ids"] == list(trained["lm"].marker_ids)
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "adapter_model.safetensors").stat().st_size < 200_000  # LoRA + 2 rows, not the embedding
    ids = torch.tensor([trained["samples"][0].input_ids])
    assert trained["lm"].marker_ids[0] in ids[0].tolist()
    with torch.no_grad():
        ref = result.model(input_ids=ids).logits
        loaded = load_model(str(tiny_model_dir), adapter=str(out), device="cpu")
        got = loaded.model(input_ids=ids).logits
    assert loaded.marker_ids == trained["lm"].marker_ids
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # export merges into a plain HF directory that load_model() takes as a base model
    merged_dir = export_merged(out, tmp_path / "merged")
    plain = load_model(str(merged_dir), device="cpu")
    with torch.no_grad():
        assert torch.equal(plain.model(input_ids=ids).logits, got)
    assert plain.marker_ids == loaded.marker_ids


def test_checkpoints_kept_and_output_dir_guard(trained):
    config = trained["config"]
    assert [p.name for p in checkpoints(config.output_dir)] == ["step-000010", "step-000020"]
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(config, trained["samples"])


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    def run(out, **kw):
        lm = load_model(str(tiny_model_dir), device="cpu")
        samples = samples_for(lm, n=6, max_length=128)
        cfg = TrainConfig(model=str(tiny_model_dir), output_dir=str(out), steps=6, learning_rate=5e-3,
                          batch_size=2, grad_accum=2, save_every=0, eval_every=0, lora_dropout=0.05,
                          seed=3, progress=False, **kw)
        return train(cfg, samples, [], lm=lm)

    full = run(tmp_path / "full")
    part = run(tmp_path / "part", max_steps_this_run=3)
    assert part.step == 3 and not part.finished
    assert not (tmp_path / "part" / "adapter_config.json").exists()
    assert [p.name for p in checkpoints(tmp_path / "part")] == ["step-000003"]
    rest = run(tmp_path / "part", resume=True)
    assert rest.resumed_from == 3 and rest.step == 6 and rest.finished
    assert [s for s, _ in rest.train_loss] == list(range(1, 7))
    assert rest.train_loss == full.train_loss
    a = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in rest.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # a changed LoRA shape cannot resume from that checkpoint
    with pytest.raises(TrainError, match="config differs"):
        run(tmp_path / "part", resume=True, r=8)


# ----------------------------------------------------------------------------- CLI

def test_cli_train_export_and_malformed_input(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from flashback_agents.cli import app

    runner = CliRunner()
    data = write_jsonl(tmp_path / "t.jsonl", make_conversations(4) + ['{"messages": 3}'])
    out = tmp_path / "cli-adapter"
    args = ["train", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--max-length", "128", "--save-every", "0", "--eval-every", "0", "--json", "--gradient-checkpointing"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert f"{data}:5: 'messages' must be a non-empty list" in res.output and "--skip-invalid" in res.output
    res = runner.invoke(app, args + ["--skip-invalid"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["skipped_invalid"] == 1 and summary["conversations"] == 4 and summary["step"] == 2
    assert (out / "flashback_adapter.json").is_file()
    res = runner.invoke(app, ["export", "--adapter", str(out), "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert load_model(str(tmp_path / "m"), device="cpu").marker_ids == load_model(str(tiny_model_dir)).marker_ids
    res = runner.invoke(app, ["train", "--model", str(tiny_model_dir), "--out", str(out)])
    assert res.exit_code == 2 and "nothing to train on" in res.output


def test_cli_train_on_ralm_corpus_with_a_store(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from flashback_agents.cli import app
    from flashback_agents.testing import _CORPUS

    retrieval = pytest.importorskip("flashback_agents.retrieval")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(_CORPUS):
        (corpus / f"d{i}.txt").write_text((text + " ") * 4)
    try:
        retrieval.index_paths([corpus], tmp_path / "store", retriever="bm25", progress=False)
    except Exception as exc:  # the retrieval package is developed separately
        pytest.skip(f"cannot build a bm25 store here: {exc}")
    out = tmp_path / "ralm-adapter"
    res = CliRunner().invoke(app, ["train", "--ralm-corpus", str(corpus), "--retriever-store", str(tmp_path / "store"),
                                   "--model", str(tiny_model_dir), "--out", str(out), "--steps", "2",
                                   "--batch-size", "2", "--max-length", "96", "--stride", "16", "--query-tokens", "16",
                                   "--top-k", "1", "--save-every", "0", "--eval-every", "0", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["ralm_texts"] == len(_CORPUS) and summary["ralm_samples"] >= 1  # own file never retrieved
    assert summary["retrievals"] > 0 and summary["step"] == 2
    assert (out / "adapter_config.json").is_file()
    # without a store, the corpus's own chunks are the retrieval index (never a text's own file)
    out2 = tmp_path / "ralm-adapter-2"
    res = CliRunner().invoke(app, ["train", "--ralm-corpus", str(corpus), "--model", str(tiny_model_dir),
                                   "--out", str(out2), "--steps", "1", "--batch-size", "1", "--stride", "8",
                                   "--query-tokens", "8", "--top-k", "1", "--ralm-window", "48",
                                   "--chunk-tokens", "16", "--save-every", "0", "--eval-every", "0", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["ralm_samples"] > 0 and (out2 / "adapter_config.json").is_file()


def test_ralm_corpus_store_articles_are_retrieved_not_trained(tiny_model_dir, tmp_path):
    """A JSONL corpus line marked ``store`` joins the retrieval index but yields no training sample;
    several ``--ralm-corpus`` paths combine; a corpus of stores only is a clear error."""
    from typer.testing import CliRunner

    from flashback_agents.cli import app
    from flashback_agents.training.ralm_corpus import CorpusError, read_ralm_corpus

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    store = " ".join(words * 12)
    (tmp_path / "logs.jsonl").write_text(
        json.dumps({"source": "sys[:10]", "store": True, "text": store}) + "\n"
        + json.dumps({"source": "sys[10:12]", "text": " ".join(reversed(words * 6))}) + "\n" + json.dumps("plain text line") + "\n")
    (tmp_path / "wiki.txt").write_text(" = Title A = \n" + " ".join(words[:6] * 10) + "\n")
    corpus = read_ralm_corpus([tmp_path / "wiki.txt", tmp_path / "logs.jsonl"])
    assert [s for s, _ in corpus.texts] == [f"{tmp_path / 'wiki.txt'}#Title A", "sys[10:12]", f"{tmp_path / 'logs.jsonl'}:3"]
    assert corpus.store == [("sys[:10]", store)] and len(corpus.articles) == 4
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "source": 3}) + "\n")
    with pytest.raises(CorpusError, match="bad.jsonl:1: 'source' must be a string"):
        read_ralm_corpus(tmp_path / "bad.jsonl")
    common = ["--model", str(tiny_model_dir), "--steps", "1", "--batch-size", "1", "--stride", "8", "--query-tokens", "8",
              "--top-k", "1", "--ralm-window", "48", "--chunk-tokens", "16", "--save-every", "0", "--eval-every", "0",
              "--json"]
    res = CliRunner().invoke(app, ["train", "--ralm-corpus", str(tmp_path / "wiki.txt"), "--ralm-corpus",
                                   str(tmp_path / "logs.jsonl"), "--out", str(tmp_path / "a")] + common)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["ralm_texts"] == 3 and summary["ralm_store_articles"] == 1 and summary["ralm_samples"] > 0
    (tmp_path / "only.jsonl").write_text(json.dumps({"source": "s", "store": True, "text": store}) + "\n")
    res = CliRunner().invoke(app, ["train", "--ralm-corpus", str(tmp_path / "only.jsonl"), "--out", str(tmp_path / "b")]
                             + common)
    assert res.exit_code == 2 and "no RALM training text" in res.output


@pytest.mark.model
def test_default_model_few_steps_and_reload(tmp_path):
    """A few steps on the real default model; the saved adapter loads back with the same logits."""
    from flashback_agents import DEFAULT_MODEL

    lm = load_model(DEFAULT_MODEL, adapter=None, device="cpu")  # the trainer adapts the bare model
    samples = samples_for(lm, n=4, max_length=128)
    cfg = TrainConfig(model=DEFAULT_MODEL, output_dir=str(tmp_path / "a"), steps=3, batch_size=2,
                      save_every=0, eval_every=0, lora_dropout=0.0, progress=False)
    result = train(cfg, samples, [], lm=lm)
    assert result.step == 3 and all(v == v for _, v in result.train_loss)
    ids = torch.tensor([samples[0].input_ids])
    with torch.no_grad():
        ref = result.model(input_ids=ids).logits
        got = load_model(DEFAULT_MODEL, adapter=str(tmp_path / "a"), device="cpu").model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
