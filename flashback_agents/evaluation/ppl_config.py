"""Perplexity evaluation, its settings: what is evaluated and how (:class:`PplConfig`), the quick
adapter's training settings (:class:`AdapterTrainConfig`), and the evaluation's user error."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FlashBackError
from ..ralm_layout import RESTATE_TOKENS, check_restate


class PerplexityError(ValueError, FlashBackError):
    """A user mistake in the perplexity evaluation (bad data spec, missing files, too-long windows)."""


@dataclass
class PplConfig:
    """What is evaluated and how (paper defaults: stride 16, query 32 tokens, top-1 and top-2)."""

    tokens: int = 4096          # continuation tokens evaluated (per setting)
    window: int = 1024          # max tokens of text per block ("text so far" is at most this)
    stride: int = 16            # retrieve every N tokens
    query_tokens: int = 32      # query with the last N tokens of the text so far
    top_ks: tuple[int, ...] = (1, 2)
    chunk_tokens: int = 128     # retrieval chunk size (model tokens)
    chunk_overlap: int = 16
    restate: int = RESTATE_TOKENS  # text tokens restated after appended evidence (ralm_layout; 0: the paper's)

    def check(self) -> None:
        for name in ("tokens", "stride", "query_tokens", "chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PerplexityError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.window < 2 * self.stride:
            raise PerplexityError(f"window ({self.window}) must be at least 2 x stride ({2 * self.stride}).")
        if not self.top_ks or any((not isinstance(k, int)) or k < 1 for k in self.top_ks):
            raise PerplexityError(f"top-k values must be integers >= 1, got {self.top_ks!r}.")
        try:
            check_restate(self.restate)
        except ValueError as exc:
            raise PerplexityError(str(exc)) from exc


@dataclass
class AdapterTrainConfig:
    """The quick adapter trained when none is given (on WikiText-2 *valid*, never on test text)."""

    steps: int = 100
    batch_size: int = 2
    max_length: int = 512
    learning_rate: float = 5e-4
    top_k: int = 2
    seed: int = 0
