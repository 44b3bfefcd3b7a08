"""Context budget compaction: evict the oldest marked blocks (tool results, evidence) into short stubs.

Works on token ids, so it serves every framework the same way: a marked block is the span from a
``<MARK_L>`` to the next ``<MARK_R>``. The system block, tool schemas and user messages are never
marked, so they always stay. A :class:`Compactor` remembers what it evicted and applies the same
replacement to the next request's ids (frameworks re-send the full history at every step): after a
compaction, the next step is again a pure append.

Evicted blocks that follow each other are **merged** into one stub, together with what lies between
them when that is only an assistant *tool-call* turn (and the tool-role wrappers) or the separator
between two retrieved documents: ``[evicted search_logs: 12 results, 3104 tokens]`` replaces twelve
calls and their results. The oldest call of a run (the one before its first result) stays, so the
conversation still reads assistant call -> tool result -> assistant call. Neither the newest result
nor anything after it (the current turn) is ever evicted first.

Compaction shrinks to ``min(low_water * budget, budget - reserve - headroom_steps * step)``, where
``step`` is the size of the newest step (everything after the previous marked block) and never below
a quarter of the budget: with large tool results, ``headroom_steps`` (8) more such steps fit before
the next compaction, so compactions stay rare and each costs one tail recompute.

The compacted view is a deterministic function of the ids and the remembered replacements: each
replacement is keyed on the content of its first block, its number of blocks and the hash of the
whole span it covers, in the frame it was made in; :meth:`Compactor.apply` applies them left to
right (longest first) until nothing changes, so it maps the full history and an already compacted
view alike, and a history that grew by appending maps to a view that grew by appending.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from .tokens import Tokens

logger = logging.getLogger("flashback_agents")

ON_OVERFLOW = ("error", "evict", "shift")


@dataclass(frozen=True)
class Block:
    start: int  # index of <MARK_L>
    end: int  # index after <MARK_R>

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class CompactionEvent:
    """One compaction: what was dropped and what it cost."""

    blocks_evicted: int
    tokens_evicted: int  # tokens removed (block sizes minus stub sizes)
    first_changed: int  # index of the first token that differs: the tail after it is recomputed
    tokens_before: int
    tokens_after: int
    blocks_cut: int = 0
    tokens_recomputed: int = 0  # cached tokens after the first change that had to be recomputed (evict)
    stubs_merged: int = 0  # runs of several blocks (with the tool-call turns between them) made one stub
    target: int = 0  # the length compaction aimed for (low-water mark, or room for headroom_steps steps)


def find_blocks(ids: Sequence[int], marker_ids: tuple[int, int]) -> list[Block]:
    """Marked spans ``<MARK_L> ... <MARK_R>`` in order (an unclosed trailing span is ignored)."""
    left, right = marker_ids
    blocks, start = [], None
    for i, t in enumerate(ids):
        if t == left:
            start = i
        elif t == right and start is not None:
            blocks.append(Block(start, i + 1))
            start = None
    return blocks


def _key(ids: Sequence[int]) -> str:
    return hashlib.blake2b(bytes(str(list(ids)), "ascii"), digest_size=16).hexdigest()


def _contains(seq: Sequence[int], sub: Sequence[int]) -> bool:
    n = len(sub)
    if not n:
        return False
    first = sub[0]
    return any(seq[i] == first and list(seq[i:i + n]) == list(sub) for i in range(len(seq) - n + 1))


_MERGED = re.compile(r"^\[evicted (.+): (\d+) results, (\d+) tokens\]$")
_SINGLE = re.compile(r"^\[evicted (\S+): (\d+) tokens\]$")
_CUT = re.compile(r"\[\.\.\. cut (\d+) tokens of (\S+)\]$")


@dataclass
class Wrappers:
    """The role wrappers' ids, to tell which gaps between two blocks may go into a merged stub (the caller
    that knows the chat layout builds it: :meth:`from_layout`)."""

    sep: list[int]  # after a retrieved document
    tool_pre: list[int]
    tool_suf: list[int]
    gen: list[int]  # an assistant turn's opening (the generation prompt)
    ast_suf: list[int]
    user_pre: list[int]
    tool_format: Any  # parses an assistant turn's tool calls: ``parse(text) -> (text, calls)``

    @classmethod
    def from_layout(cls, layout: Any) -> "Wrappers":
        """From a :class:`~flashback_agents.layout.Layout` (its chat format, generation prompt and tool format)."""
        fmt = layout.fmt

        def enc(text: str) -> list[int]:
            return list(layout.lm.encode(text)) if text else []

        return cls(sep=enc("\n"), tool_pre=enc(fmt.prefix["tool"]), tool_suf=enc(fmt.suffix["tool"]),
                   gen=layout.generation_prompt(), ast_suf=enc(fmt.suffix["assistant"]),
                   user_pre=enc(fmt.prefix["user"]), tool_format=layout.tool_format)


@dataclass
class Compactor:
    """Keeps a token budget by replacing the oldest marked blocks with stubs (remembered per conversation).

    ``low_water`` is the largest fraction of the budget compaction shrinks to; with large steps it
    shrinks further, so that ``headroom_steps`` more steps like the newest fit before the next one.
    Compaction is then rare and its cost (recomputing the tail after the first change) is amortised
    over many steps.
    """

    tokens: Tokens  # encode / decode and the marker ids (a LoadedModel, or a tokenizer-only model)
    budget: int
    low_water: float = 0.75
    #: replacements: ``key(block)`` (one block) or ``key(first block)+n:key(span)`` -> stub ids
    _stubs: dict[str, list[int]] = field(default_factory=dict)
    _stub_keys: set[str] = field(default_factory=set)
    headroom_steps: int = 8
    _wrap: Wrappers | None = None
    _index: dict[str, list[tuple[int, str | None, list[int]]]] = field(default_factory=dict, repr=False)
    _indexed: tuple[int, int] = (0, -1)
    #: the role wrappers (:class:`Wrappers`), or a function that builds them when first needed (None:
    #: merge no runs of blocks)
    wrappers: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.low_water <= 1:
            raise ValueError(f"low_water must be in (0, 1], got {self.low_water}")
        if self.budget < 16:
            raise ValueError(f"max_context_tokens must be at least 16, got {self.budget}")

    @property
    def marker_ids(self) -> tuple[int, int]:
        return self.tokens.marker_ids

    def copy(self) -> "Compactor":
        return Compactor(self.tokens, self.budget, self.low_water, dict(self._stubs), set(self._stub_keys),
                         self.headroom_steps, self._wrap, wrappers=self.wrappers)

    def record(self) -> dict | None:
        """What it evicted, as a JSON-able record (``{"stubs": {key: stub ids}, "stub_keys": [...]}``; None:
        nothing): what a saved context stores, and :meth:`restore` takes back."""
        if not self._stubs:
            return None
        return {"stubs": {k: list(v) for k, v in self._stubs.items()}, "stub_keys": sorted(self._stub_keys)}

    def restore(self, record: dict) -> None:
        """Remember the evictions of a :meth:`record` (replacing any it holds): the next ids map as they did."""
        self._stubs = {k: list(v) for k, v in record.get("stubs", {}).items()}
        self._stub_keys = set(record.get("stub_keys", ()))
        self._indexed = (0, -1)

    # ------------------------------------------------------------------ stubs
    def _name_of(self, block_ids: Sequence[int]) -> str:
        body = self.tokens.decode(list(block_ids[1:-1]))
        head = body.split(":", 1)[0].strip() if ":" in body[:64] else ""
        return head if head and " " not in head else "evidence"

    def _stub(self, block_ids: Sequence[int], cut_keep: int | None = None) -> list[int]:
        """Stub for a block: names the tool (when the block starts with 'name: ') and the tokens dropped."""
        name = self._name_of(block_ids)
        left, right = self.marker_ids
        if cut_keep is None:
            return [left] + self.tokens.encode(f"[evicted {name}: {len(block_ids)} tokens]") + [right]
        kept = list(block_ids[1 : 1 + cut_keep])
        note = self.tokens.encode(f" [... cut {len(block_ids) - cut_keep - 2} tokens of {name}]")
        return [left] + kept + note + [right]

    def _describe(self, block_ids: Sequence[int]) -> tuple[int, Counter, int]:
        """(results, names, original tokens) a block stands for: itself, or what a stub of ours replaced."""
        if self._is_stub(block_ids):
            text = self.tokens.decode(list(block_ids[1:-1])).strip()
            m = _MERGED.match(text)
            if m:
                names: Counter = Counter()
                for part in m.group(1).split(", "):
                    name, _, count = part.rpartition(" x")
                    if name and count.isdigit():
                        names[name] += int(count)
                    else:
                        names[part] += int(m.group(2)) if len(m.group(1).split(", ")) == 1 else 1
                return int(m.group(2)), names, int(m.group(3))
            m = _SINGLE.match(text)
            if m:
                return 1, Counter({m.group(1): 1}), int(m.group(2))
            m = _CUT.search(text)
            if m:
                return 1, Counter({m.group(2): 1}), len(block_ids) + int(m.group(1))
        return 1, Counter({self._name_of(block_ids): 1}), len(block_ids)

    def _merged_stub(self, parts: list[tuple[int, Counter, int]], span: int) -> list[int]:
        n = sum(p[0] for p in parts)
        names: Counter = Counter()
        for p in parts:
            names.update(p[1])
        tokens = sum(p[2] for p in parts) + span  # what the run stood for, the gaps between included
        label = (next(iter(names)) if len(names) == 1 else
                 ", ".join(f"{name} x{c}" for name, c in names.most_common()))
        left, right = self.marker_ids
        return [left] + self.tokens.encode(f"[evicted {label}: {n} results, {tokens} tokens]") + [right]

    # ----------------------------------------------------------------- gaps
    def _wrappers(self) -> Wrappers:
        if self._wrap is None:
            if self.wrappers is None:
                raise LookupError("no role wrappers given: runs of blocks are not merged")
            self._wrap = self.wrappers if isinstance(self.wrappers, Wrappers) else self.wrappers()
        return self._wrap

    def _mergeable(self, gap: Sequence[int]) -> bool:
        """Whether the ids between two blocks may go into one stub with them: the separator between
        two documents, the wrappers between two tool results, or one assistant tool-call turn."""
        gap = list(gap)
        try:
            w = self._wrappers()
        except Exception:  # noqa: BLE001 - a tokenizer the layout cannot probe: merge nothing
            return False
        if gap == w.sep:
            return True
        ts, tp = w.tool_suf, w.tool_pre
        if not tp or len(gap) < len(ts) + len(tp) or gap[:len(ts)] != ts or gap[len(gap) - len(tp):] != tp:
            return False
        mid = gap[len(ts):len(gap) - len(tp)]
        if not mid:
            return True  # parallel results of one assistant turn
        g, sa = w.gen, w.ast_suf
        if not g or len(mid) < len(g) + len(sa) or mid[:len(g)] != g or (sa and mid[len(mid) - len(sa):] != sa):
            return False
        body = mid[len(g):len(mid) - len(sa)]
        if _contains(body, g) or (w.user_pre and w.user_pre != tp and _contains(body, w.user_pre)):
            return False
        try:
            _, calls = w.tool_format.parse(self.tokens.decode(body))
        except Exception:  # noqa: BLE001
            return False
        return bool(calls)

    # ----------------------------------------------------------------- view
    def _record(self, view: Sequence[int], blocks: list[Block], stub: list[int]) -> None:
        first = view[blocks[0].start:blocks[0].end]
        if len(blocks) == 1:
            key = _key(first)
        else:
            key = f"{_key(first)}+{len(blocks)}:{_key(view[blocks[0].start:blocks[-1].end])}"
        self._stubs[key] = list(stub)
        self._stub_keys.add(_key(stub))
        self._indexed = (0, -1)

    def _index_of(self) -> dict[str, list[tuple[int, str | None, list[int]]]]:
        sig = (id(self._stubs), len(self._stubs))
        if sig != self._indexed:
            index: dict[str, list[tuple[int, str | None, list[int]]]] = {}
            for key, stub in self._stubs.items():
                head, _, rest = key.partition("+")
                if rest:
                    n, _, span = rest.partition(":")
                    index.setdefault(head, []).append((int(n), span, stub))
                else:
                    index.setdefault(head, []).append((1, None, stub))
            for cands in index.values():
                cands.sort(key=lambda c: -c[0])  # longest first
            self._index, self._indexed = index, sig
        return self._index

    def _apply_once(self, ids: list[int]) -> list[int]:
        index = self._index_of()
        blocks = find_blocks(ids, self.marker_ids)
        out: list[int] = []
        pos = i = 0
        while i < len(blocks):
            b = blocks[i]
            hit = None
            for n, span, stub in index.get(_key(ids[b.start:b.end]), ()):
                if i + n > len(blocks):
                    continue
                end = blocks[i + n - 1].end
                if span is None or _key(ids[b.start:end]) == span:
                    hit = (n, end, stub)
                    break
            if hit is None:
                i += 1
                continue
            n, end, stub = hit
            out += ids[pos:b.start] + stub
            pos, i = end, i + n
        return out + ids[pos:] if pos else ids

    def apply(self, ids: Sequence[int]) -> list[int]:
        """Replace everything evicted earlier by its stub (so re-sent history matches the cache)."""
        out = list(ids)
        if not self._stubs:
            return out
        while True:  # every replacement shortens the ids, so this ends
            new = self._apply_once(out)
            if len(new) == len(out):
                return new
            out = new

    # -------------------------------------------------------------- compact
    def _target(self, ids: Sequence[int], blocks: list[Block], reserve: int) -> int:
        target = int(self.budget * self.low_water) - reserve
        if self.headroom_steps > 0 and len(blocks) >= 2:
            step = len(ids) - blocks[-2].end  # the newest step: everything after the previous block
            room = self.budget - reserve - self.headroom_steps * step
            target = min(target, max(room, self.budget // 4 - reserve))
        return target

    def compact(self, ids: Sequence[int], reserve: int = 0) -> tuple[list[int], CompactionEvent | None]:
        """Ids within budget (minus ``reserve``): evict oldest blocks down to the target (see module doc)."""
        ids = self.apply(ids)
        limit = self.budget - reserve
        if len(ids) <= limit:
            return ids, None
        blocks = find_blocks(ids, self.marker_ids)
        target = self._target(ids, blocks, reserve)
        stub = [self._is_stub(ids[b.start:b.end]) for b in blocks]
        joins = [self._mergeable(ids[blocks[i].end:blocks[i + 1].start]) for i in range(len(blocks) - 1)]
        parts: dict[int, tuple[int, Counter, int]] = {}
        single: dict[int, list[int]] = {}

        def plan(covered: set[int]) -> tuple[int, list[tuple[int, int, list[int]]]]:
            """(length, [(first block, last block, stub)] for every run that changes)."""
            runs, cur = [], []
            for i in sorted(covered):
                if cur and cur[-1] == i - 1 and joins[i - 1]:
                    cur.append(i)
                else:
                    if cur:
                        runs.append(cur)
                    cur = [i]
            if cur:
                runs.append(cur)
            length, changes = len(ids), []
            for run in runs:
                a, z = run[0], run[-1]
                if len(run) == 1:
                    if stub[a]:
                        continue
                    if a not in single:
                        single[a] = self._stub(ids[blocks[a].start:blocks[a].end])
                    new = single[a]
                else:
                    for i in run:
                        if i not in parts:
                            parts[i] = self._describe(ids[blocks[i].start:blocks[i].end])
                    gaps = sum(blocks[i + 1].start - blocks[i].end for i in run[:-1])
                    new = self._merged_stub([parts[i] for i in run], gaps)
                span = blocks[z].end - blocks[a].start
                if len(new) >= span:
                    continue
                length -= span - len(new)
                changes.append((a, z, new))
            return length, changes

        covered = {i for i, s in enumerate(stub) if s}
        length, changes = plan(covered)
        evicted = 0
        for i in range(len(blocks) - 1):  # oldest first; the newest block (just appended) is kept
            if length <= target:
                break
            if i in covered:
                continue
            trial_len, trial = plan(covered | {i})
            if trial_len >= length:
                continue
            covered.add(i)
            length, changes = trial_len, trial
            evicted += 1
        cut = 0
        if length > limit and blocks:  # still over: one block alone is too big, cut the largest kept part
            inside = {j for a, z, _ in changes for j in range(a, z + 1)} | covered
            free = [i for i in range(len(blocks)) if i not in inside]
            if free:
                i = max(free, key=lambda i: blocks[i].size)
                b = blocks[i]
                over = length - target
                keep = max(0, b.size - 2 - over - 16)
                new = self._stub(ids[b.start:b.end], cut_keep=keep)
                if len(new) < b.size:
                    changes.append((i, i, new))
                    length -= b.size - len(new)
                    cut = 1
        if not changes:
            return ids, None
        changes.sort()
        out: list[int] = []
        pos = 0
        for a, z, new in changes:
            self._record(ids, blocks[a:z + 1], new)
            out += ids[pos:blocks[a].start] + new
            pos = blocks[z].end
        out += ids[pos:]
        first = blocks[changes[0][0]].start
        while first < len(out) and out[first] == ids[first]:  # the stub starts like the block (<MARK_L>)
            first += 1
        merged = sum(1 for a, z, _ in changes if z > a)
        event = CompactionEvent(blocks_evicted=evicted, tokens_evicted=len(ids) - len(out), first_changed=first,
                                tokens_before=len(ids), tokens_after=len(out), blocks_cut=cut, stubs_merged=merged,
                                target=target)
        logger.info("flashback-agents: compacted context %d -> %d tokens (%d blocks evicted, %d runs merged, "
                    "%d cut); tail from token %d recomputed", len(ids), len(out), evicted, merged, cut, first)
        return out, event

    def _is_stub(self, block_ids: Sequence[int]) -> bool:
        return _key(block_ids) in self._stub_keys
