"""Context budget compaction: evict the oldest marked blocks (tool results, evidence) into short stubs.

Works on token ids, so it serves every framework the same way: a marked block is the span from a
``<MARK_L>`` to the next ``<MARK_R>``. The system block, tool schemas, user messages and assistant
turns are never marked, so they always stay. A :class:`Compactor` remembers which blocks it evicted
and applies the same replacement to the next request's ids (frameworks re-send the full history at
every step): after a compaction, the next step is again a pure append.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Sequence

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


@dataclass
class Compactor:
    """Keeps a token budget by replacing the oldest marked blocks with stubs (remembered per conversation).

    ``low_water`` is the fraction of the budget compaction shrinks to, so compaction is rare and its
    cost (recomputing the tail after the first evicted block) is amortised over many steps.
    """

    tokens: Tokens  # encode / decode and the marker ids (a LoadedModel, or a tokenizer-only model)
    budget: int
    low_water: float = 0.75
    _stubs: dict[str, list[int]] = field(default_factory=dict)
    _stub_keys: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not 0 < self.low_water <= 1:
            raise ValueError(f"low_water must be in (0, 1], got {self.low_water}")
        if self.budget < 16:
            raise ValueError(f"max_context_tokens must be at least 16, got {self.budget}")

    @property
    def marker_ids(self) -> tuple[int, int]:
        return self.tokens.marker_ids

    def _stub(self, block_ids: Sequence[int], cut_keep: int | None = None) -> list[int]:
        """Stub for a block: names the tool (when the block starts with 'name: ') and the tokens dropped."""
        body = self.tokens.decode(list(block_ids[1:-1]))
        head = body.split(":", 1)[0].strip() if ":" in body[:64] else ""
        name = head if head and " " not in head else "evidence"
        left, right = self.marker_ids
        if cut_keep is None:
            return [left] + self.tokens.encode(f"[evicted {name}: {len(block_ids)} tokens]") + [right]
        kept = list(block_ids[1 : 1 + cut_keep])
        note = self.tokens.encode(f" [... cut {len(block_ids) - cut_keep - 2} tokens of {name}]")
        return [left] + kept + note + [right]

    def copy(self) -> "Compactor":
        return Compactor(self.tokens, self.budget, self.low_water, dict(self._stubs), set(self._stub_keys))

    def apply(self, ids: Sequence[int]) -> list[int]:
        """Replace every block evicted earlier with its stub (so re-sent history matches the cache)."""
        if not self._stubs:
            return list(ids)
        out, pos = [], 0
        for b in find_blocks(ids, self.marker_ids):
            stub = self._stubs.get(_key(ids[b.start:b.end]))
            if stub is not None:
                out += ids[pos:b.start] + stub
                pos = b.end
        return out + list(ids[pos:])

    def compact(self, ids: Sequence[int], reserve: int = 0) -> tuple[list[int], CompactionEvent | None]:
        """Ids within budget (minus ``reserve``): evict oldest blocks down to the low-water mark."""
        ids = self.apply(ids)
        limit = self.budget - reserve
        if len(ids) <= limit:
            return ids, None
        target = int(self.budget * self.low_water) - reserve
        blocks = [b for b in find_blocks(ids, self.marker_ids) if not self._is_stub(ids[b.start:b.end])]
        replace: dict[int, list[int]] = {}
        length, evicted, cut = len(ids), 0, 0
        for b in blocks[:-1]:  # oldest first; the newest result (just appended) is kept
            if length <= target:
                break
            stub = self._stub(ids[b.start:b.end])
            if len(stub) >= b.size:
                continue
            replace[b.start] = stub
            length -= b.size - len(stub)
            evicted += 1
        if length > limit and blocks:  # still over: one block alone is too big, cut the largest kept part
            b = max((b for b in blocks if b.start not in replace), key=lambda b: b.size, default=None)
            if b is not None:
                over = length - target
                keep = max(0, b.size - 2 - over - 16)
                stub = self._stub(ids[b.start:b.end], cut_keep=keep)
                if len(stub) < b.size:
                    replace[b.start] = stub
                    length -= b.size - len(stub)
                    cut = 1
        if not replace:
            return ids, None
        out, pos = [], 0
        by_start = {b.start: b for b in blocks}
        for start in sorted(replace):
            b = by_start[start]
            self._stubs[_key(ids[b.start:b.end])] = replace[start]
            self._stub_keys.add(_key(replace[start]))
            out += ids[pos:b.start] + replace[start]
            pos = b.end
        out += ids[pos:]
        first = min(replace)
        while first < len(out) and out[first] == ids[first]:  # the stub starts like the block (<MARK_L>)
            first += 1
        event = CompactionEvent(blocks_evicted=evicted, tokens_evicted=len(ids) - len(out), first_changed=first,
                                tokens_before=len(ids), tokens_after=len(out), blocks_cut=cut)
        logger.info("flashback-agents: compacted context %d -> %d tokens (%d blocks evicted, %d cut); "
                    "tail from token %d recomputed", len(ids), len(out), evicted, cut, first)
        return out, event

    def _is_stub(self, block_ids: Sequence[int]) -> bool:
        return _key(block_ids) in self._stub_keys
