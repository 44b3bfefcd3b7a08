"""``bench agent --backend server``: the agent scenario on a prefix-caching server, append vs prepend.

The same scenario as ``bench agent`` (system + two tool schemas + a question; then ``steps`` times:
``generate`` tokens with EOS ignored, and a tool result of ``tool_tokens`` tokens) runs twice on the
same server, in one run:

- ``append`` (FlashBack): the conversation through :class:`~flashback_agents.chat.ChatEngine` on the
  server backend; every prompt extends the previous one, so the server's prefix cache serves it.
- ``prepend`` (rebuilt prompt): the same kind of conversation rendered with the evidence (tool
  results) placed first (``Layout.render(..., pattern="prepend")``), so each new result invalidates
  everything after it in the server's cache.

Per step: wall seconds, prompt tokens and the *server's own* cached-token figure (llama.cpp
``timings.cache_n``, vLLM/SGLang ``cached_tokens``). Without a ``--server`` URL the embedded llama.cpp
server (xllamacpp) is started on a free loopback port with the default GGUF, and stopped afterwards.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from ..engines import clear_server_engines, server_engine
from ..generation import GenerationConfig
from ..layout import Message
from ..llamacpp import ServeConfig, ServerProcess, free_port
from .agent_bench import QUESTION, SYSTEM, TOOLS, Scenario, tool_results


@dataclass
class ServerStep:
    step: int
    seconds: float
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int
    prefill_seconds: float = 0.0  # the server's own prompt time (llama.cpp timings.prompt_ms)
    decode_seconds: float = 0.0   # the server's own generation time (timings.predicted_ms)
    shared_prefix: int = 0        # leading wire tokens this prompt shares with the previous prompt + its reply


@dataclass
class LayoutRun:
    layout: str
    steps: list[ServerStep] = field(default_factory=list)

    def summary(self) -> dict:
        total = sum(s.seconds for s in self.steps)
        prompt = sum(s.prompt_tokens for s in self.steps)
        cached = sum(s.cached_tokens for s in self.steps)
        later = self.steps[1:] or self.steps
        return {"layout": self.layout, "seconds_total": total,
                "seconds_per_step": total / max(1, len(self.steps)),
                "seconds_last_step": self.steps[-1].seconds if self.steps else float("nan"),
                "cache_share": cached / prompt if prompt else 0.0,
                "cache_share_after_first": (sum(s.cached_tokens for s in later)
                                            / max(1, sum(s.prompt_tokens for s in later))),
                "steps": [asdict(s) for s in self.steps]}


def shared_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share (what a prefix cache can serve of ``b`` after ``a``)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _run(engine, scenario: Scenario, results: list[str], pattern: str, progress: bool) -> LayoutRun:
    backend, layout = engine.backend, engine.layout
    config = GenerationConfig(max_new_tokens=scenario.generate, min_new_tokens=scenario.generate)
    # A run tag first in the system block: the two runs share no prefix on the server, so each starts cold.
    msgs = [Message("system", f"[run: {pattern} layout] {SYSTEM}"), Message("user", QUESTION)]
    run = LayoutRun(pattern)
    previous: list[int] = []  # the previous request's wire prompt + the reply's ids (what the server's slot holds)
    for i in tqdm(range(scenario.steps), desc=f"server {pattern}", disable=not progress, leave=False):
        ids = layout.render(msgs, tools=TOOLS, pattern=pattern)
        t0 = time.perf_counter()
        brun = backend.start(ids, config, backend.prepare(ids, config, None))
        for _ in brun:
            pass
        seconds = time.perf_counter() - t0
        result, usage = brun.result, brun.usage
        reply = Message("assistant", result.text)
        layout.remember_reply(reply, result.token_ids)  # both layouts reuse the generated ids
        wire = backend.to_wire(ids)
        run.steps.append(ServerStep(i + 1, seconds, usage.input_tokens, usage.cache_read, usage.computed,
                                    usage.prefill_seconds or 0.0, usage.decode_seconds or 0.0,
                                    shared_prefix_length(previous, wire)))
        previous = wire + list(result.token_ids)
        msgs += [reply, Message("tool", results[i], name="search_logs")]
    return run


def bench_server(url: str | None, scenario: Scenario, *, model: str = "smollm2-135m-instruct",
                 tokenizer: str | None = None, threads: int | None = None, progress: bool = True) -> dict:
    """Run the scenario in both layouts on one server (started here when ``url`` is None)."""
    proc = None
    if url is None:
        ctx = 512 + scenario.steps * (scenario.tool_tokens + scenario.generate + 64)
        proc = ServerProcess(ServeConfig(model=model, port=free_port(), ctx_size=max(4096, ctx), threads=threads,
                                         tokenizer=tokenizer))
        url = proc.start()
    try:
        engine = server_engine(url, tokenizer=tokenizer, require_cache_report=True)
        results = tool_results(engine.lm, scenario)
        append = _run(engine, scenario, results, "append", progress)
        prepend = _run(engine, scenario, results, "prepend", progress)
        a, p = append.summary(), prepend.summary()
        info = engine.backend.info
        return {"server": url, "flavor": info.flavor, "model": engine.model_name, "markers": info.markers,
                "scenario": asdict(scenario), "layouts": [a, p],
                "speedup_total": p["seconds_total"] / a["seconds_total"] if a["seconds_total"] else float("nan")}
    finally:
        if proc is not None:
            clear_server_engines()
            proc.stop()


def print_report(data: dict, echo) -> None:
    """The two layouts side by side: seconds per step and the server's cache share."""
    sc = data["scenario"]
    echo(f"{data['flavor']} server {data['server']} model={data['model']} markers={data['markers']} "
         f"scenario: N={sc['steps']} T={sc['tool_tokens']} G={sc['generate']}")
    echo(f"  {'layout':<9} {'s/step':>8} {'last step':>10} {'total s':>8} {'cache share':>12} {'(steps 2+)':>11}")
    for r in data["layouts"]:
        echo(f"  {r['layout']:<9} {r['seconds_per_step']:>8.3f} {r['seconds_last_step']:>10.3f} "
             f"{r['seconds_total']:>8.2f} {r['cache_share']:>12.1%} {r['cache_share_after_first']:>11.1%}")
    echo(f"  append is {data['speedup_total']:.2f}x faster than prepend in total on the same server")
    for r in data["layouts"]:
        per = ", ".join(f"{s['seconds']:.2f}s/{s['cached_tokens']}of{s['prompt_tokens']}" for s in r["steps"])
        echo(f"  {r['layout']} per step (seconds/cached of prompt): {per}")
        srv = ", ".join(f"{s['prefill_seconds']:.2f}+{s['decode_seconds']:.2f}" for s in r["steps"])
        echo(f"  {r['layout']} per step, the server's own prefill+decode seconds: {srv}")
