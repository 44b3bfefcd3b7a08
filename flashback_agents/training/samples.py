"""Training samples: token ids + labels, rendered by the inference layout (one code path).

Two sources:

- **Conversations** (agent transcripts): each message is rendered with
  ``Layout.render_message`` exactly as the integrations render it at inference, and the ids are
  concatenated. Loss is on assistant tokens only: the assistant header (the generation prompt the
  runtime appends itself) is not trained; the reply content and its end-of-turn token are.
- **Retrieval corpora** (the paper's RALM setup): for a text, every ``stride`` tokens the last
  ``query_tokens`` tokens query a retriever and the hits are appended as
  ``<MARK_L> chunk <MARK_R>``; loss is on the continuation text after the first retrieval.

Truncation to ``max_length`` never cuts inside a marked block or a message: whole documents,
chunks and turns are dropped instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Iterable, Protocol, Sequence

from ..layout import Layout, Message
from ..models import LoadedModel
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
    msgs = list(conv.messages)
    if not msgs or msgs[0].role != "system":
        msgs.insert(0, Message("system", ""))  # as Layout.render does
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

def ralm_sample_ids(layout: Layout, tokens: list[int], retriever: Retriever, *, stride: int = 16,
                    query_tokens: int = 32, top_k: int = 2, max_length: int = 1024,
                    source: str = "", stats: SampleStats | None = None) -> list[Sample]:
    """RALM samples from one tokenized text (paper, section 3): text every ``stride`` tokens interleaved
    with marked retrievals made from the last ``query_tokens`` text tokens; loss on the text after the
    first retrieval of each sample. A long text becomes several samples."""
    if stride < 1 or query_tokens < 1 or top_k < 1:
        raise ValueError("stride, query_tokens and top_k must be >= 1")
    stats = stats if stats is not None else SampleStats()
    lm = layout.lm
    samples = []
    pos = 0
    while pos < len(tokens):
        ids: list[int] = []
        labels: list[int] = []
        retrieved = False
        while pos < len(tokens) and len(ids) < max_length:
            chunk = tokens[pos:pos + stride][: max_length - len(ids)]
            ids += chunk
            labels += chunk if retrieved else [IGNORE] * len(chunk)
            pos += len(chunk)
            if pos >= len(tokens) or len(ids) >= max_length:
                break
            query = lm.decode(tokens[max(0, pos - query_tokens):pos], skip_special_tokens=True)
            hits = retriever.retrieve(query, top_k)
            stats.retrievals += 1
            full = False
            for hit in list(hits)[:top_k]:
                block = layout.marked(getattr(hit, "text", hit) if not isinstance(hit, str) else hit)
                if len(ids) + len(block) >= max_length:  # never cut a block; leave room for text after it
                    full = True
                    stats.truncated += 1
                    break
                ids += block
                labels += [IGNORE] * len(block)
                retrieved = True
            if full:
                break
        sample = Sample(ids, labels, source)
        if sample.n_trained:
            samples.append(sample)
        else:
            stats.dropped += 1
    return samples


def ralm_samples(lm: LoadedModel, texts: Iterable[str], retriever: Retriever, *, stride: int = 16,
                 query_tokens: int = 32, top_k: int = 2, max_length: int = 1024,
                 layout: Layout | None = None, progress: bool = False) -> tuple[list[Sample], SampleStats]:
    """RALM samples for many texts (see :func:`ralm_sample_ids`)."""
    layout = layout or Layout(lm)
    stats = SampleStats()
    out: list[Sample] = []
    texts = list(texts)
    it: Iterable = texts
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(texts, desc="RALM samples", unit="text")
    for i, text in enumerate(it):
        out += ralm_sample_ids(layout, lm.encode(text), retriever, stride=stride, query_tokens=query_tokens,
                               top_k=top_k, max_length=max_length, source=f"text[{i}]", stats=stats)
    dropped, truncated = stats.dropped, stats.truncated
    _count(out, stats)
    stats.dropped, stats.truncated = dropped, truncated
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


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s)
        ids[r, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[r, :n] = torch.tensor(s.labels, dtype=torch.long)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


__all__ = ["IGNORE", "Retriever", "Sample", "SampleStats", "collate", "conversation_sample",
           "conversation_samples", "length_batches", "ralm_sample_ids", "ralm_samples"]
