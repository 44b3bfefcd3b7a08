"""The example agents: exact log tools (checked against Loghub's structured CSVs), bad inputs, and
both examples end to end on the default model (bounded: few steps, few tokens)."""

from __future__ import annotations

import collections
import csv
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from flashback_agents.evaluation.common import shared_data_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import logtools  # noqa: E402
from logtools import LogError, ReadLimits, count_values, read_log, search_logs, top_templates  # noqa: E402

LOGHUB = shared_data_dir() / "loghub"
SYSTEMS = ("Apache", "HDFS", "Hadoop", "Linux", "OpenSSH", "Proxifier", "Spark", "Zookeeper")
THREADS = 1  # the test CPU is shared: one torch thread is several times faster under contention


def loghub(system: str) -> tuple[Path, list[dict]]:
    log = LOGHUB / system / f"{system}_2k.log"
    if not log.is_file():
        pytest.skip(f"Loghub sample {log} is not present")
    with open(LOGHUB / system / f"{system}_2k.log_structured.csv", encoding="utf-8", newline="") as f:
        return log, list(csv.DictReader(f))


# ------------------------------------------------------------------- exact counts vs ground truth
# Which CSV column holds what the tools call level / component (Loghub names them per system).
LEVEL_COL = {"Apache": "Level", "HDFS": "Level", "Hadoop": "Level", "Spark": "Level", "Zookeeper": "Level"}
COMPONENT_COL = {"HDFS": "Component", "Hadoop": "Component", "Linux": "Component", "Proxifier": "Program",
                 "Spark": "Component", "Zookeeper": "Component"}


def _component(system: str, value: str) -> str:
    # Loghub splits Zookeeper's "[thread:Class@line]" on ':'; the class is the last piece
    return value.rsplit(":", 1)[-1] if system == "Zookeeper" else value


@pytest.mark.parametrize("system", SYSTEMS)
def test_counts_match_structured_csv(system):
    path, rows = loghub(system)
    log = read_log(path)
    assert len(log.lines) == len(rows) == 2000
    assert all(r.fields for r in log.records), "every Loghub line parses with the detected format"
    if system in LEVEL_COL:
        assert count_values(log, "level") == collections.Counter(r[LEVEL_COL[system]] for r in rows)
    if system in COMPONENT_COL:
        expected = collections.Counter(_component(system, r[COMPONENT_COL[system]]) for r in rows)
        assert count_values(log, "component") == expected
    if system in ("Linux", "OpenSSH"):  # syslog: no level; the host and pid are parsed exactly
        host_col = "Level" if system == "Linux" else "Component"
        assert [r.fields["host"] for r in log.records] == [r[host_col] for r in rows]
    # filtered counts: the level counts of the lines a regex selects equal the CSV's for those lines
    if system in LEVEL_COL:
        level, n = collections.Counter(r[LEVEL_COL[system]] for r in rows).most_common()[-1]
        out = search_logs(log, re.escape(level))
        assert count_values(log, "level", re.escape(level))[level] == n
        assert out.data["count"] >= n


@pytest.mark.parametrize("system", SYSTEMS)
def test_reader_agreement_with_structured_csv(system):
    """Issue 20: per-line agreement of the inferred level / component with the CSV, >= 95% where the CSV
    has the field (a column that holds the host name, as Loghub's Linux 'Level', is checked as the host)."""
    path, rows = loghub(system)
    a = logtools.reader_agreement(path.with_name(path.name + "_structured.csv"))
    assert a["lines"] == 2000 and a["parsed"] >= 0.95, a
    if "Level" in rows[0]:
        assert (a["level"] or 0) >= 0.95 or "host agrees 100.0%" in a.get("level_note", ""), a
    if any(c in rows[0] for c in logtools.COMPONENT_COLUMNS):
        assert (a["component"] or 0) >= 0.95 or "host agrees 100.0%" in a.get("component_note", ""), a


def test_reader_table_prints_every_system():
    if not LOGHUB.is_dir():
        pytest.skip("Loghub samples are not present")
    table = logtools.reader_table(LOGHUB)
    assert table.splitlines()[0].split()[:5] == ["system", "lines", "parsed", "level", "component"]
    assert all(any(ln.startswith(s) for ln in table.splitlines()) for s in SYSTEMS)


def _csv_hour(system: str, r: dict) -> str | None:
    if system == "Apache":
        dt = datetime.strptime(r["Time"], "%a %b %d %H:%M:%S %Y")
    elif system == "HDFS":
        dt = datetime.strptime(r["Date"] + r["Time"], "%y%m%d%H%M%S")
    elif system in ("Zookeeper", "Hadoop"):
        dt = datetime.strptime(r["Date"] + " " + r["Time"][:8], "%Y-%m-%d %H:%M:%S")
    elif system == "Linux":
        dt = datetime.strptime(f"{r['Month']} {r['Date']} {r['Time']}", "%b %d %H:%M:%S")
    elif system == "Spark":
        dt = datetime.strptime(r["Date"] + " " + r["Time"], "%y/%m/%d %H:%M:%S")
    else:
        return None
    day = dt.strftime("%m-%d") if dt.year == 1900 else dt.strftime("%Y-%m-%d")
    return f"{day} {dt.hour:02d}:00"


@pytest.mark.parametrize("system", ("Apache", "HDFS", "Hadoop", "Linux", "Spark", "Zookeeper"))
def test_time_windows_match_structured_csv(system):
    path, rows = loghub(system)
    log = read_log(path)
    assert count_values(log, "time", window_minutes=60) == collections.Counter(_csv_hour(system, r) for r in rows)


def test_regex_search_counts_and_line_numbers():
    path, rows = loghub("Apache")
    log = read_log(path)
    out = search_logs(log, r"\[error\]")
    want = [int(r["LineId"]) for r in rows if r["Level"] == "error"]
    assert out.data["count"] == len(want) == 595
    assert out.lines == want[: len(out.lines)]
    assert f"L{want[0]}: " in out.text and out.text.startswith("595 of 2000 lines match")
    bad = search_logs(log, "(unclosed")
    assert bad.text.startswith("Invalid regular expression '(unclosed'") and "plain word" in bad.text


def test_tools_forgive_a_small_model(tmp_path):
    """Issue 20: any case, no pattern = all lines, readable errors, the answer first."""
    log = read_log(logtools.SAMPLE_LOG)
    lv = count_values(log, "level")
    # case-insensitive unless asked
    assert search_logs(log, "error").data["count"] == search_logs(log, "ERROR").data["count"] == lv["ERROR"]
    assert search_logs(log, "ERROR").text.startswith(f"{lv['ERROR']} of 120 lines have level ERROR")
    # count_lines without a pattern counts everything, top value first
    out = logtools.count_lines(log, "component")
    top, n = count_values(log, "component").most_common(1)[0]
    assert out.data["total"] == 120 and out.text.startswith(f"Top component: {top} with {n} of 120 lines.")
    assert out.summary.startswith(f"Top component: {top} with {n} of 120 lines.")
    assert "format <Date> <Time> <Level> <Component>: <Content>, inferred" in out.text
    # an invalid or empty regex: a short error to recover from, not an empty count
    for tool in (lambda p: logtools.count_lines(log, "level", p), lambda p: search_logs(log, p),
                 lambda p: top_templates(log, 3, p)):
        err = tool("(unclosed").text
        assert err.startswith("Invalid regular expression") and len(err) < 200 and "0 lines" not in err
    assert search_logs(log, "").text.startswith("search_logs needs a word")
    # an invented filter that matches nothing: said so, and all lines are counted
    out = logtools.count_lines(log, "level", "log_level_name")
    assert out.text.startswith("No line matches /log_level_name/, so all lines are counted.")
    assert out.data["total"] == 120 and out.data["counts"] == dict(lv)
    assert top_templates(log, 3, "zzz_nothing").text.startswith("No line matches /zzz_nothing/")


@pytest.mark.parametrize("system", SYSTEMS)
def test_templates_partition_lines_and_find_the_top_event(system):
    path, rows = loghub(system)
    log = read_log(path)
    groups = logtools.mine_templates(log)
    assert sum(g["count"] for g in groups) == 2000
    gt_top = collections.Counter(r["EventTemplate"] for r in rows).most_common(1)[0][1]
    # Drain (drain3) and Loghub's hand-checked parse agree on the biggest group to within 1%
    assert abs(groups[0]["count"] - gt_top) <= max(1, gt_top // 100), (groups[0], gt_top)
    out = top_templates(log, 3)
    # the answer leads: the top template and its count first, then the list
    assert out.text.startswith(f"The most frequent template ({groups[0]['count']} of 2000 lines")
    assert f"{len(groups)} templates over 2000 lines" in out.text


def test_sample_log_counts():
    log = read_log(logtools.SAMPLE_LOG)
    assert log.format.spec == "<Date> <Time> <Level> <Component>: <Content>"
    assert "120 of 120 lines fit it (100%)" in log.describe()
    lv = count_values(log, "level")
    assert sum(lv.values()) == len(log.lines) == 120
    assert lv["ERROR"] == sum(1 for ln in log.lines if " ERROR " in ln)
    out = logtools.count_lines(log, "component", "ERROR")
    assert out.data["total"] == lv["ERROR"]


# --------------------------------------------------------------------------------- bad inputs
def test_missing_directory_empty_blank(tmp_path):
    with pytest.raises(LogError, match="No such log file"):
        read_log(tmp_path / "nope.log")
    with pytest.raises(LogError, match="is a directory"):
        read_log(tmp_path)
    (tmp_path / "empty.log").write_bytes(b"")
    with pytest.raises(LogError, match="is empty"):
        read_log(tmp_path / "empty.log")
    (tmp_path / "blank.log").write_text("\n  \n\n")
    with pytest.raises(LogError, match="only blank lines"):
        read_log(tmp_path / "blank.log")


def test_binary_files(tmp_path):
    (tmp_path / "nul.bin").write_bytes(b"\x7fELF\x02\x01\x00\x00" + bytes(range(256)) * 4)
    with pytest.raises(LogError, match="binary"):
        read_log(tmp_path / "nul.bin")
    (tmp_path / "junk.bin").write_bytes(bytes([0x80 + (i * 7) % 100 for i in range(4000)]))
    with pytest.raises(LogError, match="binary"):
        read_log(tmp_path / "junk.bin")
    # NUL bytes after the sniff window are caught too, with the line number
    (tmp_path / "late.log").write_bytes(b"2024-01-01 00:00:00 INFO a: ok\n" * 400 + b"\x00\x00\n")
    with pytest.raises(LogError, match="line 401"):
        read_log(tmp_path / "late.log")


def test_fifo_is_refused_without_hanging(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "pipe.log"
    os.mkfifo(fifo)
    with pytest.raises(LogError, match="not a regular file"):
        read_log(fifo)


def test_big_file_is_read_within_caps(tmp_path):
    big = tmp_path / "big.log"
    line = b"2024-03-01 10:15:02 INFO  api: GET /v1/orders 200 in 12ms\n"
    with open(big, "wb") as f:  # ~3 MB
        for _ in range(3 << 20 >> 6):
            f.write(line)
    t0 = time.perf_counter()
    log = read_log(big, ReadLimits(max_bytes=64 << 10, max_lines=10_000))
    assert time.perf_counter() - t0 < 2
    assert log.truncated and log.bytes_read <= (64 << 10) + len(line)
    assert "read only the first" in log.note and "bytes" in log.note
    log = read_log(big, ReadLimits(max_lines=100))
    assert len(log.lines) == 100 and log.truncated and "100 lines" in log.note


def test_sparse_huge_file_is_bounded(tmp_path):
    """A 2 GB sparse file (no disk used) is refused after reading the sniff window, not read whole."""
    huge = tmp_path / "huge.log"
    with open(huge, "wb") as f:
        f.write(b"2024-03-01 10:15:02 INFO  api: hello\n" * 1000)
        f.truncate(2 << 30)
    t0 = time.perf_counter()
    with pytest.raises(LogError, match="NUL|binary"):
        read_log(huge)
    assert time.perf_counter() - t0 < 5


def test_one_huge_line_is_cut_streaming(tmp_path):
    p = tmp_path / "oneline.log"
    with open(p, "wb") as f:
        f.write(b"2024-03-01 10:15:02 ERROR x: " + b"A" * (3 << 20) + b"\nsecond line INFO\n")
    log = read_log(p, ReadLimits(max_line_bytes=1000))
    assert [len(ln) for ln in log.lines] == [1000, len("second line INFO")]
    assert log.long_lines == 1 and "cut" in log.note


def test_agent_cli_errors_are_clear(tmp_path, capsys):
    import log_analysis_agent as agent

    for path, msg in ((tmp_path / "missing.log", "No such log file"), (tmp_path, "is a directory")):
        with pytest.raises(SystemExit) as e:
            agent.main(["--log", str(path)])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        agent.main(["--max-steps", "1"])
    assert "at least 2" in capsys.readouterr().err


def test_writing_assistant_missing_notes(tmp_path, capsys):
    import writing_assistant as wa

    with pytest.raises(SystemExit) as e:
        wa.main(["--notes", str(tmp_path / "none"), "--store", str(tmp_path / "s")])
    assert e.value.code == 2 and "No such notes folder" in capsys.readouterr().err


# ------------------------------------------------------------------------ agent helper logic
def test_grounding_and_composition():
    import log_analysis_agent as agent
    from logtools import ToolOutput

    outs = [ToolOutput("18 of 120 lines match /ERROR/.\nL14: ...", "18 of 120 lines match /ERROR/ (first: L14).", [14])]
    assert agent.grounded("There are 18 ERROR lines (L14).", outs)
    assert not agent.grounded("There are 19 ERROR lines.", outs)  # a number no tool returned
    assert not agent.grounded("finally", outs)  # no number at all
    assert agent.compose_answer([("search_logs", {"pattern": "ERROR"}, outs[0])]) == outs[0].summary
    assert agent.route("How many warnings per hour?") == "count_lines"
    assert agent.route("What kinds of messages are common?") == "top_templates"
    assert agent.route("What is the most frequent message template?") == "top_templates"
    assert agent.route("show lines with timeout") == "search_logs"
    # "100%" from the format note is not a finding: an answer must quote a result's own number
    fmt = ToolOutput("Top level: INFO with 90 of 120 lines.\n(format ..., 120 of 120 lines fit it (100%))",
                     "Top level: INFO with 90 of 120 lines.", [], {"counts": {"INFO": 90, "ERROR": 30}, "total": 120, "by": "level"})
    assert not agent.grounded("100%", [fmt]) and agent.grounded("90 lines are INFO", [fmt])


def test_argument_repair_and_targeted_answers():
    import log_analysis_agent as agent

    q = "Which component logs the most lines?"
    assert agent.question_field(q) == "component" and agent.question_field("How many lines have level WARN?") == "level"
    args, note = agent.repair_args("count_lines", {"by": "level", "pattern": "log_level_name"}, q)
    assert args == {"by": "component", "pattern": ""} and "by 'level' -> 'component'" in note and "dropped" in note
    args, note = agent.repair_args("count_lines", {"by": "level", "pattern": "WARN"}, "How many lines have level WARN?")
    assert args == {"by": "level", "pattern": "WARN"} and note == ""
    args, note = agent.repair_args("count_lines", {"by": "level", "pattern": "level"}, "How many lines have level WARN?")
    assert args == {"by": "level", "pattern": "WARN"} and "names a field" in note and "-> 'WARN'" in note
    # a wrong filter is replaced with the severity the question names in capitals, else dropped
    args, note = agent.repair_args("count_lines", {"by": "component", "pattern": "component"}, agent.DEFAULT_QUESTION)
    assert args == {"by": "component", "pattern": "ERROR"} and "the question names level ERROR" in note
    args, _ = agent.repair_args("count_lines", {"by": "level", "pattern": "x"}, "Do any lines note an error?")
    assert args == {"by": "level", "pattern": ""}  # lower-case "note" / "error" are English, not a level
    log = read_log(logtools.SAMPLE_LOG)
    by_level = logtools.count_lines(log, "level")
    by_comp = logtools.count_lines(log, "component")
    outs = [("count_lines", {"by": "level", "pattern": ""}, by_level), ("count_lines", {"by": "component", "pattern": ""}, by_comp)]
    top, n = count_values(log, "component").most_common(1)[0]
    assert agent.compose_answer(outs, q).startswith(f"The top component is {top} with {n} of 120 lines.")
    n_warn = count_values(log, "level")["WARN"]
    assert agent.compose_answer(outs, "How many lines have level WARN?").startswith(f"{n_warn} of 120 lines have level WARN.")
    assert agent.pick_result(outs, q) == 1 and agent.pick_result(outs, "How many lines have level WARN?") == 0
    # a model-written answer counts only when it quotes the key number and names what was asked
    assert agent.answers_question(f"{top} logs {n} lines.", q, by_comp)
    assert not agent.answers_question(f"{n}", q, by_comp) and not agent.answers_question(f"{top} logs most.", q, by_comp)
    assert agent.answers_question(f"There are {n_warn} WARN lines.", "How many lines have level WARN?", by_level)
    tq = "What is the most frequent message template?"
    tpl = top_templates(log, 3)
    g = tpl.data["templates"][0]
    assert agent.answers_question(f"{g['count']} lines: {g['template']}", tq, tpl)
    assert not agent.answers_question(f"{g['count']}", tq, tpl)
    assert agent.clean_answer("}}</tool_call> 808 of 2000 lines") == "808 of 2000 lines"
    # only a result of the kind asked for can back a model-written answer (a count is no template)
    assert agent.relevant(outs, tq) == [] and agent.relevant(outs, q) == [by_comp]
    # a name inside a longer named one is not also asked for ("chrome.exe *64" is not "chrome.exe")
    nested = logtools.ToolOutput("Top component: chrome.exe with 811 of 2000 lines.", "Top component: chrome.exe with 811 of 2000 lines.",
                        [], {"counts": {"chrome.exe": 811, "chrome.exe *64": 718}, "total": 2000, "by": "component"})
    assert agent.direct_answer("How many lines does component chrome.exe *64 log?", nested) == (
        "718 of 2000 lines have component chrome.exe *64.")
    assert agent.direct_answer("How many lines does component chrome.exe log?", nested) == (
        "811 of 2000 lines have component chrome.exe.")


def test_eval_questions_and_truth_checks():
    import log_analysis_agent as agent

    if not LOGHUB.is_dir():
        pytest.skip("Loghub samples are not present")
    qs = agent.eval_questions(LOGHUB)
    kinds = {(q.system, q.kind) for q in qs}
    assert ("HDFS", "busiest_component") in kinds and ("Apache", "level_count") in kinds
    assert ("Linux", "level_count") not in kinds  # Linux's CSV 'Level' holds the host name
    assert ("OpenSSH", "busiest_component") not in kinds  # one value (the host): no question
    assert all(any(q.system == s and q.kind == "top_template" for q in qs) for s in SYSTEMS)
    q = next(q for q in qs if q.system == "Hadoop" and q.kind == "level_count" and q.truth == "808")
    assert agent.holds_truth(q, "808 of 2000 lines have level WARN.") and not agent.holds_truth(q, "1040 lines")
    assert not agent.holds_truth(q, "2000 of 2000 lines have level WARN. WARN: 808")  # the count must lead
    q = next(q for q in qs if q.system == "Zookeeper" and q.kind == "busiest_component")
    assert agent.holds_truth(q, "The top component is QuorumCnxManager$SendWorker with 469 lines.")
    assert not agent.holds_truth(q, "The top component is QuorumCnxManager with 469 lines.")
    q = next(q for q in qs if q.system == "Proxifier" and q.kind == "top_template")
    assert agent.holds_truth(q, "The most frequent template is: <HOSTPORT> open through proxy <HOSTPORT> HTTPS")
    assert not agent.holds_truth(q, "946 of 2000 lines, first L1")  # the template's count does not name it
    assert len(agent.eval_questions(LOGHUB, per_system=1)) == len(SYSTEMS)


def test_semantic_search_over_log_chunks(tmp_path):
    log = read_log(logtools.SAMPLE_LOG)
    idx = logtools.SemanticIndex(log, tmp_path / "store", lines_per_chunk=8)
    out = idx.search("disk full, no space left on device")
    assert out.lines and all(1 <= n <= len(log.lines) for n in out.lines)
    assert "No space left" in out.text  # the storage failures are found by meaning
    for m in re.finditer(r"L(\d+): (.*)", out.text):  # every quoted line is the real line
        assert log.lines[int(m.group(1)) - 1].startswith(m.group(2).rstrip(".")[:60])


# ------------------------------------------------------------------------ on the default model
def _check_agent_result(res, log, max_steps):
    assert 1 <= len(res.steps) <= max_steps
    assert res.steps[-1].tool == "final_answer"
    assert any(s.tool != "final_answer" for s in res.steps), "at least one tool ran"
    assert res.answer.strip()
    # cited lines are real lines of the log
    assert all(1 <= n <= len(log.lines) for n in res.cited_lines)
    # the answer's numbers come from the tools (model text if grounded, else composed from results)
    assert res.answer_source in ("model", "composed")
    # cache reuse: every call after the first reads the previous prompt and reply from the cache
    # (a dropped repeated call leaves out only its generation prompt, "<|im_start|>assistant\n": 3 tokens)
    for prev, cur in zip(res.steps, res.steps[1:]):
        assert cur.cache_read >= prev.input_tokens - (3 if prev.dropped else 0), (prev, cur)
        assert cur.computed < cur.input_tokens


@pytest.mark.model
def test_log_agent_on_sample_log(tmp_path, capsys):
    import log_analysis_agent as agent

    res = agent.main(["--max-steps", "4", "--threads", str(THREADS), "--store", str(tmp_path / "s")])
    printed = capsys.readouterr().out
    log = read_log(logtools.SAMPLE_LOG)
    _check_agent_result(res, log, 4)
    assert re.search(r"final answer \((model|composed), from step \d: \w+\(", printed), printed
    assert re.search(r"computed \d+, reused \d+ of \d+ prompt tokens", printed)
    assert res.basis.startswith("step ") and f"from {res.basis}" in printed
    n_err = count_values(log, "level")["ERROR"]
    assert str(n_err) in res.answer, res.answer  # the default question's number is in the answer


@pytest.mark.model
def test_writing_assistant_drafts_with_sources(tmp_path, capsys):
    import writing_assistant as wa

    res = wa.main(["--max-new-tokens", "40", "--threads", str(THREADS), "--store", str(tmp_path / "store")])
    printed = capsys.readouterr().out
    assert res.draft.startswith("## ") and res.generated_tokens >= 1
    assert res.sources, "retrieval brought in notes"
    for s in res.sources:  # sources are real files and line ranges
        p = Path(s.path)
        assert p.is_file() and p.parent == wa.SAMPLE_NOTES
        assert 1 <= s.start_line <= s.end_line <= len(p.read_text().splitlines())
    assert "sources used:" in printed and res.sources[0].label in printed
    # FlashBack (the paper's layout): every retrieval after the first reuses the clean text so far and
    # computes only the last stride of text (plus, the first time, the assistant header that followed the
    # question's evidence) and the new evidence (top_k chunks of ~96 tokens + markers; a chunk's text may
    # re-tokenize a few tokens longer than its slice)
    later = [r for r in res.retrievals if r.step > 0]
    assert all(r.reused > 0 for r in later)
    assert all(r.computed <= 16 + 8 + 2 * (96 + 8) for r in later), [r.computed for r in later]


def test_loghub_transcripts_are_exact_and_readable(shared_data, tmp_path):
    """The adapter recipe's training data: valid transcripts whose answers match the CSVs."""
    import csv
    import json
    import sys
    from collections import Counter
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import loghub_transcripts

    from flashback_agents.training.transcripts import read_transcripts

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

    import log_ralm_corpus

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

    import agent_transcripts
    import log_analysis_agent as agent
    from langchain_core.messages import messages_to_dict
    from langchain_flashback.chat_models import to_flashback_messages

    from flashback_agents.layout import Layout
    from flashback_agents.training.samples import conversation_sample
    from flashback_agents.training.transcripts import parse_conversation

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
    import agent_transcripts

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

    import keep_transcripts
    from llama_index.llms.flashback import FlashBack
    from llama_index.llms.flashback.base import to_flashback_messages
    from llama_index.llms.flashback.templates import FLASHBACK_TEXT_QA_PROMPT

    from flashback_agents.layout import Layout, Message
    from flashback_agents.training.samples import conversation_sample
    from flashback_agents.training.transcripts import parse_conversation

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


def test_agent_transcripts_leave_out_the_validation_systems(shared_data, tmp_path):
    import json

    import agent_transcripts

    out = tmp_path / "agent.jsonl"
    assert agent_transcripts.main(["--data", str(shared_data / "loghub"), "--out", str(out), "--per-question", "1",
                                   "--exclude", "Hadoop,Linux,Spark", "--store", str(tmp_path / "store")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    users = " ".join(m["data"]["content"] for r in rows for m in r["messages"] if m["type"] == "human")
    assert rows and "Apache_2k.log" in users and not re.search(r"(Hadoop|Linux|Spark)_2k\.log", users)


# ----------------------------------------------------------- the writing assistant on unseen notes
NOTE_SETS = {
    "beekeeping": {
        "hives.md": "# Hives\n\nA Langstroth hive holds ten frames per box.\nA strong colony in summer has about 60,000 bees.\n"
                    "The queen lays up to 2,000 eggs a day in spring.\n",
        "honey.md": "# Honey\n\nBees must visit about two million flowers to make 500 grams of honey.\n"
                    "Honey is extracted by centrifuge after the frames are uncapped.\n",
    },
    "volcanoes": {
        "etna.md": "# Etna\n\nMount Etna in Sicily is about 3,357 metres high.\nIts eruptions are recorded since 1500 BC.\n",
        "monitoring.md": "# Monitoring\n\nSeismometers detect the tremor that often precedes an eruption.\n"
                         "The INGV observatory in Catania runs 24-hour surveillance of Etna.\n",
    },
    "shipping": {
        "fleet.md": "# Fleet\n\nNordvik Lines runs 14 container ships.\nThe largest, the Ostra, carries 9,200 TEU.\n",
        "routes.md": "# Routes\n\nThe Rotterdam to Gdansk loop takes 6 days.\nFuel is bunkered in Rotterdam on every loop.\n",
    },
}


def _write_notes(root: Path, topic: str) -> tuple[Path, dict[str, str]]:
    d = root / topic
    d.mkdir(parents=True)
    for name, text in NOTE_SETS[topic].items():
        (d / name).write_text(text)
    return d, dict(NOTE_SETS[topic])


@pytest.mark.parametrize("topic", sorted(NOTE_SETS))
def test_citations_hold_on_unseen_notes(topic, tmp_path):
    """Each fact sentence cites a note that contains it; a sentence no note supports is left out."""
    import writing_assistant as wa

    d, notes = _write_notes(tmp_path, topic)
    sources = []
    for name, text in notes.items():
        lines = text.splitlines()
        sources.append(wa.Source(f"{name}:1-{len(lines)}", str(d / name), 1, len(lines), 0, text))
    facts = [ln for text in notes.values() for ln in text.splitlines() if ln and not ln.startswith("#")]
    invented = "The 1987 survey by Atlantis University counted 77 of them."
    body, dropped = wa.cite(" ".join(facts + [invented, "this matters a lot."]), sources)
    assert dropped == [invented]
    draft = "## Title\n\n" + body
    assert wa.check_citations(draft, notes) == []
    stated = [f for f in facts if wa.fact_terms(f)]  # sentences with numbers or names state facts
    assert len(stated) >= 3 and body.count("[") == len(stated)
    # the check fails a draft with an uncited fact, or a citation to a note without that fact
    first, other = facts[0], next(n for n in notes if n not in sources[0].label)
    assert wa.check_citations(f"## T\n\n{first}", notes)[0].startswith("no citation")
    wrong = wa.check_citations(f"## T\n\n{first.rstrip('.')} [{other}:1-9].", notes)
    assert wrong and wrong[0].startswith("cited note does not contain it")


def test_citations_keep_line_breaks_and_drop_copied_headings(tmp_path):
    """A generated line without final punctuation stays its own sentence (joined to the next, its
    facts would change and the checker would fail a correct citation), and markdown headings the
    model copies from the notes are not draft sentences."""
    import writing_assistant as wa

    d, notes = _write_notes(tmp_path, "volcanoes")
    sources = [wa.Source(f"{n}:1-{len(t.splitlines())}", str(d / n), 1, len(t.splitlines()), 0, t)
               for n, t in notes.items()]
    body, dropped = wa.cite("Mount Etna in Sicily is about 3,357 metres high.\n## Notes\n### Etna\n"
                            "Recorded since 1500 BC\nCatania runs surveillance.", sources)
    assert "#" not in body and not dropped
    assert body.splitlines() == ["Mount Etna in Sicily is about 3,357 metres high [etna.md:1-4]. "
                                 "Recorded since 1500 BC [etna.md:1-4]", "Catania runs surveillance."]
    assert wa.check_citations("## T\n\n" + body, notes) == []


@pytest.mark.model
def test_writing_assistant_on_unseen_notes(tmp_path, capsys):
    import writing_assistant as wa

    d, notes = _write_notes(tmp_path, "volcanoes")
    res = wa.main(["--notes", str(d), "--topic", "How Etna is watched", "--max-new-tokens", "40",
                   "--threads", str(THREADS), "--store", str(tmp_path / "store")])
    printed = capsys.readouterr().out
    assert res.sources and all(Path(s.path).parent == d for s in res.sources)
    assert wa.check_citations(res.draft, notes) == [], res.draft
    assert "sources used:" in printed


# ------------------------------------------------------------------------ --eval on the model
@pytest.mark.model
def test_log_agent_eval_on_shared_systems(tmp_path, capsys):
    """Issue 20: --eval generates questions from the structured CSVs and measures the answers (one
    question per system here, to keep the test short; the full run is the README's command)."""
    import json

    import log_analysis_agent as agent

    if not LOGHUB.is_dir():
        pytest.skip("Loghub samples are not present")
    out = tmp_path / "eval.json"
    res = agent.main(["--eval", str(LOGHUB), "--per-system", "1", "--max-steps", "4", "--threads", str(THREADS),
                      "--store", str(tmp_path / "s"), "--json", str(out)])
    printed = capsys.readouterr().out
    s = res["summary"]
    assert s["questions"] == len(SYSTEMS) and s["model_written"] + s["composed"] == s["questions"]
    assert "answers holding the truth:" in printed and "model-written" in printed and "composed" in printed
    records = json.loads(out.read_text())["records"]
    assert {r["system"] for r in records} == set(SYSTEMS)
    assert all(r["basis"].startswith("step ") for r in records)  # every answer names the result it rests on
    for r in records:  # FlashBack: every call after the first reads the previous prompt from the cache
        assert r["steps"][-1].startswith("final_answer(") and len(r["steps"]) <= 4
        for prev, cur in zip(r["tokens"], r["tokens"][1:]):
            assert cur["cache_read"] >= prev["input"] and cur["computed"] < cur["input"], (r["system"], r["tokens"])
    assert s["holds"] >= len(SYSTEMS) - 1, [(r["system"], r["truth"], r["answer"]) for r in records if not r["holds"]]


def test_writing_assistant_says_plainly_when_the_notes_do_not_cover_the_topic(tmp_path):
    """A topic none of the notes speaks of is not drafted from whatever the store returns (it used to repeat
    one unrelated sentence three times); a repeated sentence and list numbering are not draft sentences."""
    import writing_assistant as wa

    chunks = list(NOTE_SETS["volcanoes"].values())
    assert wa.covers("How Etna is watched", chunks)
    assert wa.covers("Monitoring eruptions", chunks)
    assert not wa.covers("The history of jazz piano", chunks)
    assert wa.topic_terms("Why does the history of jazz matter?") == {"history", "jazz"}
    d, notes = _write_notes(tmp_path, "volcanoes")
    sources = [wa.Source(f"{n}:1-{len(t.splitlines())}", str(d / n), 1, len(t.splitlines()), 0, t)
               for n, t in notes.items()]
    same = "Mount Etna in Sicily is about 3,357 metres high."
    body, dropped = wa.cite(f"{same} {same} 1. 2. {same}", sources)
    assert body == "Mount Etna in Sicily is about 3,357 metres high [etna.md:1-4]." and dropped == []
