"""Perplexity evaluation (eval ppl): exactness against plain forwards, same tokens in every setting, CLI."""

from __future__ import annotations

import math

import pytest
import torch

from flashback_agents.evaluation import perplexity as P
from flashback_agents.evaluation import ppl_adapter, ppl_data

WORDS = ("river castle engine orbit violin harbor glacier lantern meadow saddle copper falcon tunnel "
         "quartz signal monsoon ember ledger prism canyon").split()


def _article(i: int, n: int = 120) -> str:
    body = " ".join(WORDS[(i * 7 + j * (i % 5 + 1)) % len(WORDS)] for j in range(n))
    return f" = Article {i} = \n \n {body} . \n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    wt = d / "wikitext-2"
    wt.mkdir()
    (wt / "valid.txt").write_text("".join(_article(i) for i in range(12)))
    (wt / "test.txt").write_text("".join(_article(i + 100) for i in range(6)))
    log = d / "loghub" / "Demo"
    log.mkdir(parents=True)
    (log / "Demo_2k.log").write_text("".join(f"2024-01-01 00:00:{i % 60:02d} INFO svc-{i % 7}: job {i} "
                                             f"{WORDS[i % len(WORDS)]} done\n" for i in range(200)))
    return d


CFG = P.PplConfig(tokens=96, window=64, stride=16, query_tokens=32, top_ks=(1, 2), chunk_tokens=32, chunk_overlap=4)


@pytest.fixture(scope="module")
def setup(tiny_lm, corpus_dir):
    data = P.load_wikitext(corpus_dir / "wikitext-2")
    ids = P.eval_ids(tiny_lm, data.eval_text, CFG.tokens + CFG.stride)
    blocks = P.make_blocks(ids, CFG.window, CFG.stride)
    retriever = P.build_retriever(tiny_lm, data.corpus_texts, CFG)
    ret = P.Retrievals.run(tiny_lm, retriever, blocks, CFG)
    return data, ids, blocks, retriever, ret


def _reference_nll(lm, blocks, stride, evidence=None, where="append"):
    """Direct full forward per stride (no cache): [text][ev][cont] or [ev][text][cont]."""
    total, count = 0.0, 0
    for b, block in enumerate(blocks):
        for i in P.chunk_starts(block, stride):
            cont = block[i:i + stride]
            ev = evidence(b, i) if evidence else []
            ctx = block[:i] + ev if where == "append" else ev + block[:i]
            total += float(P.continuation_nll(lm, ctx, cont).sum())
            count += len(cont)
    return total, count


def test_blocks_cover_each_token_once(setup):
    _, ids, blocks, _, _ = setup
    evaluated = []
    for block in blocks:
        for i in P.chunk_starts(block, CFG.stride):
            evaluated += block[i:i + CFG.stride]
    assert evaluated == ids[CFG.stride:CFG.tokens + CFG.stride]
    assert len(evaluated) == CFG.tokens
    assert all(len(b) <= CFG.window for b in blocks)


def test_continuation_nll_matches_full_forward(tiny_lm, setup):
    _, ids, _, _, _ = setup
    ctx, cont = ids[:40], ids[40:56]
    got = P.continuation_nll(tiny_lm, ctx, cont)
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=torch.tensor([ids[:56]])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    want = torch.stack([-logp[40 - 1 + j, cont[j]] for j in range(len(cont))]).double()
    assert got.shape == (16,)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_no_retrieval_equals_plain_model(tiny_lm, setup):
    _, ids, blocks, _, _ = setup
    res = P.score_append(tiny_lm, blocks, CFG.stride, None)
    total, count = 0.0, 0
    with torch.no_grad():  # one plain forward per block, score positions >= stride
        for block in blocks:
            logp = torch.log_softmax(tiny_lm.model(input_ids=torch.tensor([block])).logits[0].float(), -1)
            for j in range(CFG.stride, len(block)):
                total += float(-logp[j - 1, block[j]])
                count += 1
    assert res.tokens == count == CFG.tokens
    assert abs(res.ppl - math.exp(total / count)) / math.exp(total / count) < 1e-4
    assert res.tokens_computed == sum(len(b) for b in blocks)
    # the per-offset breakdown partitions the same tokens: offset j counts every stride's j-th token
    assert len(res.offset_tokens) == CFG.stride and sum(res.offset_tokens) == res.tokens
    assert res.offset_tokens[0] == sum(len(P.chunk_starts(b, CFG.stride)) for b in blocks)
    assert abs(sum(res.offset_nll) - res.nll) < 1e-6 * abs(res.nll)
    assert len(res.as_dict()["offset_ppl"]) == CFG.stride


def test_append_cached_matches_direct_forward(tiny_lm, setup):
    _, _, blocks, _, ret = setup
    fn = ret.append_fn(tiny_lm, 2)
    assert any(fn(b, i) for (b, i) in ret.docs)  # the synthetic corpus does give evidence
    res = P.score_append(tiny_lm, blocks, CFG.stride, fn)
    total, count = _reference_nll(tiny_lm, blocks, CFG.stride, fn, "append")
    assert res.tokens == count == CFG.tokens
    assert abs(res.nll - total) / total < 1e-4
    # every evidence block is marker-wrapped
    left, right = tiny_lm.marker_ids
    ev = next(fn(b, i) for (b, i) in ret.docs if fn(b, i))
    assert ev[0] == left and ev[-1] == right


def test_prepend_matches_direct_forward(tiny_lm, setup):
    _, _, blocks, _, ret = setup
    fn = ret.prepend_fn(tiny_lm, 1)
    res = P.score_prepend(tiny_lm, blocks, CFG.stride, fn)
    total, count = _reference_nll(tiny_lm, blocks, CFG.stride, fn, "prepend")
    assert res.tokens == count == CFG.tokens
    assert abs(res.nll - total) / total < 1e-4


def test_table_same_tokens_finite(tiny_lm, setup):
    data, _, _, retriever, _ = setup
    out = P.evaluate_perplexity(tiny_lm, data, CFG, adapter_lm=tiny_lm, retriever=retriever, progress=False)
    assert out["tokens_evaluated"] == CFG.tokens
    assert {r["tokens"] for r in out["results"]} == {CFG.tokens}
    names = [r["setting"] for r in out["rows"]]
    assert names == ["no retrieval", "no retrieval + adapter", "prepend (In-Context RALM)", "prepend + adapter",
                     "append, no markers", "append, no adapter", "append + adapter, no restated tokens",
                     "append + adapter (FlashBack)"]
    for row in out["rows"]:
        for k in CFG.top_ks:
            assert math.isfinite(row[f"ppl_top{k}"]) and row[f"ppl_top{k}"] > 1
    rows = {r["setting"]: r for r in out["rows"]}
    # the same model in the adapter slot gives the same numbers
    assert rows["append + adapter (FlashBack)"]["ppl_top2"] == pytest.approx(rows["append, no adapter"]["ppl_top2"])
    # append computes fewer positions than prepend (the point of the layout)
    assert rows["append, no adapter"]["tokens_computed_top1"] < rows["prepend (In-Context RALM)"]["tokens_computed_top1"]
    assert rows["prepend + adapter"]["ppl_top1"] == pytest.approx(rows["prepend (In-Context RALM)"]["ppl_top1"])
    # the claim ratios are the rows divided
    r = out["ratios"]
    assert r["append + adapter / prepend (top-2)"] == pytest.approx(
        rows["append + adapter (FlashBack)"]["ppl_top2"] / rows["prepend (In-Context RALM)"]["ppl_top2"])
    assert "top-1" in P.format_table(out)


def test_loghub_split(corpus_dir):
    data = P.parse_data("loghub:demo", corpus_dir)
    (source, corpus), = data.corpus_texts
    assert "job 0 " in corpus and "job 99 " in corpus and "job 100 " not in corpus
    assert data.eval_text.startswith("2024-01-01 00:00:40 INFO svc-2: job 100 ")


def test_bad_data_errors(corpus_dir):
    with pytest.raises(P.PerplexityError, match="Unknown --data"):
        P.parse_data("penn-treebank", corpus_dir)
    with pytest.raises(P.PerplexityError, match="Unknown Loghub system 'Nope'.*Demo"):
        P.parse_data("loghub:Nope", corpus_dir)
    with pytest.raises(P.PerplexityError, match="window"):
        P.PplConfig(window=16, stride=16).check()


def test_too_long_window_errors(tiny_lm, setup):
    data, _, _, retriever, _ = setup
    with pytest.raises(P.PerplexityError, match="positions"):
        P.evaluate_perplexity(tiny_lm, data, P.PplConfig(tokens=32, window=512), retriever=retriever, progress=False)


# ---------------------------------------------------------------------------------------- CLI
def _cli(args):
    from typer.testing import CliRunner

    from flashback_agents.cli import app

    return CliRunner().invoke(app, args)


def test_cli_help():
    res = _cli(["eval", "ppl", "--help"])
    assert res.exit_code == 0
    for opt in ("--data", "--tokens", "--stride", "--query-tokens", "--restate", "--top-k", "--adapter",
                "--train-adapter-steps", "--quick", "--json", "--plot", "--model"):
        assert opt in res.output


def test_cli_bad_data_errors_clearly():
    res = _cli(["eval", "ppl", "--data", "nonsense", "--train-adapter-steps", "0"])
    assert res.exit_code == 2
    assert "error: Unknown --data 'nonsense'" in res.output
    assert "Traceback" not in res.output
    res = _cli(["eval", "ppl", "--top-k", "1,x"])
    assert res.exit_code == 2 and "--top-k" in res.output
    res = _cli(["eval", "ppl", "--restate", "-1"])
    assert res.exit_code == 2 and "restate must be an integer >= 0" in res.output and "Traceback" not in res.output


def test_cli_runs_on_tiny_model(tiny_model_dir, corpus_dir, monkeypatch, tmp_path):
    import json

    for module in (ppl_data, ppl_adapter):  # where the data and the adapter's training text are read
        monkeypatch.setattr(module, "shared_data_dir", lambda: corpus_dir)
    plot = tmp_path / "ppl.png"
    res = _cli(["eval", "ppl", "--model", str(tiny_model_dir), "--tokens", "48", "--window", "64",
                "--top-k", "1", "--train-adapter-steps", "0", "--json", "--no-progress", "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert out["tokens_evaluated"] == 48
    assert [r["setting"] for r in out["rows"]] == ["no retrieval", "prepend (In-Context RALM)", "append, no markers",
                                                   "append, no adapter"]
    assert "adapter rows skipped" in out["note"]
    assert plot.is_file()


def test_train_quick_adapter_and_reuse(tiny_model_dir, corpus_dir, tmp_path, setup):
    from flashback_agents import load_model

    out = tmp_path / "adapter"
    tcfg = P.AdapterTrainConfig(steps=2, batch_size=1, max_length=128, top_k=1)
    info = P.train_ralm_adapter(str(tiny_model_dir), CFG, tcfg, wikitext_dir=corpus_dir / "wikitext-2",
                                out_dir=out, progress=False)
    assert info["steps"] == 2 and info["reused"] is False and info["samples"] >= 2
    assert (out / "adapter_config.json").is_file() and not (out / "checkpoints").exists()
    again = P.train_ralm_adapter(str(tiny_model_dir), CFG, tcfg, wikitext_dir=corpus_dir / "wikitext-2",
                                 out_dir=out, progress=False)
    assert again["reused"] is True and again["steps"] == 2
    base = load_model(str(tiny_model_dir), device="cpu")
    tuned = load_model(str(tiny_model_dir), adapter=str(out), device="cpu")
    data, _, _, retriever, _ = setup
    cfg = P.PplConfig(tokens=32, window=64, stride=16, top_ks=(1,), chunk_tokens=32, chunk_overlap=4)
    res = P.evaluate_perplexity(base, data, cfg, adapter_lm=tuned, retriever=retriever, progress=False)
    assert res["adapter"] == str(out)
    assert {r["tokens"] for r in res["results"]} == {32}


def test_append_fn_restates_the_text_tail(tiny_lm, setup):
    """The eval's appended block is the one layout's (ralm_layout.placed_ids): evidence, then the
    last ``restate`` text tokens before the point."""
    _, _, blocks, _, ret = setup
    b, i = next((b, i) for (b, i), docs in ret.docs.items() if docs and i >= 3)
    plain, restated = ret.append_fn(tiny_lm, 1)(b, i), ret.append_fn(tiny_lm, 1, blocks, 3)(b, i)
    assert plain[-1] == tiny_lm.marker_ids[1]
    assert restated == plain + list(blocks[b][i - 3:i])
    with pytest.raises(P.PerplexityError, match="needs the blocks"):
        ret.append_fn(tiny_lm, 1, (), 3)


def test_settings_run_only_the_rows_asked_for(tiny_model_dir, corpus_dir, monkeypatch):
    """``--settings prepend,flashback`` re-measures one claim (append + adapter vs prepend) without the other
    rows; the values equal those of the full table (same tokens, same retrievals)."""
    import json

    for module in (ppl_data, ppl_adapter):  # where the data and the adapter's training text are read
        monkeypatch.setattr(module, "shared_data_dir", lambda: corpus_dir)
    args = ["eval", "ppl", "--model", str(tiny_model_dir), "--tokens", "48", "--window", "64", "--top-k", "1",
            "--train-adapter-steps", "0", "--json", "--no-progress"]
    full = json.loads((r := _cli(args)).output[r.output.index("{"):])
    res = _cli(args + ["--settings", "prepend,none"])
    assert res.exit_code == 0, res.output
    some = json.loads(res.output[res.output.index("{"):])
    assert [r["setting"] for r in some["rows"]] == ["no retrieval", "prepend (In-Context RALM)"]
    by_full = {r["setting"]: r["ppl_top1"] for r in full["rows"]}
    assert all(abs(by_full[r["setting"]] - r["ppl_top1"]) < 1e-6 for r in some["rows"])
    bad = _cli(args + ["--settings", "prepend,bogus"])
    assert bad.exit_code == 2 and "bogus" in bad.output and "Traceback" not in bad.output
