"""The server backend's error types: what went wrong with the model server (not the conversation)."""

from __future__ import annotations

from ...context import ContextOverflowError
from ...errors import FlashBackError

__all__ = ["ServerError", "ServerUnreachableError", "ServerModelError", "ServerContextError",
           "ServerCacheReportError", "ServerCacheReportWarning", "ServerStreamError", "ServerRequestError"]


class ServerError(RuntimeError, FlashBackError):
    """Something about the model server (not the conversation) went wrong; the message says what."""


class ServerUnreachableError(ServerError):
    """Nothing answers at the server address."""


class ServerModelError(ServerError):
    """The server runs a different model (tokenizer) than the one we render for, or none we can use."""


class ServerContextError(ServerError, ContextOverflowError):
    """The prompt does not fit the server's context window."""

    def __init__(self, needed: int, limit: int, url: str):
        self.needed, self.limit, self.over = needed, limit, needed - limit
        RuntimeError.__init__(
            self, f"Context overflow on the server {url}: the prompt needs {needed} tokens (plus at least one "
            f"to generate) but the server's context window is {limit} ({needed - limit} too many). Shorten "
            "the conversation, or restart the server with a larger context (llama.cpp: --ctx-size / "
            "`flashback-agents serve --ctx-size`; vLLM: --max-model-len).")


class ServerCacheReportError(ServerError):
    """The server did not report how many prompt tokens came from its cache (strict mode)."""


class ServerCacheReportWarning(UserWarning):
    """The server did not report cache figures; ``cache_read`` is 0 (not measured)."""


class ServerStreamError(ServerError):
    """The connection dropped (or the stream ended early) while a reply was streaming."""


class ServerRequestError(ServerError):
    """The server refused a request (HTTP error) for another reason; its message is included."""
