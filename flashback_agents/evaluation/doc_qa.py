"""``flashback-agents eval docqa``: a small document-QA check of the LlamaIndex query engines on one LLM.

The same LLM (``FlashBack``: by default the default model with its shipped adapter, offline) answers the
same questions over the same index through two query engines:

- ``flashback``: ``flashback_query_engine(index, llm=llm, similarity_top_k=k)``: the question first, each
  retrieved text appended after it between markers (best match last);
- ``default``: ``index.as_query_engine(llm=llm, similarity_top_k=k)``: LlamaIndex's default text-QA and
  refine templates (for a chat model: its expert-Q&A system message, then the context inline *before*
  the question).

Retrieval is the same for both (same index, same embedding model, same ``k``); it is recorded per
question (was the document that holds the answer among the ``k`` retrieved?) and checked to match
between the engines.

The corpus is :data:`DOCUMENTS`: short texts about invented places, people, objects, dates and numbers
(so no answer is known without reading), written by hand; none of them is a test's corpus or a sentence
template of ``tools/keep_transcripts.py`` (the adapter's training mix). Some documents come in similar
pairs (two ferries on one lake, two minerals, two bridges over one river, two texts about one island)
so that a question needs the right one of two retrieved texts.

An answer is right when it contains one of the question's expected strings (case-insensitive substring;
a number compared as text, not glued to other digits: ``23`` is not in ``1923``) and none of its
``wrong`` strings (for a question on one of a pair: the other document's value, i.e. the model read the
wrong document).

The LlamaIndex imports are made inside :func:`run_doc_qa` (an optional dependency: the ``llamaindex``
extra); this module imports without it. An empty reply (LlamaIndex's ``"Empty Response"``) is recorded
as the answer ``""``: not answered, not right.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import FlashBackError
from ..models import DEFAULT_MODEL, resolve_adapter

__all__ = ["DocQAError", "Question", "DOCUMENTS", "QUESTIONS", "ENGINES", "KINDS", "adapter_arg", "answer_hits",
           "format_table", "must_show_line", "score_answer", "run_doc_qa"]

#: the query engines compared, in table order, with their table labels
ENGINES = {"flashback": "FlashBack query engine", "default": "LlamaIndex default templates"}
#: question kinds: a fact in one document, a number, a name, one of two similar documents
KINDS = ("fact", "number", "name", "pair")


class DocQAError(ValueError, FlashBackError):
    """Bad options for the document-QA check (the message says which)."""


# ---------------------------------------------------------------------------- the corpus
#: document id -> text. Invented facts only; pairs: ferry-*, mineral-*, bridge-*, sarvenna-*.
DOCUMENTS: dict[str, str] = {
    "ferry-tessaloon": (
        "The ferry Tessaloon crosses Lake Vimbry from Oskadel to Purnhollow. Her captain is Ilsabet "
        "Crowmoor, and the crossing takes 47 minutes."),
    "ferry-gantreel": (
        "The ferry Gantreel crosses Lake Vimbry from Oskadel to Feyzenburg. Her captain is Joram "
        "Pettiwhistle, and the crossing takes 83 minutes."),
    "festival": (
        "The Lantern Tide festival is held in the hill town of Zelkovar on the fourth of October. At dusk, "
        "visitors float paper boats carrying candles down the river Ombrisk."),
    "mineral-vorestine": (
        "Vorestine is a violet mineral found only in the caves beneath Mount Quabbeth. It was first "
        "described in 1883 by the geologist Hesper Dunmarrow."),
    "mineral-callumite": (
        "Callumite is a green mineral found only in the mines of Brasska Ridge. It was first described "
        "in 1927 by the chemist Orla Fennick."),
    "pipit": (
        "The saffron pipit is a small bird of the Drennel Marshes. It has a wingspan of 23 centimetres "
        "and lays three speckled eggs each spring."),
    "knotball": (
        "Knotball is a board game invented by the toymaker Ambrose Veltcher in the village of Lindqueth. "
        "The first player to tie nine knots in the shared rope wins."),
    "sarvenna-money": (
        "The currency of the island republic of Sarvenna is the drimmel. One drimmel is divided into "
        "64 pellets."),
    "sarvenna-soup": (
        "Grellow soup is the national dish of the island republic of Sarvenna. It is made from roasted "
        "turnips, goat milk and a spoonful of pepper jam."),
    "bridge-copperstep": (
        "The Copperstep Bridge over the river Taffle is 312 metres long. It was designed by the engineer "
        "Wilhelmina Stroud."),
    "bridge-ironreed": (
        "The Ironreed Bridge over the river Taffle is 578 metres long. It was designed by the engineer "
        "Casimir Oakhurst."),
    "clock": (
        "The great clock of Pemmering Town Hall strikes thirteen times at midnight. Its bell, named Old "
        "Hobnail, weighs 940 kilograms."),
}


@dataclass(frozen=True)
class Question:
    """One question: the document holding its answer, the accepted answers, the values that are wrong."""

    id: str
    kind: str                      # one of KINDS
    question: str
    answers: tuple[str, ...]       # any one of them makes the answer right
    source: str                    # id of the document that holds the answer
    wrong: tuple[str, ...] = ()    # the similar document's value: reading it makes the answer wrong

    def as_dict(self) -> dict:
        return asdict(self)


QUESTIONS: tuple[Question, ...] = (
    Question("festival-river", "fact", "Down which river do visitors float paper boats during the Lantern Tide "
             "festival?", ("Ombrisk",), "festival"),
    Question("festival-month", "fact", "In which month is the Lantern Tide festival held?", ("October",),
             "festival"),
    Question("festival-town", "fact", "In which town is the Lantern Tide festival held?", ("Zelkovar",),
             "festival"),
    Question("soup-vegetable", "fact", "Which vegetable goes into Grellow soup?", ("turnip",), "sarvenna-soup"),
    Question("sarvenna-currency", "pair", "What is the currency of Sarvenna called?", ("drimmel",),
             "sarvenna-money", wrong=("Grellow",)),
    Question("sarvenna-dish", "pair", "What is the national dish of Sarvenna?", ("Grellow",), "sarvenna-soup",
             wrong=("drimmel",)),
    Question("pipit-wingspan", "number", "How wide is the wingspan of the saffron pipit, in centimetres?",
             ("23",), "pipit"),
    Question("knotball-knots", "number", "How many knots must a player tie to win at Knotball?", ("nine", "9"),
             "knotball"),
    Question("drimmel-pellets", "number", "How many pellets make up one drimmel?", ("64",), "sarvenna-money"),
    Question("bell-weight", "number", "How heavy is the bell of the Pemmering clock, in kilograms?", ("940",),
             "clock"),
    Question("knotball-inventor", "name", "Who invented the board game Knotball?", ("Veltcher",), "knotball"),
    Question("bell-name", "name", "What is the name of the bell in the Pemmering Town Hall clock?",
             ("Hobnail",), "clock"),
    Question("tessaloon-minutes", "pair", "How many minutes does the ferry Tessaloon take to cross Lake Vimbry?",
             ("47",), "ferry-tessaloon", wrong=("83",)),
    Question("gantreel-captain", "pair", "Who is the captain of the ferry Gantreel?", ("Pettiwhistle",),
             "ferry-gantreel", wrong=("Crowmoor",)),
    Question("vorestine-year", "pair", "In which year was vorestine first described?", ("1883",),
             "mineral-vorestine", wrong=("1927",)),
    Question("callumite-describer", "pair", "Who first described the mineral callumite?", ("Fennick",),
             "mineral-callumite", wrong=("Dunmarrow",)),
    Question("copperstep-length", "pair", "How long is the Copperstep Bridge, in metres?", ("312",),
             "bridge-copperstep", wrong=("578",)),
    Question("ironreed-designer", "pair", "Which engineer designed the Ironreed Bridge?", ("Oakhurst",),
             "bridge-ironreed", wrong=("Stroud",)),
)


# ---------------------------------------------------------------------------- scoring
def _pattern(needle: str) -> re.Pattern:
    """Case-insensitive substring; a number is not glued to other digits (``23`` is not in ``1923``)."""
    needle = needle.strip()
    left = r"(?<!\d)" if needle[:1].isdigit() else ""
    right = r"(?!\d)" if needle[-1:].isdigit() else ""
    return re.compile(left + re.escape(needle) + right, re.IGNORECASE)


def answer_hits(needles: Sequence[str], text: str) -> list[str]:
    """The strings of ``needles`` found in ``text`` (see :func:`_pattern`)."""
    return [n for n in needles if n.strip() and _pattern(n).search(text or "")]


def score_answer(question: Question, answer: str) -> dict:
    """``{"right", "hit", "confused"}``: an expected string is in the answer and no wrong one is."""
    hit = bool(answer_hits(question.answers, answer))
    confused = bool(answer_hits(question.wrong, answer))
    return {"right": hit and not confused, "hit": hit, "confused": confused}


# ---------------------------------------------------------------------------- options
def adapter_arg(spec: str | None) -> tuple[str, str | None]:
    """``"auto"`` / ``"none"`` / an adapter directory -> (label, what ``FlashBack(adapter=...)`` takes)."""
    if spec is None or str(spec).strip().lower() in ("none", "off"):
        return "none", None
    text = str(spec).strip()
    if not text:
        raise DocQAError("--adapter is empty; use auto, none or a trained adapter's directory")
    if text.lower() == "auto":
        return "auto", "auto"
    path = Path(text).expanduser()
    if not path.exists():
        raise DocQAError(f"adapter {spec}: no such directory; use auto, none or a trained adapter's directory")
    if path.is_file():
        raise DocQAError(f"adapter {spec} is a file, not an adapter directory; use auto, none or a trained "
                         "adapter's directory")
    if not (path / "adapter_config.json").is_file():
        raise DocQAError(f"{spec} is not an adapter directory (no adapter_config.json); "
                         "use auto, none or a trained adapter's directory")
    return text, str(path)


def _check(engines: Sequence[str], top_k: int, max_tokens: int, threads: int | None,
           questions: Sequence[Question]) -> list[str]:
    names = list(dict.fromkeys(engines))
    bad = [e for e in names if e not in ENGINES]
    if bad or not names:
        raise DocQAError(f"engines must be among {', '.join(ENGINES)}, got {list(engines)}")
    for name, value in (("top_k", top_k), ("max_tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DocQAError(f"{name} must be an integer >= 1, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DocQAError(f"threads must be an integer >= 1, got {threads!r}")
    if not questions:
        raise DocQAError("no question selected")
    unknown = [q.id for q in questions if q.source not in DOCUMENTS]
    if unknown:
        raise DocQAError(f"questions whose source document is not in the corpus: {', '.join(unknown)}")
    return names


# ---------------------------------------------------------------------------- the run
@dataclass
class _Row:
    id: str
    kind: str
    question: str
    expected: list[str]
    wrong: list[str]
    source: str
    retrieved: list[str] = field(default_factory=list)
    source_retrieved: bool = False
    #: engine -> {"answer", "right", "hit", "confused", "retrieved", "seconds"}
    answers: dict = field(default_factory=dict)


def _doc_of(node_with_score: Any, by_text: dict[str, str]) -> str:
    node = node_with_score.node
    ref = getattr(node, "ref_doc_id", None)
    if ref in DOCUMENTS:
        return ref
    return by_text.get(node.get_content().strip(), "?")


#: what LlamaIndex's synthesizers write when the LLM's reply is empty (and ``str(Response)`` of None)
_EMPTY = ("Empty Response", "None")


def _answer_text(response: Any) -> str:
    """The reply's text; LlamaIndex's placeholders for an empty reply count as no answer ("")."""
    text = getattr(response, "response", None)
    text = str(text if text is not None else "").strip()
    return "" if text in _EMPTY else text


def _build_index(vector_store: str, tmp: str) -> Any:
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.llms.flashback import chroma_vector_store, offline_embed_model

    docs = [Document(text=text, id_=doc_id) for doc_id, text in DOCUMENTS.items()]
    embed = offline_embed_model()
    if vector_store == "chroma":
        store = chroma_vector_store(tmp, collection_name="flashback-docqa")
        return VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults(vector_store=store),
                                               embed_model=embed)
    return VectorStoreIndex.from_documents(docs, embed_model=embed)


def run_doc_qa(llm_factory: Callable[[], Any] | None = None, *, model: str | None = None, adapter: str | None = "auto",
               engines: Sequence[str] = ("flashback", "default"), top_k: int = 2, max_tokens: int = 48,
               threads: int | None = None, questions: Sequence[Question] | None = None,
               vector_store: str = "chroma", progress: bool = False) -> dict:
    """Ask every question through every engine on one LLM over one index; return counts and every answer.

    ``llm_factory()`` builds the LLM (then ``model``, ``adapter`` and ``max_tokens`` are not used); else
    ``FlashBack(model, adapter=adapter, max_tokens=max_tokens)`` (``adapter``: ``"auto"``, ``"none"``/None
    or an adapter directory). ``vector_store``: ``"chroma"`` (an embedded Chroma in a temporary
    directory, as the integration's tests build it) or ``"memory"`` (LlamaIndex's simple store).

    Returns ``{"model", "adapter", "engines", "top_k", "max_tokens", "questions", "scores": {engine:
    {"right", "total", "answered", "confused", "by_kind"}}, "retrieval": {"source_retrieved", "total",
    "same_for_engines"}, "rows": [...], "must_show", "seconds"}``.
    """
    qs = list(questions) if questions is not None else list(QUESTIONS)
    names = _check(engines, top_k, max_tokens, threads, qs)
    if vector_store not in ("chroma", "memory"):
        raise DocQAError(f"vector_store must be chroma or memory, got {vector_store!r}")
    label, adapter_spec = adapter_arg(adapter) if llm_factory is None else ("custom", None)
    model = model or DEFAULT_MODEL
    try:
        import llama_index.core  # noqa: F401
        from llama_index.llms.flashback import FlashBack, flashback_query_engine
    except ImportError as exc:
        raise ImportError("the document-QA check needs the llamaindex extra: "
                          "pip install 'flashback-agents[llamaindex]'") from exc
    if threads is not None:
        torch.set_num_threads(threads)
    resolved = resolve_adapter(model, adapter_spec)
    path = str(resolved) if resolved is not None else None

    t0 = time.perf_counter()
    llm = llm_factory() if llm_factory is not None else FlashBack(model, adapter=adapter_spec, max_tokens=max_tokens)
    by_text = {text.strip(): doc_id for doc_id, text in DOCUMENTS.items()}
    rows = [_Row(q.id, q.kind, q.question, list(q.answers), list(q.wrong), q.source) for q in qs]
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="flashback-docqa-", ignore_cleanup_errors=True) as tmp:
        index = _build_index(vector_store, tmp)
        retriever = index.as_retriever(similarity_top_k=top_k)
        for row in rows:
            row.retrieved = [_doc_of(n, by_text) for n in retriever.retrieve(row.question)]
            row.source_retrieved = row.source in row.retrieved
        built = {"flashback": lambda: flashback_query_engine(index, llm=llm, similarity_top_k=top_k),
                 "default": lambda: index.as_query_engine(llm=llm, similarity_top_k=top_k)}
        for name in names:
            engine = built[name]()
            t_engine = time.perf_counter()
            for i, (q, row) in enumerate(zip(qs, rows), 1):
                t = time.perf_counter()
                response = engine.query(q.question)
                answer = _answer_text(response)
                row.answers[name] = {"answer": answer, **score_answer(q, answer),
                                     "retrieved": [_doc_of(n, by_text) for n in response.source_nodes],
                                     "seconds": round(time.perf_counter() - t, 3)}
                if progress:
                    mark = "right" if row.answers[name]["right"] else "wrong"
                    print(f"[{name} {i}/{len(rows)}] {row.id}: {mark}: {answer[:80]!r}", flush=True)
            seconds[name] = round(time.perf_counter() - t_engine, 3)
        del index, retriever
    scores = {}
    for name in names:
        mine = [r.answers[name] for r in rows]
        by_kind = {}
        for kind in KINDS:
            sel = [r.answers[name]["right"] for r in rows if r.kind == kind]
            if sel:
                by_kind[kind] = {"right": sum(sel), "total": len(sel)}
        scores[name] = {"right": sum(a["right"] for a in mine), "total": len(mine),
                        "answered": sum(bool(a["answer"]) for a in mine),
                        "confused": sum(a["confused"] for a in mine), "by_kind": by_kind, "seconds": seconds[name]}
    same = all(r.answers[n]["retrieved"] == r.retrieved for r in rows for n in names)
    result = {
        "model": getattr(getattr(llm, "engine", None), "model_name", None) or model,
        "adapter": {"label": label, "path": path},
        "engines": names, "top_k": top_k, "max_tokens": getattr(llm, "max_tokens", max_tokens),
        "vector_store": vector_store, "threads": threads, "questions": len(rows), "documents": len(DOCUMENTS),
        "scores": scores,
        "retrieval": {"source_retrieved": sum(r.source_retrieved for r in rows), "total": len(rows),
                      "same_for_engines": same},
        "rows": [asdict(r) for r in rows],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    result["must_show"] = must_show_line(result)
    return result


# ---------------------------------------------------------------------------- printing
def must_show_line(result: dict) -> str | None:
    """``FlashBack query engine X/N vs LlamaIndex default templates Y/N (at least: met|NOT met)``: the
    FlashBack engine answers at least as many questions right as the default templates (None unless both ran)."""
    s = result.get("scores", {})
    if "flashback" not in s or "default" not in s:
        return None
    fb, df = s["flashback"], s["default"]
    met = "met" if fb["right"] >= df["right"] else "NOT met"
    return (f"{ENGINES['flashback']} {fb['right']}/{fb['total']} vs {ENGINES['default']} "
            f"{df['right']}/{df['total']} (at least: {met})")


def format_table(result: dict) -> str:
    """A small markdown table: engine, right / total, per kind, answers naming the wrong document, seconds."""
    kinds = [k for k in KINDS if any(k in s["by_kind"] for s in result["scores"].values())]
    head = ["engine", "right / total", *kinds, "wrong doc", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, s in result["scores"].items():
        cells = [ENGINES.get(name, name), f"{s['right']}/{s['total']}"]
        cells += [f"{s['by_kind'][k]['right']}/{s['by_kind'][k]['total']}" if k in s["by_kind"] else "-" for k in kinds]
        cells += [str(s["confused"]), f"{s['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    r = result["retrieval"]
    lines.append("")
    lines.append(f"retrieval (same for both engines: {'yes' if r['same_for_engines'] else 'NO'}): the document "
                 f"with the answer was among the top {result['top_k']} for {r['source_retrieved']}/{r['total']} "
                 "questions")
    return "\n".join(lines)
