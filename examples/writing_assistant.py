"""Writing assistant: drafts a section from a folder of notes with the FlashBack retrieval loop.

Run:  python examples/writing_assistant.py                          (the notes in sample_data/notes)
      python examples/writing_assistant.py --notes ~/notes --topic "Why prefix caching matters"

The notes are indexed in Chroma (``flashback_agents.retrieval.index_paths``; re-running is
incremental: unchanged chunks are not re-embedded). Drafting runs on the engine directly
(:class:`flashback_agents.ralm.RetrievalLoop`): the question is placed first, then every ``stride``
generated tokens the last ``query_tokens`` tokens query the store and the ``top_k`` chunks are
appended, each as ``<MARK_L> [file:lines] chunk <MARK_R>``. Only the new evidence is computed; the
console shows, per retrieval, the tokens computed vs reused, then the draft and the sources it used.

The default model (SmolLM2-135M) writes weak prose; the point shown here is the mechanics (which
notes were pulled in, and what each retrieval cost). Pass ``--adapter`` for a trained adapter.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE_NOTES = Path(__file__).resolve().parent / "sample_data" / "notes"
DEFAULT_TOPIC = "Why appending retrieved evidence keeps the KV cache valid"
SYSTEM = "You are a technical writer. Write clear, factual prose using the notes provided."
PROMPT = ("Write a short section titled \"{topic}\". Use the facts in the notes that follow; "
          "do not invent numbers.")


@dataclass
class WritingConfig:
    """Options of one run (the command-line flags)."""

    notes: str | None = None
    topic: str = DEFAULT_TOPIC
    model: str = "smollm2-135m-instruct"
    adapter: str | None = None
    max_new_tokens: int = 96
    store: str | None = None
    stride: int = 16
    query_tokens: int = 32
    top_k: int = 2
    threads: int | None = None
    quiet: bool = False
    no_adapter: bool = False  # --no-adapter: the bare model (adapter=None passed explicitly)
    min_new_tokens: int = 48  # a paragraph: the end of turn is masked before this many tokens


@dataclass
class Source:
    label: str  # file.md:3-9
    path: str
    start_line: int
    end_line: int
    first_seen_at: int  # generated-token step of the retrieval that brought it in (0 = before decoding)
    text: str = ""  # the chunk as retrieved


# ------------------------------------------------------------------------------ citations
_NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")
_CITE = re.compile(r"\s*\[([^\[\]]+?:\d+-\d+)\]")
_STOP = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been it its this
that these those there their they we you he she i not no so than then which who what when where why how each every
all any can may might will would should could also only more most much many some such into over under about""".split())


def fact_terms(sentence: str) -> set[str]:
    """What a sentence asserts that a note must contain: its numbers and its names (capitalised or
    mixed-case words, acronyms, words with digits) other than the sentence's first word."""
    text = _CITE.sub("", sentence)
    terms: set[str] = set()
    for i, m in enumerate(re.finditer(r"\w(?:[\w'-]|[.,](?=\d))*", text)):
        w = m.group(0)
        if re.fullmatch(r"\d[\d,]*(?:\.\d+)?", w):
            terms.add(w.replace(",", ""))
        elif w.lower() not in _STOP and ((i > 0 and w[0].isupper()) or any(ch.isdigit() for ch in w)
                                         or (len(w) > 1 and w[1:] != w[1:].lower())):
            terms.add(w.lower())
    return terms


def supports(note: str, sentence: str) -> bool:
    """A note contains a sentence's facts: every number, and most of its names."""
    terms = fact_terms(sentence)
    if not terms:
        return False
    low = note.lower()
    nums = {t for t in terms if re.fullmatch(r"[\d.]+", t)}
    note_nums = {m.group(0).replace(",", "") for m in _NUMBER.finditer(note)}
    names = terms - nums
    found = sum(1 for t in names if re.search(rf"(?<!\w){re.escape(t)}(?!\w)", low))
    return nums <= note_nums and (not names or found >= 0.6 * len(names))


def sentences(text: str) -> list[str]:
    """Sentences end at . ! ? before a space or the end ("3.5" and "[a.md:1-4]" stay whole)."""
    return [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", text) if p.strip()]


def cite(draft_body: str, sources: Sequence[Source]) -> tuple[str, list[str]]:
    """Each sentence that states a fact gets ``[file:lines]`` of a note containing it; a sentence whose
    facts no retrieved note contains is left out (returned in the second list, shown as unsupported)."""
    kept, dropped = [], []
    seen: set[str] = set()
    for sent in sentences(draft_body):
        if re.match(r"#{1,6}\s", sent):
            continue  # a heading copied from the notes' markdown, not a sentence of the draft
        if not re.search(r"[^\W\d_]", sent):
            continue  # list numbering ("1.", "2.") or punctuation: nothing a reader would miss
        norm = " ".join(sent.lower().split())
        if norm in seen:
            continue  # a small model repeats itself; a draft says a thing once
        seen.add(norm)
        if not fact_terms(sent):
            kept.append(sent)
            continue
        note = next((s for s in sources if s.text and supports(s.text, sent)), None)
        if note is None:
            dropped.append(sent)
        else:
            body = sent.rstrip()
            end = len(body) - len(body.rstrip(".!?"))
            kept.append(f"{body[:len(body) - end]} [{note.label}]{body[len(body) - end:]}")
    # a piece without a final . ! ? ended at a line break: keep the break, or the checker (and the
    # reader) would read it and the next piece as one sentence with other facts
    return "".join(k + (" " if k.endswith((".", "!", "?")) else "\n") for k in kept).strip(), dropped


def check_citations(draft: str, notes: dict[str, str]) -> list[str]:
    """Problems with a draft: each sentence stating a fact must cite ``[file:a-b]``, and those lines of
    that note must contain its facts. ``notes`` maps file names to their text. [] when all hold."""
    problems = []
    for sent in sentences(draft.split("\n", 1)[-1] if draft.startswith("## ") else draft):
        if not fact_terms(sent):
            continue
        cites = _CITE.findall(sent)
        if not cites:
            problems.append(f"no citation: {sent!r}")
            continue
        ok = False
        for c in cites:
            name, rng = c.rsplit(":", 1)
            a, b = (int(x) for x in rng.split("-"))
            lines = notes.get(name, "").splitlines()[a - 1:b]
            ok = ok or supports("\n".join(lines), sent)
        if not ok:
            problems.append(f"cited note does not contain it: {sent!r} {cites}")
    return problems


@dataclass
class Retrieval:
    step: int
    query: str
    added: list[str]
    computed: int
    reused: int


@dataclass
class WritingResult:
    draft: str
    sources: list[Source]
    retrievals: list[Retrieval]
    prompt_tokens: int
    generated_tokens: int
    index_seconds: float
    seconds: float
    finish_reason: str
    extra: dict = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)  # sentences left out: no retrieved note contains them


_GENERIC = frozenset("""why how what when where who which does do did make makes made keep keeps kept use uses used
matter matters work works about into over notes note section short write""".split())


def topic_terms(topic: str) -> set[str]:
    """The words of a topic that a note about it would contain (no stop words, no question words)."""
    words = {w.lower() for w in re.findall(r"[^\W\d_][\w'-]*", topic)}
    return {w for w in words if len(w) > 2 and w not in _STOP and w not in _GENERIC}


def covers(topic: str, chunks: Sequence[str]) -> bool:
    """Whether retrieved notes speak of the topic: one of its words (or a word sharing its first five
    letters: "watched" / "watching") appears in them. A store always returns *something*; drafting from
    chunks about another subject only produces unsupported sentences."""
    terms = topic_terms(topic)
    if not terms:
        return True
    text = " ".join(chunks).lower()
    words = set(re.findall(r"[^\W\d_][\w'-]*", text))
    stems = {w[:5] for w in words if len(w) >= 5}
    return any(t in words or (len(t) >= 5 and t[:5] in stems) for t in terms)


def default_store(notes: Path) -> Path:
    from flashback_agents import cache_dir

    key = hashlib.sha256(str(notes.resolve()).encode()).hexdigest()[:12]
    return Path(cache_dir()) / "examples" / f"notes-{key}"


def run(cfg: WritingConfig, out=print) -> WritingResult:
    """Index the notes, draft with the retrieval loop, return the draft, sources and accounting."""
    from flashback_agents import CachedContext, GenerationConfig, Message, shared_model
    from flashback_agents.ralm import RetrievalLoop
    from flashback_agents.retrieval import RetrievalError, index_paths, open_store

    say = (lambda *a: None) if cfg.quiet else out
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    notes = Path(cfg.notes).expanduser() if cfg.notes else SAMPLE_NOTES
    if not notes.exists():
        raise RetrievalError(f"No such notes folder: {notes}. Pass --notes DIR (a folder of text/markdown files).")
    if not cfg.topic.strip():
        raise RetrievalError("The topic is empty: pass --topic TEXT.")
    store = Path(cfg.store).expanduser() if cfg.store else default_store(notes)
    t0 = time.perf_counter()
    report = index_paths([notes], store, "chroma", chunk_tokens=96, overlap=8, progress=not cfg.quiet)
    index_seconds = time.perf_counter() - t0
    say(f"notes: {notes} -> {report.chunks_total} chunks in {store} "
        f"(+{report.chunks_added} new, {report.chunks_unchanged} unchanged; {index_seconds:.1f}s)")
    retriever = open_store(store)
    # adapter= is passed only when asked: the core's default (its shipped adapter, if any) applies otherwise
    lm = shared_model(cfg.model, **({"adapter": cfg.adapter} if cfg.adapter or cfg.no_adapter else {}))
    ctx = CachedContext(lm)
    lay = ctx.layout
    # [system][user: the task]  -> evidence for it goes here, after the question ->  [assistant prompt] draft
    ids = lay.render([Message("system", SYSTEM), Message("user", PROMPT.format(topic=cfg.topic.strip()))],
                     add_generation_prompt=False)
    loop = RetrievalLoop(ctx, retriever, stride=cfg.stride, query_tokens=cfg.query_tokens, top_k=cfg.top_k)
    say(f"topic: {cfg.topic}")
    first = [d.text for d in retriever.retrieve(cfg.topic, max(cfg.top_k, 4))]
    if not covers(cfg.topic, first):
        seconds = time.perf_counter() - t0
        plain = (f"The notes do not cover \"{cfg.topic.strip()}\": none of them mentions "
                 f"{', '.join(sorted(topic_terms(cfg.topic)))}. Nothing was drafted.")
        say("")
        say(plain)
        return WritingResult(plain, [], [], len(ids), 0, index_seconds, seconds, "not_covered")
    # The draft starts with its title (part of the answer prefix): a small model then writes the
    # section instead of ending its turn at once.
    title = f"## {cfg.topic.strip()}\n\n"
    # A paragraph, not one sentence: the end of turn is masked for the first tokens (what the notes do not
    # support is left out below, so a longer draft cannot add an unsupported claim to the result).
    res = loop.generate(ids, GenerationConfig(max_new_tokens=cfg.max_new_tokens,
                                              min_new_tokens=min(cfg.min_new_tokens, cfg.max_new_tokens)),
                        answer_prefix=lay.generation_prompt() + lm.encode(title))
    by_id = {d.id: d for d in res.evidence}
    sources: list[Source] = []
    retrievals: list[Retrieval] = []
    for r in res.retrievals:
        labels = []
        for i in r.added_ids:
            d = by_id.get(i)
            if d is None:
                continue
            label = d.label() or d.id
            labels.append(label)
            sources.append(Source(label, str(d.metadata.get("source", "")), int(d.metadata.get("start_line", 0)),
                                  int(d.metadata.get("end_line", 0)), r.step, d.text))
        retrievals.append(Retrieval(r.step, r.query, labels, r.tokens_computed, r.tokens_reused))
        say(f"retrieval at token {r.step:3d}: +{len(labels)} chunk(s) {labels}  "
            f"computed {r.tokens_computed} tokens, reused {r.tokens_reused}")
    seconds = time.perf_counter() - t0
    body, unsupported = cite(res.text.strip(), sources)
    result = WritingResult(title + body, sources, retrievals, res.prompt_tokens, res.generated_tokens,
                           index_seconds, seconds, res.finish_reason, unsupported=unsupported)
    say("")
    say("draft:")
    say(result.draft or "(empty)")
    say("")
    if unsupported:
        say(f"left out ({len(unsupported)} sentence(s) whose facts no retrieved note contains):")
        for u in unsupported:
            say(f"  - {u}")
    say("sources used:")
    for s in sources:
        say(f"  [{s.label}] {s.path}")
    s = ctx.stats
    say(f"\ntotal: generated {res.generated_tokens} tokens, {len(res.retrievals)} retrievals; context computed "
        f"{s.tokens_computed} tokens, reused {s.tokens_reused}; {seconds:.1f}s")
    return result


def parse_args(argv: Sequence[str] | None) -> WritingConfig:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notes", help="folder of notes (default: examples/sample_data/notes)")
    ap.add_argument("--topic", default=DEFAULT_TOPIC)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ad = ap.add_mutually_exclusive_group()
    ad.add_argument("--adapter", help="directory of a trained FlashBack adapter")
    ad.add_argument("--no-adapter", action="store_true", help="run the bare model (adapter=None passed explicitly)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--store", help="Chroma store directory (default: a cache directory per notes folder)")
    ap.add_argument("--stride", type=int, default=16, help="retrieve every this many generated tokens")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a busy, shared CPU)")
    a = ap.parse_args(argv)
    if a.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")
    return WritingConfig(a.notes, a.topic, a.model, a.adapter, a.max_new_tokens, a.store, a.stride, 32, a.top_k,
                         a.threads, no_adapter=a.no_adapter)


def main(argv: Sequence[str] | None = None) -> WritingResult:
    """Command-line entry point; returns the result (for tests) or exits with a clear message."""
    from flashback_agents import ModelLoadError
    from flashback_agents.retrieval import RetrievalError

    cfg = parse_args(argv)
    try:
        return run(cfg)
    except (RetrievalError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
