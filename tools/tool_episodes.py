"""General tool-use training episodes, recorded from the frameworks' own agent loops.

Each episode is scripted (:mod:`tools.tool_families` knows the right calls, their results and the
answer), then *played* through LangChain v1 ``create_agent`` over :class:`ChatFlashBack` or LlamaIndex
``FunctionAgent`` over :class:`FlashBack`, with the model call replaced by the script. What the
integration would hand to the engine at the last step (its own message conversion, the tool schemas
the framework built from the functions, tool results as the framework words them) plus the scripted
final answer is written as one OpenAI-format conversation. Training then renders it with the same
``Layout`` as inference, so the adapter learns exactly the ids an agent sends
(``tests/test_tool_episodes.py`` compares them step by step).

Kinds (shares of ``--n`` per ``--mix``, :data:`MIXES`): one call with 0-4 distractor tools bound, two-step
chains whose second call uses the first result, two calls for two entities or two questions, questions
that need no tool, and questions no bound tool covers (answered in words, no call; in mix v2 half of them
with a near-miss tool bound that takes what the question names but cannot answer it).

    python -m tools.tool_episodes --out build/tools.jsonl --n 2400 --seed 0 --mix v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tools.tool_families import (FAMILY_OF, MAKERS, NO_TOOL, TOOLS, UNCOVERED, Script, no_fit_answer, play,
                                 q_chain, q_lookup_chain, q_pair, q_then, q_two)

#: (kind, share) of the episodes drawn, per mix. "v1": the first shipped agent adapter's episodes (reproduced
#: exactly, fixed chain/pair scripts, far-off no-fit tools); "v2": more two-step episodes (chains and pairs
#: built from every family's single-call makers), more no-fit questions, half of them with a near-miss tool;
#: "v3": the v2 episodes with more of the two-call kinds (tried for phase 2, not shipped); "v4": the v2 shares,
#: but the calls of a "two" episode (two entities or two questions: no call needs another's result) are made
#: together in one assistant turn, as parallel calls, instead of one per step; "v5": v4, and half of the
#: chains look a record up and then convert or compute with the value it holds (:func:`q_lookup_chain`).
_V2_SHARES = (("single", 0.44), ("chain", 0.16), ("two", 0.14), ("no_tool", 0.10), ("no_fit", 0.16))
MIXES: dict[str, tuple[tuple[str, float], ...]] = {
    "v1": (("single", 0.56), ("chain", 0.12), ("two", 0.08), ("no_tool", 0.12), ("no_fit", 0.12)),
    "v2": _V2_SHARES,
    "v3": (("single", 0.30), ("chain", 0.24), ("two", 0.22), ("no_tool", 0.08), ("no_fit", 0.16)),
    "v4": _V2_SHARES,
    "v5": _V2_SHARES,
}
#: mixes whose independent calls are made in one turn
PARALLEL_MIXES = frozenset({"v4", "v5"})
DEFAULT_MIX = "v2"
#: how many UNCOVERED topics the v1 mix drew from (the list has grown since)
_V1_UNCOVERED = 14
#: tools that take the entity a no-fit question names but cannot answer it (near misses), by slot
NEAR_MISS = {"{c}": ["get_city_population"], "{p}": ["get_employee", "get_user_profile"],
             "{w}": ["get_product_price", "get_ticket"]}
#: system prompts a user may give (most agents give none; both frameworks then send none)
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a helpful assistant. Use the tools when they help.",
                  "Answer briefly.", "You are an assistant with access to tools. Answer the user's question.",
                  "Be concise and accurate."]
FRAMEWORKS = ("langchain", "llamaindex")


@dataclass
class Episode:
    """A drawn episode: the script, the tools bound (names, in the order given to the agent), the
    calls and results it produces, the final answer and an optional system prompt."""

    kind: str
    question: str
    tools: list[str]
    calls: list[tuple[str, dict]]
    results: list[Any]
    answer: str
    system: str | None = None
    #: the calls are made in one assistant turn (none needs another's result)
    parallel: bool = False


def _distractors(rng: random.Random, keep: Sequence[str], n: int, avoid_families: set[str] = frozenset()) -> list[str]:
    pool = [t for t in TOOLS if t not in keep and t in FAMILY_OF and FAMILY_OF[t] not in avoid_families]
    return rng.sample(pool, min(n, len(pool)))


def _independent(script: Script, calls: list[tuple[str, dict]]) -> bool:
    """Whether every call of ``script`` is the same without the earlier results (so all can go at once)."""
    try:
        return all(step([None] * i) == call for i, (step, call) in enumerate(zip(script.calls, calls)))
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return False


def draw_episode(rng: random.Random, mix: str = DEFAULT_MIX) -> Episode:
    """One random episode (question, tools bound, ideal calls and answer) of ``mix`` (:data:`MIXES`)."""
    kinds = MIXES[mix]
    v1 = mix == "v1"
    kind = rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.25 else None
    if kind in ("single", "chain", "two"):
        if kind == "single":
            script = MAKERS[rng.choice(sorted(MAKERS))](rng)
        elif kind == "chain":
            u = 0.0 if v1 else rng.random()
            if mix == "v5":
                script = q_lookup_chain(rng) if u < 0.5 else q_chain(rng) if u < 0.75 else q_then(rng)
            else:
                script = q_chain(rng) if u < 0.5 else q_then(rng)
        else:
            script = q_two(rng) if v1 or rng.random() < 0.4 else q_pair(rng)
        calls, results = play(script)
        needed = list(dict.fromkeys(name for name, _ in calls))
        extra = rng.choice([0, 1, 1, 2, 2, 3, 4]) if kind == "single" else rng.choice([0, 1, 2])
        tools = needed + _distractors(rng, needed, extra)
        rng.shuffle(tools)
        parallel = kind == "two" and mix in PARALLEL_MIXES and _independent(script, calls)
        return Episode(kind, script.question, tools, calls, results, script.answer(results), system, parallel)
    tools = _distractors(rng, [], rng.choice([1, 2, 2, 3, 4]))
    if kind == "no_tool":
        question, answer = rng.choice(NO_TOOL)
        return Episode(kind, question, tools, [], [], answer, system)
    template, topic = rng.choice(UNCOVERED[:_V1_UNCOVERED] if v1 else UNCOVERED)
    near = [] if v1 else [t for slot, names in NEAR_MISS.items() if slot in template for t in names]
    if near and rng.random() < 0.5:  # a bound tool takes what the question names, yet cannot answer it
        tools = list(dict.fromkeys([rng.choice(near)] + tools))[:4]
        rng.shuffle(tools)
    question = template.format(c=rng.choice(["Lisbon", "Oslo", "Denver", "Osaka", "Lyon", "Perth"]),
                               p=rng.choice(["Ana", "Omar", "Lea"]), w=rng.choice(["Acme", "Nimbus", "AZ"]),
                               n=rng.randint(100, 999))
    return Episode(kind, question, tools, [], [], no_fit_answer(rng, topic, tools), system)


# ----------------------------------------------------------------------------- recording the frameworks

def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class _Recorder:
    """What the integration hands to the engine at each step: flashback Messages, tool dicts, choice."""

    def __init__(self, replies: list[tuple[str, list[tuple[str, dict]]]]):
        self.replies = list(replies)
        self.seen: list[tuple[list[Any], list[dict] | None, Any]] = []

    def next(self) -> tuple[str, list[tuple[str, dict]]]:
        if not self.replies:
            raise RuntimeError("the agent asked for more steps than the episode scripts")
        return self.replies.pop(0)


def _langchain_recorder_class() -> type:
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langchain_flashback import ChatFlashBack
    from langchain_flashback.chat_models import to_flashback_messages
    from pydantic import PrivateAttr

    class RecordingChat(ChatFlashBack):
        """ChatFlashBack whose model call is a script: records what ``_request`` would send."""

        _rec: Any = PrivateAttr(default=None)

        def _generate(self, messages: list, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
            self._rec.seen.append((to_flashback_messages(messages), kwargs.get("tools") or None,
                                   kwargs.get("tool_choice")))
            text, calls = self._rec.next()
            msg = AIMessage(content=text, tool_calls=[{"name": n, "args": a, "id": _call_id(), "type": "tool_call"}
                                                      for n, a in calls])
            return ChatResult(generations=[ChatGeneration(message=msg)])

    return RecordingChat


def _llamaindex_recorder_class() -> type:
    from llama_index.core.base.llms.types import ChatResponse
    from llama_index.llms.flashback import FlashBack
    from llama_index.llms.flashback.convert import reply_message as _reply_message
    from pydantic import PrivateAttr

    from flashback_agents.chat import ChatReply
    from flashback_agents.layout import ToolCall

    class RecordingLLM(FlashBack):
        """FlashBack whose model call is a script: records what ``_chat_args`` would send."""

        _rec: Any = PrivateAttr(default=None)

        def _scripted(self, messages: Sequence[Any], kwargs: dict) -> ChatResponse:
            fb, args = self._chat_args(messages, kwargs)
            self._rec.seen.append((fb, args["tools"], args["tool_choice"]))
            text, calls = self._rec.next()
            reply = ChatReply(text=text, tool_calls=[ToolCall(n, a, _call_id()) for n, a in calls])
            return ChatResponse(message=_reply_message(reply))

        def chat(self, messages: Sequence[Any], **kwargs: Any) -> ChatResponse:  # type: ignore[override]
            return self._scripted(messages, kwargs)

        async def achat(self, messages: Sequence[Any], **kwargs: Any) -> ChatResponse:  # type: ignore[override]
            return self._scripted(messages, kwargs)

        async def astream_chat(self, messages: Sequence[Any], **kwargs: Any) -> Any:  # type: ignore[override]
            response = self._scripted(messages, kwargs)

            async def gen() -> Any:
                yield response
            return gen()

    return RecordingLLM


class Player:
    """Plays episodes through one framework's agent loop and returns the recorded conversation.

    ``model``: the model spec or ``LoadedModel`` the LlamaIndex LLM is built on (only its tokenizer
    matters: nothing is generated).
    """

    def __init__(self, model: Any = None):
        self.model = model
        self._lc: type | None = None
        self._li: type | None = None
        self._li_llm: Any = None
        #: what the integration sent at each step of the last episode played: (Messages, tool dicts, choice)
        self.last_steps: list[tuple[list[Any], list[dict] | None, Any]] = []

    def _scripted_replies(self, ep: Episode) -> list[tuple[str, list[tuple[str, dict]]]]:
        if ep.parallel:
            return [("", list(ep.calls)), (ep.answer, [])]
        return [("", [call]) for call in ep.calls] + [(ep.answer, [])]

    def langchain(self, ep: Episode) -> tuple[list[Any], list[dict] | None]:
        from langchain.agents import create_agent
        from langchain_core.tools import tool

        if self._lc is None:
            self._lc = _langchain_recorder_class()
        rec = _Recorder(self._scripted_replies(ep))
        llm = self._lc()  # nothing is generated: the LangChain side needs no model
        llm._rec = rec
        agent = create_agent(llm, [tool(TOOLS[n]) for n in ep.tools], system_prompt=ep.system)
        agent.invoke({"messages": [("user", ep.question)]}, {"recursion_limit": 4 * len(ep.calls) + 4})
        return self._final(rec, ep)

    def llamaindex(self, ep: Episode) -> tuple[list[Any], list[dict] | None]:
        from llama_index.core.agent.workflow import FunctionAgent
        from llama_index.core.tools import FunctionTool

        if self._li is None:
            self._li = _llamaindex_recorder_class()
            self._li_llm = self._li(self.model) if self.model is not None else self._li()
        rec = _Recorder(self._scripted_replies(ep))
        self._li_llm._rec = rec
        agent = FunctionAgent(tools=[FunctionTool.from_defaults(TOOLS[n]) for n in ep.tools], llm=self._li_llm,
                              system_prompt=ep.system)

        async def run() -> Any:
            return await agent.run(ep.question)

        asyncio.run(run())
        return self._final(rec, ep)

    def _final(self, rec: _Recorder, ep: Episode) -> tuple[list[Any], list[dict] | None]:
        from flashback_agents.layout import Message

        self.last_steps = rec.seen
        if rec.replies:
            raise RuntimeError(f"the agent stopped before the script ended ({len(rec.replies)} replies left)")
        messages, tools, _choice = rec.seen[-1]
        return list(messages) + [Message("assistant", ep.answer)], tools

    def play(self, ep: Episode, framework: str) -> tuple[list[Any], list[dict] | None]:
        """(flashback Messages of the whole episode, tool dicts), as ``framework`` sends them."""
        if framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
        return self.langchain(ep) if framework == "langchain" else self.llamaindex(ep)


def to_openai(messages: Sequence[Any], tools: list[dict] | None) -> dict:
    """A conversation in the OpenAI transcript format ``flashback_agents.training.transcripts`` reads."""
    out = []
    for m in messages:
        if m.role == "assistant":
            row: dict[str, Any] = {"role": "assistant", "content": m.content}
            if m.tool_calls:
                row["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": json.dumps(c.arguments,
                                                                                           ensure_ascii=False)}}
                                     for c in m.tool_calls]
        elif m.role == "tool":
            row = {"role": "tool", "content": m.content, "tool_call_id": m.tool_call_id}
            if m.name:
                row["name"] = m.name
        else:
            row = {"role": m.role, "content": m.content}
        out.append(row)
    return {"messages": out, "tools": tools or []}


def generate(n: int, seed: int = 0, model: Any = None, progress: bool = True, mix: str = DEFAULT_MIX) -> list[dict]:
    """``n`` episodes (alternating frameworks), each as an OpenAI-format conversation with its tools."""
    from tqdm import tqdm

    rng = random.Random(seed)
    player = Player(model)
    rows = []
    for i in tqdm(range(n), desc="tool episodes", disable=not progress):
        ep = draw_episode(rng, mix)
        framework = FRAMEWORKS[i % 2]
        messages, tools = player.play(ep, framework)
        row = to_openai(messages, tools)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output .jsonl (OpenAI-format conversations with tools)")
    ap.add_argument("--n", type=int, default=1600, help="episodes to write (half LangChain, half LlamaIndex)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", choices=sorted(MIXES), default=DEFAULT_MIX, help="episode shares (see MIXES)")
    ap.add_argument("--model", default=None, help="model spec whose tokenizer the LlamaIndex LLM is built on "
                    "(default: the default model)")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be at least 1")
    rows = generate(args.n, args.seed, args.model, mix=args.mix)
    with open(args.out, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} episodes to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
