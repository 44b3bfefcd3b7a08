"""Forbid the opening of a tool call while decoding: ``tool_choice="none"`` and the repeat-call guard.

``tool_choice="none"`` has to mean that the model *cannot* call a tool, also while the tools stay in
the prompt (as OpenAI keeps them): not parsing calls is not enough, the reply would still carry
``<tool_call>{...}`` as text. :class:`NoCallProcessor` is a logits processor that masks every token
which would open a call in the model's own format (:class:`~flashback_agents.toolformat.ToolCallFormat`):

- a format with an opening tag (Hermes ``<tool_call>``, Mistral ``[TOOL_CALLS]``): the tag as one token
  (special or not), every token whose text contains the tag, and, while the text generated so far
  ends with a proper prefix of the tag (``"<tool_"``), every token that would complete it. The text
  matched is the tag without its closing bracket (``<tool_call``): a model set on calling otherwise
  writes near-tags (``<tool_call name="add">``) that are no call but no answer either; and a tag opening
  with ``<`` also forbids a reply that *starts* with ``<`` (the model invents other tags, ``<map_call>``:
  a reply under these masks opens with text, not markup);
- Llama 3 (no tag: a call is a bare JSON object opening the reply, or follows ``<|python_tag|>``):
  ``<|python_tag|>``, and, while the reply has no non-space character yet, every token whose first
  non-space character is ``{``.

Token texts are xgrammar's decoded vocabulary (each token's bytes, exact for byte-level and
SentencePiece vocabularies; special tokens add nothing to the decoded text). The masks are computed
once per (model, format) and kept in a bounded cache (:data:`CALL_MASKS`). The processor is not a
grammar, so a masked decode runs one token per forward (no speculation, see
:func:`flashback_agents.speculation.plan`).

:func:`strip_call_markup` is the last resort where no mask applies (a server that cannot bias the
tag's tokens): a stray opening tag never reaches a reply that may not call tools.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Iterable, Sequence

import torch

from .constrained import GRAMMARS
from .toolformat import HERMES, PYTHON_TAG, ToolCallFormat, holdback

__all__ = ["CallMask", "NoCallProcessor", "CallMaskCache", "CALL_MASKS", "call_tags", "no_call_processor",
           "single_token_tag_ids", "strip_call_markup", "stream_visible"]


def call_tags(fmt: ToolCallFormat | None) -> tuple[tuple[str, ...], bool]:
    """(texts that open a call, whether a reply opening with ``{`` is a call) for ``fmt`` (None: Hermes)."""
    fmt = fmt or HERMES
    if fmt.open:
        return (fmt.open,), False
    return (PYTHON_TAG,), True  # Llama 3: bare JSON opens the reply, or follows <|python_tag|>


def _masked_text(tag: str) -> str:
    """What the mask forbids for ``tag``: the tag's stem, without its closing bracket and from its first
    ``_`` on (``<tool`` for ``<tool_call>``, ``[TOOL`` for ``[TOOL_CALLS]``), so that a model set on calling
    cannot write a near-tag either (``<tool_call >``, ``<tool_apply_call>``, ``<tool_name>``: seen from
    SmolLM2-135M under ``tool_choice="none"``)."""
    short = tag[:-1] if len(tag) > 2 and tag[-1] in ">]" else tag
    stem = short.split("_", 1)[0]
    return stem if "_" in short and len(stem) >= 4 else short


def _masked_texts(tag: str) -> list[str]:
    """:func:`_masked_text` and the spellings a small model drifts to when the tag itself is masked
    (``< Tool_call>``, ``<TOOL_call>``: seen from SmolLM2-135M on the loop guard's second decode)."""
    stem = _masked_text(tag)
    if len(stem) < 2 or not stem[0] in "<[" or not stem[1:].isalpha():
        return [stem]
    words = {stem[1:], stem[1:].lower(), stem[1:].capitalize(), stem[1:].upper()}
    return sorted({stem[0] + sp + w for w in words for sp in ("", " ")})


class CallMask:
    """The token sets that open a call, precomputed from a decoded vocabulary (pure: no model).

    ``vocab[i]``: the bytes of token ``i``; ``special``: ids decoding skips (they add no text, but one
    whose own text contains a tag is still forbidden); ``tag_ids``: ids that *are* a tag (forbidden).
    """

    def __init__(self, vocab: Sequence[bytes], special: Iterable[int] = (), tags: Sequence[str] = (),
                 lead_brace: bool = False, tag_ids: Iterable[int] = ()):
        special = set(special)
        raw = [bytes(b) for b in vocab]
        #: the bytes each token adds to the decoded reply (b"" for special tokens)
        self.text: list[bytes] = [b"" if i in special else b for i, b in enumerate(raw)]
        self.tags = tuple(t.encode("utf-8") for t in tags if t)
        always = {int(t) for t in tag_ids}
        always |= {i for i, b in enumerate(raw) if any(t in b for t in self.tags)}
        self.always = _ids(always)
        by_first: dict[int, list[int]] = {}
        for i, b in enumerate(self.text):
            if b:
                by_first.setdefault(b[0], []).append(i)
        completes: dict[bytes, set[int]] = {}
        for tag in self.tags:
            for k in range(1, len(tag)):  # the reply ends with tag[:k]: a token starting with tag[k:] completes it
                rest = tag[k:]
                ids = {i for i in by_first.get(rest[0], ()) if self.text[i].startswith(rest)}
                if ids:
                    completes.setdefault(tag[:k], set()).update(ids)
        #: proper prefix of a tag -> ids that complete the tag after it
        self.completes: dict[bytes, torch.Tensor] = {p: _ids(s) for p, s in completes.items()}
        #: how many trailing bytes of the reply matter (the longest proper prefix)
        self.keep = max((len(t) - 1 for t in self.tags), default=0)
        #: ids whose first non-space byte is ``{`` (forbidden while the reply is blank), or None
        self.brace = _ids(i for i, b in enumerate(self.text) if b.lstrip().startswith(b"{")) if lead_brace else None
        #: ids whose first non-space byte is ``<`` where a tag opens with it (forbidden while the reply is
        #: blank): a small model denied its tag invents others (``<map_call>``, ``<not_tool_call>``,
        #: ``<document_call>``: seen from SmolLM2-135M on the loop guard's second decode), always at the start
        angle = any(t.startswith(b"<") for t in self.tags)
        self.lead = _ids(i for i, b in enumerate(self.text) if b.lstrip().startswith(b"<")) if angle else None

    def banned(self, tail: bytes, blank: bool) -> list[torch.Tensor]:
        """Id sets to forbid after a reply ending with ``tail`` (``blank``: nothing but spaces so far)."""
        out = [self.always] if self.always.numel() else []
        for prefix, ids in self.completes.items():
            if tail.endswith(prefix):
                out.append(ids)
        if blank:
            out += [ids for ids in (self.brace, self.lead) if ids is not None and ids.numel()]
        return out


def _ids(ids: Iterable[int]) -> torch.Tensor:
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


class NoCallProcessor:
    """A logits processor that never lets a call open (single use: one per generation).

    Called as ``processor(input_ids, scores)`` once per step, as in :func:`flashback_agents.generation.generate`;
    the token sampled after a call is the last of the next call's ``input_ids``.
    """

    def __init__(self, mask: CallMask):
        self.mask = mask
        self._tail = b""
        self._blank = True
        self._started = False

    def feed(self, token: int) -> None:
        """Account for a generated token (its text joins the reply)."""
        text = self.mask.text[token] if 0 <= token < len(self.mask.text) else b""
        if self.mask.keep:
            self._tail = (self._tail + text)[-self.mask.keep:]
        if self._blank and text.strip():
            self._blank = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._started:
            self.feed(int(input_ids[0, -1]))
        self._started = True
        banned = self.mask.banned(self._tail, self._blank)
        if not banned:
            return scores
        scores = scores.clone()  # never write into the context's cached logits
        width = scores.shape[-1]
        for ids in banned:
            ids = ids[ids < width].to(scores.device)
            scores[..., ids] = float("-inf")
        return scores


def _special_ids(tokenizer: Any) -> set[int]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(tok, "special", False):
            special.add(int(tid))
    return special


def single_token_tag_ids(tokenizer: Any, fmt: ToolCallFormat | None) -> list[int]:
    """Ids of the tokens that are a whole opening tag of ``fmt`` (Mistral's ``[TOOL_CALLS]``, Qwen's
    added ``<tool_call>``, Llama's ``<|python_tag|>``); a tag spelled in several tokens has none."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return sorted({int(vocab[t]) for t in call_tags(fmt)[0] if t in vocab})


class CallMaskCache:
    """Bounded LRU of :class:`CallMask` per (model, format): the vocabulary is scanned once per model."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._masks: OrderedDict[tuple, tuple[Any, CallMask]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, lm: Any, fmt: ToolCallFormat | None = None) -> CallMask:
        fmt = fmt or HERMES
        key = (id(lm), fmt.name, fmt.open)
        with self._lock:
            hit = self._masks.get(key)
            if hit is not None and hit[0] is lm:
                self._masks.move_to_end(key)
                return hit[1]
        tags, lead_brace = call_tags(fmt)
        vocab = GRAMMARS.tokenizer_info(lm).decoded_vocab
        mask = CallMask(vocab, _special_ids(lm.tokenizer), [m for t in tags for m in _masked_texts(t)], lead_brace,
                        single_token_tag_ids(lm.tokenizer, fmt))
        with self._lock:
            self._masks[key] = (lm, mask)
            while len(self._masks) > self.max_entries:
                self._masks.popitem(last=False)
        return mask

    def forget(self, lm: Any) -> None:
        """Drop ``lm``'s masks (its engine is gone)."""
        with self._lock:
            for key in [k for k, v in self._masks.items() if v[0] is lm or k[0] == id(lm)]:
                del self._masks[key]

    def clear(self) -> None:
        with self._lock:
            self._masks.clear()

    def __len__(self) -> int:
        return len(self._masks)


CALL_MASKS = CallMaskCache()


def no_call_processor(lm: Any, fmt: ToolCallFormat | None = None) -> NoCallProcessor:
    """A fresh processor forbidding ``fmt``'s call opening for ``lm`` (a LoadedModel with weights)."""
    return NoCallProcessor(CALL_MASKS.get(lm, fmt))


def _marks(fmt: ToolCallFormat | None) -> list[str]:
    fmt = fmt or HERMES
    return [m for m in (fmt.open, fmt.close, PYTHON_TAG) if m]


def strip_call_markup(text: str, fmt: ToolCallFormat | None = None) -> str:
    """``text`` without the format's call tags (open, close, ``<|python_tag|>``): the last resort for a
    reply that may not call tools, where the mask could not apply."""
    marks = _marks(fmt)
    prev = None
    while prev != text:  # removing one tag may join the halves of another
        prev = text
        for m in marks:
            text = text.replace(m, "")
    return text


def stream_visible(raw: str, fmt: ToolCallFormat | None = None) -> tuple[str, int]:
    """While streaming a reply that may not call tools: (its text with tags stripped, how many chars are
    safe to emit now; a trailing partial tag is held back)."""
    visible = strip_call_markup(raw, fmt)
    return visible, len(visible) - holdback(visible, _marks(fmt))
