"""The tokens protocol: what rendering and compaction need from a model (no weights).

:class:`~flashback_agents.layout.Layout` and :class:`~flashback_agents.compaction.Compactor` use only
these: encode / decode text, the two marker ids, the end-of-sequence ids and the tokenizer (for its
chat template). A :class:`~flashback_agents.models.LoadedModel` satisfies it, and so does anything
else that has a tokenizer, such as the server backend's tokenizer-only model.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

__all__ = ["Tokens"]


class Tokens(Protocol):
    """Text <-> token ids for one tokenizer, with the FlashBack marker tokens."""

    #: the Hugging Face tokenizer (chat template, special tokens)
    tokenizer: Any
    #: ids of ``<MARK_L>`` and ``<MARK_R>``
    marker_ids: tuple[int, int]

    @property
    def eos_token_ids(self) -> set[int]:
        """Ids that end a reply."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        ...
