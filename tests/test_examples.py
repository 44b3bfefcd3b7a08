"""The examples: the short log agent and the writing assistant (citations checked on unseen notes), end
to end on the default model (bounded: few steps, few tokens)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from examples import writing_assistant as wa
from tools import logtools
from tools.logtools import count_values, read_log

THREADS = 1  # the test CPU is shared: one torch thread is several times faster under contention


# ------------------------------------------------------------------------ the short log agent
def test_log_agent_example_cli_errors(tmp_path, capsys):
    from examples import log_analysis_agent as ex

    for path, msg in ((tmp_path / "missing.log", "No such log file"), (tmp_path, "is a directory")):
        with pytest.raises(SystemExit) as e:
            ex.main(["--log", str(path)])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ex.main(["--max-steps", "1"])
    assert "at least 2" in capsys.readouterr().err


@pytest.mark.model
def test_log_agent_example_on_sample_log(capsys):
    """make demo: a tool runs, the last call is final_answer, every call after the first reads the
    previous prompt and reply from the cache, and the answer quotes the tools' count."""
    from examples import log_analysis_agent as ex

    res = ex.main(["--threads", str(THREADS)])
    printed = capsys.readouterr().out
    assert 2 <= len(res.steps) <= 4 and res.steps[-1].tool == "final_answer"
    assert any(s.tool != "final_answer" for s in res.steps)
    assert re.search(r"computed \d+, reused \d+ of \d+ prompt tokens", printed)
    assert re.search(r"final answer \((model|composed)\): ", printed)
    for prev, cur in zip(res.steps, res.steps[1:]):
        assert cur.reused >= prev.input_tokens and cur.computed < cur.input_tokens, (prev, cur)
    n_err = count_values(read_log(logtools.SAMPLE_LOG), "level")["ERROR"]
    assert str(n_err) in res.answer, res.answer
    # the demo's question (which component reports the most ERROR lines) is answered by the model itself
    by_comp = logtools.count_lines(read_log(logtools.SAMPLE_LOG), "component", "ERROR").data["counts"]
    assert max(by_comp, key=by_comp.get) in res.answer, (by_comp, res.answer)
    assert "final answer (model): " in printed


def test_writing_assistant_missing_notes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        wa.main(["--notes", str(tmp_path / "none"), "--store", str(tmp_path / "s")])
    assert e.value.code == 2 and "No such notes folder" in capsys.readouterr().err


@pytest.mark.model
def test_writing_assistant_drafts_with_sources(tmp_path, capsys):
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
    d, notes = _write_notes(tmp_path, "volcanoes")
    res = wa.main(["--notes", str(d), "--topic", "How Etna is watched", "--max-new-tokens", "40",
                   "--threads", str(THREADS), "--store", str(tmp_path / "store")])
    printed = capsys.readouterr().out
    assert res.sources and all(Path(s.path).parent == d for s in res.sources)
    assert wa.check_citations(res.draft, notes) == [], res.draft
    assert "sources used:" in printed


def test_writing_assistant_says_plainly_when_the_notes_do_not_cover_the_topic(tmp_path):
    """A topic none of the notes speaks of is not drafted from whatever the store returns (it used to repeat
    one unrelated sentence three times); a repeated sentence and list numbering are not draft sentences."""
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
