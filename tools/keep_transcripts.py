"""Self-distilled transcripts that keep the base model's plain chat and document answers.

An adapter trained only on the log agent's transcripts (``tools/agent_transcripts.py``) lifted the agent's
own answers but broke everything else the adapter also serves: a plain question ("capital of
France?") got a template reply, and the LlamaIndex query engine's layout (question, then two
marked documents) got an immediate end of turn. LoRA on K/V changes every forward, so the mix must
also say what *not* to change. These conversations do that with no download and no labelled data:

- **plain chat**: questions built from templates and topics (WikiText-2 valid article titles and
  a word list), answered by the base model itself (no adapter, greedy); only answers that end
  within ``--max-new-tokens`` are kept, so the adapter learns the base model's replies and stops;
- **document QA** in the query engine's layout (``QA_USER`` + marked documents, best last as
  ``FlashBackPromptTemplate`` orders them): invented facts about invented places (so no answer is
  known without reading), one to four documents with distractors. The target is the base model's
  answer with the same documents written *inline* (its natural reading position) when that answer
  holds the fact, else the fact's own sentence: the adapter learns to read marked documents as
  well as the base model reads inline ones (``tests/test_transcripts.py`` checks that a row trains on
  the ids the query engine sends).

    python -m tools.keep_transcripts --wikitext ../shared/data/wikitext-2/valid.txt --out keep.jsonl

Output is OpenAI JSONL (``docs/formats.md``), a ``documents`` list on the user message.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llama_index.llms.flashback.templates import FLASHBACK_TEXT_QA_PROMPT, QA_USER

#: how a non-FlashBack LLM sees the documents (written inline after the question): the teacher's view
INLINE_HEADER = FLASHBACK_TEXT_QA_PROMPT.inline_header

CHAT_TEMPLATES = [
    "Write one sentence about {topic}.", "What is {topic}? Answer briefly.", "Tell me one fact about {topic}.",
    "Explain {topic} to a child in two sentences.", "Give me a short title for an article about {topic}.",
    "List two words related to {topic}.", "Is {topic} a person, a place or a thing? Answer in one word.",
    "Describe {topic} in five words.",
]
ARITHMETIC = ["What is {a} plus {b}?", "What is {a} times {b}?", "What is {a} minus {b}?",
              "Compute {a} + {b}. Reply with the number only."]
GENERAL = [
    "Say hello.", "Name three colours.", "Name two animals that live in the sea.", "What day comes after Monday?",
    "How many days are in a week?", "Give me a synonym for happy.", "What is the opposite of cold?",
    "Spell the word cat backwards.", "Write a haiku about rain.", "What do bees make?",
    "Name a fruit that is yellow.", "How many legs does a spider have?", "What is water made of?",
    "Suggest a name for a pet dog.", "Reply with the word yes.", "What season comes after winter?",
    "Translate 'thank you' into French.", "Which is bigger, a mouse or an elephant?",
    "What is the first letter of the alphabet?", "Count from one to five.",
]
WORDS = ["the ocean", "mountains", "bicycles", "coffee", "libraries", "volcanoes", "the moon", "chess",
         "bread", "rivers", "trains", "music", "winter", "gardens", "clocks", "bridges", "forests", "honey",
         "the internet", "umbrellas", "deserts", "lighthouses", "kites", "owls", "glaciers", "paper"]
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
           "You are a friendly assistant who answers in plain English."]

_SYL = ["mar", "quil", "ven", "dor", "sal", "tre", "bel", "kor", "an", "lis", "mo", "ra", "thel", "wen",
        "gal", "port", "ish", "ul", "em", "ford", "brin", "cas", "del", "nor"]
KINDS = ["Observatory", "Museum", "Library", "Academy", "Lighthouse", "Brewery", "Theatre", "Abbey", "Mill",
         "Harbour", "Botanical Garden", "Railway"]
COLOURS = ["green", "blue", "red", "yellow", "white", "black", "orange", "purple", "grey"]
ANIMALS = ["otter", "fox", "owl", "heron", "badger", "hare", "goat", "seal", "crow"]


def _name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(_SYL) for _ in range(parts)).capitalize()


@dataclass
class Fact:
    """One invented fact: the document sentence, a question about it, the answer value it must hold."""

    entity: str
    sentence: str
    question: str
    value: str


def _facts(rng: random.Random, entity: str) -> list[Fact]:
    """Every attribute of one invented entity, each as (document sentence, question, value)."""
    person, town, island, pet = (f"{_name(rng)} {_name(rng, 3)}", _name(rng), _name(rng) + " Island",
                                 _name(rng, 3))
    year, staff, colour, animal = str(rng.randint(1780, 2015)), str(rng.randint(3, 900)), rng.choice(COLOURS), \
        rng.choice(ANIMALS)
    days = rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"])
    return [
        Fact(entity, f"The {entity} was founded in {year} by {person}.", f"In which year was the {entity} founded?",
             year),
        Fact(entity, f"The {entity} was founded in {year} by {person}.", f"Who founded the {entity}?", person),
        Fact(entity, f"The {entity} stands in the town of {town} on {island}.", f"In which town is the {entity}?",
             town),
        Fact(entity, f"The doors of the {entity} are painted {colour}.", f"What colour are the doors of the {entity}?",
             colour),
        Fact(entity, f"The {entity} employs {staff} people.", f"How many people work at the {entity}?", staff),
        Fact(entity, f"The {entity} keeps a {animal} called {pet}.", f"What is the {animal} at the {entity} called?",
             pet),
        Fact(entity, f"The {entity} is closed to visitors every {days}.", f"On which day is the {entity} closed?",
             days),
    ]


def qa_case(rng: random.Random) -> tuple[str, list[str], Fact]:
    """A question, its documents in the order the query engine sends them (best last), the fact asked."""
    entities = [f"{_name(rng)} {rng.choice(KINDS)}" for _ in range(3)]
    pools = {e: _facts(rng, e) for e in entities}
    fact = rng.choice(pools[entities[0]])
    others = [f for e in entities for f in pools[e] if f.sentence != fact.sentence]
    n_docs = rng.choice([1, 2, 2, 2, 3, 4])
    distractors = rng.sample(others, n_docs - 1)
    docs = [d.sentence for d in distractors]
    # written when the template put the best match last (best_last=True, its earlier default): the answer
    # document is last in 70% of the rows, elsewhere in the rest (the shipped adapter was trained on these)
    docs.insert(len(docs) if rng.random() < 0.7 else rng.randint(0, len(docs)), fact.sentence)
    return fact.question, docs, fact


def chat_prompts(rng: random.Random, titles: Sequence[str], n: int) -> list[str]:
    """``n`` distinct plain questions: topic templates (titles and words), arithmetic, general ones."""
    out: list[str] = list(GENERAL)
    topics = list(titles) + WORDS
    while len(out) < n:
        if rng.random() < 0.15:
            prompt = rng.choice(ARITHMETIC).format(a=rng.randint(2, 60), b=rng.randint(2, 30))
        else:
            prompt = rng.choice(CHAT_TEMPLATES).format(topic=rng.choice(topics))
        if prompt not in out:
            out.append(prompt)
    rng.shuffle(out)
    return out[:n]


def wikitext_titles(path: Path, limit: int = 400) -> list[str]:
    """Article titles (`` = Title = `` lines) without ``<unk>`` or markup, as topics."""
    titles = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r" = ([^=].*?) = ", line)
        if m and "<unk>" not in m.group(1) and "@" not in m.group(1):
            titles.append(m.group(1).replace(" , ", ", ").replace(" ( ", " (").replace(" )", ")"))
    return titles[:limit]


class Teacher:
    """The base model (no adapter), greedy, through the library's own layout and decoder."""

    def __init__(self, model: str, max_new_tokens: int):
        from flashback_agents import load_model
        from flashback_agents.layout import Layout

        self.lm = load_model(model, adapter=None)
        self.layout = Layout(self.lm)
        self.max_new_tokens = max_new_tokens

    def answer(self, messages: list) -> str | None:
        """The reply, or None when it did not end within ``max_new_tokens`` (a truncated target
        would teach the adapter to stop mid-sentence)."""
        from flashback_agents import CachedContext
        from flashback_agents.generation import GenerationConfig, generate

        ctx = CachedContext(self.lm)
        ctx.sync(self.layout.render(messages))
        res = generate(ctx, GenerationConfig(max_new_tokens=self.max_new_tokens))
        text = res.text.strip()
        return text if res.finish_reason == "stop" and text else None


def _row(user: str, reply: str, system: str | None = None, documents: list[str] | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": user, **({"documents": documents} if documents else {})})
    msgs.append({"role": "assistant", "content": reply})
    return {"messages": msgs}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wikitext", required=True, help="WikiText-2 valid.txt (article titles become topics)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--chat", type=int, default=160, help="plain questions asked")
    ap.add_argument("--qa", type=int, default=160, help="document questions asked")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    from tqdm import tqdm

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from flashback_agents.layout import Message

    rng = random.Random(args.seed)
    teacher = Teacher(args.model, args.max_new_tokens)
    rows, kept = [], {"chat": 0, "qa_teacher": 0, "qa_sentence": 0, "dropped": 0}
    for q in tqdm(chat_prompts(rng, wikitext_titles(Path(args.wikitext)), args.chat), desc="chat"):
        system = rng.choice(SYSTEMS) if rng.random() < 0.3 else None
        msgs = ([Message("system", system)] if system else []) + [Message("user", q)]
        reply = teacher.answer(msgs)
        if reply is None:
            kept["dropped"] += 1
            continue
        rows.append(_row(q, reply, system))
        kept["chat"] += 1
    for _ in tqdm(range(args.qa), desc="qa"):
        question, docs, fact = qa_case(rng)
        user = QA_USER.format(query_str=question)
        reply = teacher.answer([Message("user", user + INLINE_HEADER + "\n\n".join(docs))])
        if reply is not None and fact.value.lower() in reply.lower():
            kept["qa_teacher"] += 1
        else:
            reply = fact.sentence
            kept["qa_sentence"] += 1
        rows.append(_row(user, reply, documents=docs))
    rng.shuffle(rows)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(json.dumps({"out": args.out, "conversations": len(rows), **kept}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
