"""The adapter's data pipeline (tools/agent_transcripts.py, keep_transcripts.py, loghub_transcripts.py,
log_ralm_corpus.py): exact answers, and training renders exactly the ids the agent or the query
engine sends at inference."""

from __future__ import annotations

import re

import pytest

from tools import logtools
from tools.logtools import ReadLimits, count_values, read_log


def test_loghub_transcripts_are_exact_and_readable(shared_data, tmp_path):
    """The adapter recipe's training data: valid transcripts whose answers match the CSVs."""
    import csv
    import json
    from collections import Counter

    from flashback_agents.training.transcripts import read_transcripts
    from tools import loghub_transcripts

    out = tmp_path / "lh.jsonl"
    assert loghub_transcripts.main(["--data", str(shared_data / "loghub"), "--out", str(out),
                                    "--per-system", "5"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 40
    assert len(read_transcripts([str(out)]).conversations) == 40
    for line in lines:
        msgs = json.loads(line)["messages"]
        q, answer = msgs[1]["content"], msgs[-1]["content"]
        system = q.split("In the ")[1].split(" log")[0]
        field, value = q.split(" have ")[1].rstrip("?").split(" ", 1)
        path = next((shared_data / "loghub" / system).glob("*_structured.csv"))
        with path.open(newline="", encoding="utf-8", errors="replace") as fh:
            rows = list(csv.DictReader(fh))
        key = {"level": "Level", "component": "Component", "program": "Program", "eventid": "EventId"}[field]
        assert answer.startswith(f"{Counter(r[key] for r in rows)[value]} lines")


def test_log_ralm_corpus_stores_the_first_half_and_trains_on_excerpts_of_the_second(tmp_path, capsys):
    """As `eval ppl --data loghub:SYSTEM` scores a log: excerpts of the second half (whole lines, no
    overlap) train, the first half is the retrieval-only store; excluded logs are left out."""
    import json

    from tools import log_ralm_corpus

    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.log").write_text("".join(f"{name} line {i} value={i * 7}\n" for i in range(200)))
    out = tmp_path / "c.jsonl"
    assert log_ralm_corpus.main(["--data", str(tmp_path), "--out", str(out), "--excerpts", "5",
                                 "--excerpt-chars", "100", "--exclude", "beta"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"source": "alpha/alpha[:100]", "store": True,
                       "text": "".join(f"alpha line {i} value={i * 7}\n" for i in range(100))}
    spans = [tuple(map(int, r["source"].split("[")[1].rstrip("]").split(":"))) for r in rows[1:]]
    assert len(spans) == 5 and all(100 <= a < b <= 200 for a, b in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))  # in order, no overlap
    for r, (a, b) in zip(rows[1:], spans):
        assert r["text"] == "".join(f"alpha line {i} value={i * 7}\n" for i in range(a, b)) and len(r["text"]) >= 100
    assert log_ralm_corpus.main(["--data", str(tmp_path), "--out", str(out), "--exclude", "alpha,beta"]) == 2
    assert "no *.log files" in capsys.readouterr().err


def test_agent_transcripts_render_what_the_agent_sends(tiny_lm, tmp_path):
    """Transcripts recorded from run_agent (scripted model) train on exactly the ids the agent sends:
    the training sample of a conversation == the inference render of the same LangChain messages, and
    the agent's last prompt is its prefix. The recorded answers quote the tool result."""
    import json

    from langchain_core.messages import messages_to_dict
    from langchain_flashback.chat_models import to_flashback_messages

    from flashback_agents.layout import Layout
    from flashback_agents.training.samples import conversation_sample
    from flashback_agents.training.transcripts import parse_conversation
    from tools import agent_transcripts
    from tools import log_agent as agent

    layout = Layout(tiny_lm)
    for steps in (2, 5):  # budget 2: the last call is forced after the agent's final-answer prompt
        msgs = agent_transcripts.episode(str(logtools.SAMPLE_LOG), "How many lines have level ERROR?",
                                         "level_count", steps, tmp_path / "store")
        row = {"tools": agent.TOOLS, "messages": messages_to_dict(msgs)}
        conv = parse_conversation(json.loads(json.dumps(row)))
        sample, truncated = conversation_sample(layout, conv, max_length=100_000)
        assert sample is not None and not truncated
        inference = layout.render(to_flashback_messages(msgs), tools=agent.TOOLS, add_generation_prompt=False)
        assert sample.input_ids == inference
        prompt = layout.render(to_flashback_messages(msgs[:-1]), tools=agent.TOOLS)
        assert sample.input_ids[:len(prompt)] == prompt
        final = msgs[-1].tool_calls[0]
        assert final["name"] == "final_answer" and len(final["args"]["answer"]) <= agent_transcripts.ANSWER_MAX
        counts = logtools.count_lines(read_log(logtools.SAMPLE_LOG, ReadLimits()), "level").data["counts"]
        assert final["args"]["answer"].startswith(f"{counts['ERROR']} of ")
        assert (steps == 2) == any(m.type == "human" and "Call final_answer" in m.content for m in msgs)


def test_agent_transcripts_vary_what_the_answer_rests_on(tmp_path):
    """The scripted first call filters on the value the question names (so the result leads with the
    asked count), or starts with arguments the agent repairs (the result then carries the repair note,
    as at inference); a log head changes the counts. Every answer quotes the asked value's count."""
    from tools import agent_transcripts

    log = read_log(logtools.SAMPLE_LOG, ReadLimits())
    counts = count_values(log, "level")
    low = min((k for k in counts if k != "(none)"), key=counts.get)  # not the top level
    q = f"How many lines have level {low}?"
    for style, by, note in (("ideal", "level", None), ("repaired", "component", "(by 'component' -> 'level'")):
        msgs = agent_transcripts.episode(str(logtools.SAMPLE_LOG), q, "level_count", 5, tmp_path / "store",
                                         style=style, value=low)
        first = msgs[-3].tool_calls[0]["args"]
        tool = next(m.content for m in msgs if m.type == "tool")
        assert first == {"by": by, "pattern": low}
        assert tool.startswith(note) if note else tool.startswith(f"Top level: {low} with {counts[low]} of ")
        assert msgs[-1].tool_calls[0]["args"]["answer"].startswith(f"{counts[low]} of ")
    head = agent_transcripts.episode(str(logtools.SAMPLE_LOG), q, "level_count", 5, tmp_path / "store",
                                     value=low, max_lines=60)
    n_head = count_values(read_log(logtools.SAMPLE_LOG, ReadLimits(max_lines=60)), "level")[low]
    assert n_head != counts[low] and head[-1].tool_calls[0]["args"]["answer"].startswith(f"{n_head} of ")
    # a question naming no value (the busiest component) is not filtered
    assert agent_transcripts.first_call("Which component logs the most lines?", "busiest_component", "ideal",
                                        None) == ("count_lines", {"by": "component", "pattern": ""})


def test_keep_transcripts_render_what_the_query_engine_sends(tiny_lm):
    """A document-QA row of keep_transcripts trains on exactly the ids the LlamaIndex query engine's
    prompt renders with FlashBack (question, then marked documents in retrieval order); the teacher reads the
    same documents as a non-FlashBack LLM gets them (inline). Every fact is invented: the answer is in
    exactly one document, with the value the question asks for."""
    import json
    import random

    from llama_index.llms.flashback import FlashBack
    from llama_index.llms.flashback.base import to_flashback_messages
    from llama_index.llms.flashback.templates import FLASHBACK_TEXT_QA_PROMPT

    from flashback_agents.layout import Layout, Message
    from flashback_agents.training.samples import conversation_sample
    from flashback_agents.training.transcripts import parse_conversation
    from tools import keep_transcripts

    layout, rng, llm = Layout(tiny_lm), random.Random(3), FlashBack(tiny_lm, max_tokens=4)
    sizes = set()
    for _ in range(12):
        question, docs, fact = keep_transcripts.qa_case(rng)
        sizes.add(len(docs))
        assert [d for d in docs if fact.value in d and fact.entity in d] == [fact.sentence]
        assert fact.entity in question and fact.value not in question
        row = keep_transcripts._row(keep_transcripts.QA_USER.format(query_str=question), fact.sentence, documents=docs)
        sample, truncated = conversation_sample(layout, parse_conversation(json.loads(json.dumps(row))), 100_000)
        context_str = "\n\n".join(docs)  # the synthesizer joins nodes in retrieval order, kept by the template
        sent = to_flashback_messages(FLASHBACK_TEXT_QA_PROMPT.format_messages(llm=llm, query_str=question,
                                                                              context_str=context_str))
        assert not truncated and sample.input_ids == layout.render(sent + [Message("assistant", fact.sentence)],
                                                                   add_generation_prompt=False)
        inline = FLASHBACK_TEXT_QA_PROMPT.format_messages(query_str=question, context_str=context_str)
        teacher = row["messages"][0]["content"] + keep_transcripts.INLINE_HEADER + "\n\n".join(docs)
        assert [m.content for m in inline] == [teacher]
    assert sizes == {1, 2, 3, 4}
    prompts = keep_transcripts.chat_prompts(random.Random(0), ["Homarus gammarus"], 60)
    assert len(set(prompts)) == 60


@pytest.mark.slow
def test_agent_transcripts_leave_out_the_validation_systems(shared_data, tmp_path):
    import json

    from tools import agent_transcripts

    out = tmp_path / "agent.jsonl"
    assert agent_transcripts.main(["--data", str(shared_data / "loghub"), "--out", str(out), "--per-question", "1",
                                   "--exclude", "Hadoop,Linux,Spark", "--store", str(tmp_path / "store")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    users = " ".join(m["data"]["content"] for r in rows for m in r["messages"] if m["type"] == "human")
    assert rows and "Apache_2k.log" in users and not re.search(r"(Hadoop|Linux|Spark)_2k\.log", users)
