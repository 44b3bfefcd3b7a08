"""Training samples: token ids + labels, rendered by the inference layout (one code path).

Two sources:

- **Conversations** (agent transcripts): each message is rendered with
  ``Layout.render_message`` exactly as the integrations render it at inference, and the ids are
  concatenated. Loss is on assistant tokens only: the assistant header (the generation prompt the
  runtime appends itself) is not trained; the reply content and its end-of-turn token are.
- **Retrieval corpora** (the paper's RALM setup): the one RALM layout of :mod:`..ralm_layout`,
  ``text[:i] <MARK_L> chunk <MARK_R> text[i:i+stride]`` with the loss on the stride only; several
  points of one text may be packed into one sequence (tree attention, exact per branch).

Conversation truncation to ``max_length`` never cuts inside a marked block or a message: whole
documents and turns are dropped instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Iterable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from ..layout import Layout, Message
from ..models import LoadedModel
from ..ralm_layout import (RESTATE_TOKENS, RalmLayoutConfig, evidence_ids, placed_ids, query_text, retrieval_points,
                           step_ids)
from .transcripts import Conversation

IGNORE = -100


class Retriever(Protocol):
    """Anything with ``retrieve(query, k)`` returning objects that have a ``.text``."""

    def retrieve(self, query: str, k: int) -> Sequence[Any]: ...


@dataclass
class Sample:
    """One training sequence; ``labels[i]`` is ``input_ids[i]`` where trained, else -100."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    position_ids: list[int] | None = None  # packed samples: positions continue the text in each branch
    branch: list[int] | None = None        # packed samples: -1 for the clean text, b for branch b
    visible: list[int] | None = None       # packed samples: clean tokens a branch token may attend to

    @property
    def packed(self) -> bool:
        return self.branch is not None

    @property
    def span(self) -> int:
        """Positions the sample occupies (its length, or the largest position id + 1 when packed)."""
        return max(self.position_ids) + 1 if self.position_ids else len(self.input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)  # position 0 is never predicted


@dataclass
class SampleStats:
    """What building samples did: kept, dropped (nothing left to train) and truncated counts."""

    kept: int = 0
    dropped: int = 0
    truncated: int = 0
    retrievals: int = 0
    tokens: int = 0
    trained_tokens: int = 0


# ----------------------------------------------------------------------------- conversations

def _message_units(layout: Layout, msg: Message, tools: Sequence[dict] | None) -> tuple[list[int], list[int]]:
    """Ids and labels of one rendered message (labels only on assistant content + end of turn)."""
    ids = layout.render_message(msg, tools)
    if msg.role != "assistant":
        return ids, [IGNORE] * len(ids)
    head = len(layout.generation_prompt())
    suffix = layout.lm.encode(layout.fmt.suffix["assistant"])
    tail = len(suffix)
    eos = layout.lm.eos_token_ids
    for j, tok in enumerate(suffix):
        if tok in eos:
            tail = len(suffix) - (j + 1)  # train up to and including the end-of-turn token
            break
    end = len(ids) - tail
    labels = [IGNORE] * head + ids[head:end] + [IGNORE] * (len(ids) - end)
    return ids, labels


def conversation_sample(layout: Layout, conv: Conversation, max_length: int) -> tuple[Sample | None, bool]:
    """Render one conversation; returns (sample or None if nothing trainable fits, truncated?).

    Messages are kept from the start while they fit; a user message whose documents overflow is
    retried with fewer (whole) documents; the first message that still does not fit ends the sample.
    """
    msgs = layout.with_system(conv.messages, conv.tools)  # as Layout.render does
    ids: list[int] = []
    labels: list[int] = []
    truncated = False
    for i, msg in enumerate(msgs):
        m_ids, m_labels = _message_units(layout, msg, conv.tools if i == 0 else None)
        if len(ids) + len(m_ids) > max_length and msg.role == "user" and msg.documents:
            for keep in range(len(msg.documents) - 1, -1, -1):
                m_ids, m_labels = _message_units(layout, replace(msg, documents=msg.documents[:keep]), None)
                if len(ids) + len(m_ids) <= max_length:
                    break
            truncated = True
        if len(ids) + len(m_ids) > max_length:
            truncated = True
            break
        ids += m_ids
        labels += m_labels
    sample = Sample(ids, labels, conv.source)
    return (sample if sample.n_trained else None), truncated


def conversation_samples(lm: LoadedModel, conversations: Iterable[Conversation], max_length: int = 1024,
                         layout: Layout | None = None) -> tuple[list[Sample], SampleStats]:
    """Samples for many conversations, with counts of what was dropped or truncated."""
    layout = layout or Layout(lm)
    stats = SampleStats()
    out = []
    for conv in conversations:
        sample, truncated = conversation_sample(layout, conv, max_length)
        stats.truncated += int(truncated)
        if sample is None:
            stats.dropped += 1
            continue
        out.append(sample)
    _count(out, stats)
    return out, stats


def _count(samples: list[Sample], stats: SampleStats) -> None:
    stats.kept = len(samples)
    stats.tokens = sum(len(s) for s in samples)
    stats.trained_tokens = sum(s.n_trained for s in samples)


# ----------------------------------------------------------------------------- RALM

@dataclass
class RalmSampleConfig:
    """How RALM samples are cut from a text (the paper's schedule, plus CPU-friendly packing).

    Each text is cut into windows of at most ``window`` clean tokens. In a window, a retrieval point
    every ``stride`` tokens queries with the last ``query_tokens`` tokens; ``branches`` of those points
    (chosen with ``seed``) become training branches ``[evidence][next stride tokens]`` with the loss on
    those ``stride`` tokens only (:func:`..ralm_layout.step_ids`). ``branches=0`` makes one plain
    sample per point instead of one packed sample per window. With ``vary_top_k`` each branch takes
    1..``top_k`` chunks (the evaluation reports top-1 and top-2).
    """

    stride: int = 16
    query_tokens: int = 32
    top_k: int = 2
    window: int = 512
    branches: int = 6
    vary_top_k: bool = True
    seed: int = 0
    restate: int = RESTATE_TOKENS  # text tokens restated after the evidence (:func:`..ralm_layout.placed_ids`)

    def check(self) -> None:
        RalmLayoutConfig(self.stride, self.query_tokens, self.top_k, self.restate).check()
        if self.window <= self.stride:
            raise ValueError(f"window ({self.window}) must be larger than stride ({self.stride}).")
        if self.branches < 0:
            raise ValueError(f"branches must be >= 0, got {self.branches}.")


def ralm_point_sample(text_ids: Sequence[int], i: int, evidence: Sequence[int], stride: int,
                      source: str = "") -> Sample:
    """One plain sample at point ``i``: ``text[:i] evidence text[i:i+stride]``, loss on the stride."""
    ids = step_ids(text_ids, i, evidence, stride)
    n_cont = len(ids) - i - len(evidence)
    return Sample(ids, [IGNORE] * (i + len(evidence)) + ids[len(ids) - n_cont:], source)


def packed_ralm_sample(text_ids: Sequence[int], branches: Sequence[tuple[int, Sequence[int]]], stride: int,
                       source: str = "") -> Sample:
    """Several points of one text in one sequence (tree-attention packing).

    The clean text comes first (no loss); each branch ``[evidence][text[i:i+stride]]`` follows, with
    position ids that continue the text at ``i`` and attention to the clean tokens before ``i`` and to
    itself only, so each branch computes exactly what :func:`ralm_point_sample` would (tested).
    """
    if not branches:
        raise ValueError("packed_ralm_sample needs at least one branch.")
    last = max(i for i, _ in branches)
    ids = list(text_ids[:last])
    labels = [IGNORE] * len(ids)
    pos = list(range(len(ids)))
    branch = [-1] * len(ids)
    visible = [0] * len(ids)
    for b, (i, ev) in enumerate(branches):
        cont = list(text_ids[i:i + stride])
        seg = list(ev) + cont
        ids += seg
        labels += [IGNORE] * len(ev) + cont
        pos += list(range(i, i + len(seg)))
        branch += [b] * len(seg)
        visible += [i] * len(seg)
    return Sample(ids, labels, source, position_ids=pos, branch=branch, visible=visible)


def _hits(retriever: Retriever, query: str, k: int, exclude_source: str | None) -> list[str]:
    """Top ``k`` chunk texts, never from ``exclude_source`` (a text must not retrieve its own future)."""
    if not query:
        return []
    extra = 8 if exclude_source is not None else 0
    out = []
    for hit in retriever.retrieve(query, k + extra):
        meta = getattr(hit, "metadata", None) or {}
        if exclude_source is not None and meta.get("source") == exclude_source:
            continue
        out.append(hit if isinstance(hit, str) else getattr(hit, "text", str(hit)))
        if len(out) == k:
            break
    return out


def ralm_text_samples(layout: Layout, tokens: Sequence[int], retriever: Retriever, cfg: RalmSampleConfig, *,
                      source: str = "", exclude_source: str | None = None, rng: random.Random | None = None,
                      stats: SampleStats | None = None) -> list[Sample]:
    """RALM samples of one tokenized text in the one RALM layout (see :class:`RalmSampleConfig`)."""
    cfg.check()
    stats = stats if stats is not None else SampleStats()
    rng = rng or random.Random(cfg.seed)
    lm = layout.lm
    skip = set(lm.marker_ids)
    out: list[Sample] = []
    for w0 in range(0, len(tokens), cfg.window):
        text = list(tokens[w0:w0 + cfg.window])
        points = retrieval_points(len(text), cfg.stride)
        if not points:
            continue
        if cfg.branches and len(points) > cfg.branches:
            points = sorted(rng.sample(points, cfg.branches))
        chosen: list[tuple[int, list[int]]] = []
        for i in points:
            k = rng.randint(1, cfg.top_k) if cfg.vary_top_k else cfg.top_k
            docs = _hits(retriever, query_text(lm, text, i, cfg.query_tokens, skip), k, exclude_source)
            stats.retrievals += 1
            if not docs:
                stats.dropped += 1
                continue
            chosen.append((i, placed_ids(evidence_ids(layout, docs), text, i, cfg.restate)))
        if not chosen:
            continue
        if cfg.branches:
            out.append(packed_ralm_sample(text, chosen, cfg.stride, source))
        else:
            out += [ralm_point_sample(text, i, ev, cfg.stride, source) for i, ev in chosen]
    return out


def ralm_samples(lm: LoadedModel, texts: Iterable[str | tuple[str, str]], retriever: Retriever,
                 config: RalmSampleConfig | None = None, *, layout: Layout | None = None,
                 exclude_own_source: bool = True, progress: bool = False) -> tuple[list[Sample], SampleStats]:
    """RALM samples for many texts; a text given as ``(source, text)`` never retrieves chunks whose
    metadata ``source`` is its own (WikiText articles: their title; files: their path)."""
    cfg = config or RalmSampleConfig()
    cfg.check()
    layout = layout or Layout(lm)
    stats = SampleStats()
    rng = random.Random(cfg.seed)
    out: list[Sample] = []
    items = [t if isinstance(t, tuple) else (f"text[{i}]", t) for i, t in enumerate(texts)]
    it: Iterable = items
    if progress:
        it = tqdm(items, desc="RALM samples", unit="text")
    for source, text in it:
        out += ralm_text_samples(layout, lm.encode(text), retriever, cfg, source=source,
                                 exclude_source=source if exclude_own_source else None, rng=rng, stats=stats)
    dropped, retrievals = stats.dropped, stats.retrievals
    _count(out, stats)
    stats.dropped, stats.retrievals = dropped, retrievals
    return out, stats


# ----------------------------------------------------------------------------- batching

def length_batches(lengths: Sequence[int], batch_size: int, *, seed: int = 0, epoch: int = 0,
                   shuffle: bool = True, bucket_batches: int = 32) -> list[list[int]]:
    """Index batches grouped by length (little padding), deterministic for (seed, epoch).

    Shuffle, cut into buckets of ``bucket_batches`` batches, sort each bucket by length, split it
    into batches, then shuffle the batch order.
    """
    idx = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(idx)
    bucket = max(batch_size * bucket_batches, batch_size)
    batches = []
    for b in range(0, len(idx), bucket):
        part = sorted(idx[b:b + bucket], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def packed_attention_mask(samples: Sequence[Sample], width: int) -> Any:
    """A boolean ``[batch, 1, width, width]`` mask (True = may attend) for a batch with packed samples.

    Plain samples get the causal mask; packed ones: clean text causal, a branch token sees the clean
    tokens before its point and its own branch causally. Padding attends to itself only (no NaNs).
    """
    mask = torch.zeros((len(samples), 1, width, width), dtype=torch.bool)
    eye = torch.eye(width, dtype=torch.bool)
    for r, s in enumerate(samples):
        n = len(s)
        causal = torch.tril(torch.ones((n, n), dtype=torch.bool))
        if s.packed:
            br = torch.tensor(s.branch)
            vis = torch.tensor(s.visible)
            idx = torch.arange(n)
            clean_k = (br == -1)[None, :]
            q_clean = (br == -1)[:, None]
            sees_clean = clean_k & torch.where(q_clean, torch.ones((n, n), dtype=torch.bool), idx[None, :] < vis[:, None])
            same = (br[:, None] == br[None, :]) & (br[:, None] >= 0)
            causal = causal & (sees_clean | same)
        mask[r, 0, :n, :n] = causal
        mask[r, 0, n:, :] = eye[n:]
    return mask


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding); with packed samples
    in the batch also position_ids and a 4-D attention mask (:func:`packed_attention_mask`)."""
    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s)
        ids[r, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[r, :n] = torch.tensor(s.labels, dtype=torch.long)
        mask[r, :n] = 1
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(s.packed for s in samples):
        pos = torch.zeros((len(samples), width), dtype=torch.long)
        for r, s in enumerate(samples):
            p = s.position_ids if s.position_ids is not None else list(range(len(s)))
            pos[r, :len(s)] = torch.tensor(p, dtype=torch.long)
        batch["position_ids"] = pos
        batch["attention_mask"] = packed_attention_mask(samples, width)
    return batch


__all__ = ["IGNORE", "RalmSampleConfig", "Retriever", "Sample", "SampleStats", "collate", "conversation_sample",
           "conversation_samples", "length_batches", "packed_attention_mask", "packed_ralm_sample",
           "ralm_point_sample", "ralm_samples", "ralm_text_samples"]
