"""The document-QA check (``flashback-agents eval docqa``): the invented corpus and its questions are well
formed, the scoring, the harness end to end on LlamaIndex's MockLLM (which echoes its prompt), the CLI's
bad inputs; the real default model only in the ``model``-marked test (a run, no score asserted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest
from typer.testing import CliRunner

from flashback_agents.cli import app
from flashback_agents.evaluation import doc_qa as dq
from flashback_agents.evaluation.doc_qa import DOCUMENTS, KINDS, QUESTIONS

runner = CliRunner()

#: the integration tests' corpus and the adapter training mix's sentence templates
#: (tools/keep_transcripts.py ``_facts``): none of them may be in this corpus
FORBIDDEN = ("quillfeather", "marrow island", "saltmere", "pemberwick", "vantreel", "seaweed flour",
             "was founded in", "founded the", "stands in the town of", "doors of the", "are painted", "employs",
             "people work", "keeps a", "closed to visitors", "observatory", "museum", "library", "academy",
             "lighthouse", "brewery", "theatre", "abbey", "botanical garden", "railway")


# ---------------------------------------------------------------------------- the corpus
def test_corpus_and_question_set_shape():
    assert 10 <= len(DOCUMENTS) <= 14
    assert len(QUESTIONS) >= 12
    ids = [q.id for q in QUESTIONS]
    assert len(ids) == len(set(ids))
    assert len({q.question for q in QUESTIONS}) == len(QUESTIONS)
    kinds = Counter(q.kind for q in QUESTIONS)
    assert set(kinds) == set(KINDS), kinds
    assert all(n >= 2 for n in kinds.values()), kinds
    assert {q.source for q in QUESTIONS} == set(DOCUMENTS), "every document is asked about"
    for text in DOCUMENTS.values():
        assert 1 <= len(re.findall(r"[.!?](\s|$)", text)) <= 3 and len(text) < 300, text


def test_each_expected_answer_is_in_its_document_and_no_other():
    for q in QUESTIONS:
        assert q.answers and all(a.strip() for a in q.answers), q.id
        for doc_id, text in DOCUMENTS.items():
            hits = dq.answer_hits(q.answers, text)
            if doc_id == q.source:
                assert hits, f"{q.id}: none of {q.answers} in its source {doc_id}"
            else:
                assert not hits, f"{q.id}: {hits} also in {doc_id}"


def test_pair_questions_name_the_similar_documents_value():
    for q in QUESTIONS:
        assert not dq.answer_hits(q.wrong, DOCUMENTS[q.source]), q.id
        if q.kind != "pair":
            continue
        assert q.wrong, f"{q.id}: a pair question names the other document's value"
        holders = [d for d, text in DOCUMENTS.items() if dq.answer_hits(q.wrong, text)]
        assert len(holders) == 1 and holders[0] != q.source, (q.id, holders)
        # the two documents of a pair share their subject words (a retriever cannot tell them apart by topic)
        words = lambda d: set(re.findall(r"[A-Z][a-z]+", DOCUMENTS[d]))  # noqa: E731
        assert len(words(q.source) & words(holders[0])) >= 1, q.id


def test_questions_are_not_copied_from_the_documents():
    for q in QUESTIONS:
        stem = q.question.rstrip("?").strip().lower()
        assert not dq.answer_hits(q.answers, q.question), f"{q.id}: the question gives its answer away"
        for text in DOCUMENTS.values():
            assert stem not in text.lower(), q.id
            # no long run of words shared verbatim with a document (8 words)
            words = stem.split()
            for i in range(len(words) - 7):
                assert " ".join(words[i:i + 8]) not in text.lower(), (q.id, words[i:i + 8])


def test_corpus_is_not_the_tests_or_the_training_mix():
    for doc_id, text in DOCUMENTS.items():
        low = text.lower()
        for phrase in FORBIDDEN:
            assert phrase not in low, (doc_id, phrase)
    for q in QUESTIONS:
        assert not q.question.startswith(("In which year was the", "Who founded the", "How many people work at",
                                          "What colour are the doors", "On which day is the")), q.id


# ---------------------------------------------------------------------------- scoring and options
def test_scoring():
    q = next(x for x in QUESTIONS if x.id == "tessaloon-minutes")
    assert dq.score_answer(q, "The crossing takes 47 minutes.") == {"right": True, "hit": True, "confused": False}
    assert dq.score_answer(q, "It takes 83 minutes.")["right"] is False
    assert dq.score_answer(q, "Tessaloon: 47 minutes; Gantreel: 83 minutes.") == {"right": False, "hit": True,
                                                                                    "confused": True}
    assert dq.score_answer(q, "")["right"] is False
    assert dq.answer_hits(["23"], "a wingspan of 1923 mm") == []
    assert dq.answer_hits(["23"], "23cm") == ["23"]
    assert dq.answer_hits(["Veltcher"], "ambrose VELTCHER's game") == ["Veltcher"]


def test_empty_replies_are_no_answer():
    from types import SimpleNamespace as NS

    assert dq._answer_text(NS(response="Empty Response")) == "" and dq._answer_text(NS(response=None)) == ""
    assert dq._answer_text(NS(response=" 47 minutes\n")) == "47 minutes"


def test_adapter_arg_and_options_are_checked_before_anything_loads(tmp_path):
    assert dq.adapter_arg("auto") == ("auto", "auto")
    assert dq.adapter_arg("none") == ("none", None) and dq.adapter_arg(None) == ("none", None)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    assert dq.adapter_arg(str(tmp_path / "a")) == (str(tmp_path / "a"), str(tmp_path / "a"))
    (tmp_path / "f.txt").write_text("x")
    for bad in (str(tmp_path / "missing"), str(tmp_path / "f.txt"), str(tmp_path), " "):
        with pytest.raises(dq.DocQAError):
            dq.adapter_arg(bad)
    for kwargs in ({"engines": ("vibes",)}, {"engines": ()}, {"top_k": 0}, {"max_tokens": 0}, {"threads": 0},
                   {"questions": []}, {"vector_store": "redis"}, {"adapter": str(tmp_path / "missing")}):
        factory = None if "adapter" in kwargs else (lambda: pytest.fail("built an LLM"))
        with pytest.raises(dq.DocQAError):
            dq.run_doc_qa(llm_factory=factory, **kwargs)


@pytest.mark.slow
def test_module_imports_without_llama_index():
    code = ("import sys; sys.modules['llama_index'] = None; sys.modules['llama_index.core'] = None; "
            "import flashback_agents.evaluation.doc_qa as m; assert len(m.QUESTIONS) >= 12; "
            "assert not [k for k in sys.modules if k.startswith('llama_index') and sys.modules[k] is not None]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_must_show_line_and_table():
    result = {"scores": {"flashback": {"right": 9, "total": 18, "confused": 1, "seconds": 1.0,
                                       "by_kind": {"fact": {"right": 2, "total": 4}}},
                         "default": {"right": 10, "total": 18, "confused": 0, "seconds": 2.0,
                                     "by_kind": {"fact": {"right": 3, "total": 4}}}},
              "retrieval": {"source_retrieved": 18, "total": 18, "same_for_engines": True}, "top_k": 2}
    assert dq.must_show_line(result) == ("FlashBack query engine 9/18 vs LlamaIndex default templates 10/18 "
                                         "(at least: NOT met)")
    result["scores"]["flashback"]["right"] = 10
    assert dq.must_show_line(result).endswith("(at least: met)")
    table = dq.format_table(result)
    assert "| FlashBack query engine | 10/18 | 2/4 |" in table and "18/18" in table
    assert dq.must_show_line({"scores": {"default": result["scores"]["default"]}}) is None


# ---------------------------------------------------------------------------- the harness, no model
@pytest.mark.slow
def test_harness_end_to_end_on_an_echoing_llm():
    """MockLLM returns its prompt: both engines then "answer" with the retrieved texts, so every question
    whose pair document was not retrieved is right, and the plumbing (rows, retrieval, counts) is checked."""
    pytest.importorskip("llama_index.core")
    pytest.importorskip("chromadb")
    from llama_index.core.llms.mock import MockLLM

    qs = [q for q in QUESTIONS if q.id in ("festival-river", "knotball-inventor", "copperstep-length")]
    result = dq.run_doc_qa(llm_factory=lambda: MockLLM(), questions=qs, threads=1)
    assert result["engines"] == ["flashback", "default"] and result["questions"] == 3
    assert result["retrieval"] == {"source_retrieved": 3, "total": 3, "same_for_engines": True}
    for row in result["rows"]:
        assert len(row["retrieved"]) == 2 and row["source"] in row["retrieved"]
        for name in ("flashback", "default"):
            ans = row["answers"][name]
            assert ans["answer"] and ans["hit"], (name, row["id"])
            assert ans["retrieved"] == row["retrieved"]
    # the two Taffle bridges are both retrieved: an answer with both lengths names the wrong document too
    bridge = next(r for r in result["rows"] if r["id"] == "copperstep-length")
    assert set(bridge["retrieved"]) == {"bridge-copperstep", "bridge-ironreed"}
    assert all(bridge["answers"][n]["confused"] and not bridge["answers"][n]["right"] for n in result["engines"])
    for name in result["engines"]:
        assert result["scores"][name]["right"] == 2 and result["scores"][name]["total"] == 3
    assert result["must_show"].endswith("(at least: met)")
    json.dumps(result)  # what --json / --out write


# ---------------------------------------------------------------------------- the CLI
def _one_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.output
    return errors[0]


def test_cli_rejects_bad_adapter_and_threads(tmp_path):
    (tmp_path / "file.txt").write_text("not an adapter")
    (tmp_path / "empty").mkdir()
    for args, needle in ((["--adapter", str(tmp_path / "file.txt")], "not an adapter directory"),
                         (["--adapter", str(tmp_path / "empty")], "not an adapter directory"),
                         (["--adapter", str(tmp_path / "missing")], "no such directory"),
                         (["--threads", "0"], "--threads"), (["--threads", "-3"], "--threads"),
                         (["--threads", "two"], "--threads"), (["--top-k", "0"], "--top-k"),
                         (["--max-tokens", "0"], "--max-tokens"), (["--out", str(tmp_path)], "--out")):
        res = runner.invoke(app, ["eval", "docqa", *args])
        assert needle in _one_error(res), (args, res.output)


# ---------------------------------------------------------------------------- the real default model
@pytest.mark.model
def test_default_model_answers_every_question_through_both_engines():
    result = dq.run_doc_qa(threads=1)  # FlashBack(): the default model with its shipped adapter
    assert result["adapter"]["label"] == "auto"
    assert result["engines"] == ["flashback", "default"]
    n = len(QUESTIONS)
    assert result["retrieval"] == {"source_retrieved": n, "total": n, "same_for_engines": True}
    for name in ("flashback", "default"):
        s = result["scores"][name]
        assert s["total"] == n and 0 <= s["right"] <= n
        assert s["answered"] == n, [r["id"] for r in result["rows"] if not r["answers"][name]["answer"]]
    assert len(result["rows"]) == n and all(set(r["answers"]) == {"flashback", "default"} for r in result["rows"])
    assert result["must_show"].startswith("FlashBack query engine ")
    print("\n" + dq.format_table(result) + "\n" + result["must_show"])
