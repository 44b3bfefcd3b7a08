"""OpenAI-compatible server backend: the append layout on llama.cpp, vLLM or SGLang prefix caches.

The engine renders conversations locally (tokenizer only, the same ``Layout`` code as in-process) and
sends the token ids as a *completion* prompt, so the server sees exactly the append layout: every step
extends the previous prompt, and the server's prefix cache computes only the new tail. The server's
own cache figures come back as ``cache_read``:

- llama.cpp (``llama-server``, or ``flashback-agents serve`` through xllamacpp): native ``/completion``
  with ``cache_prompt: true`` and ``return_tokens: true``; ``timings.cache_n`` / ``timings.prompt_n``.
- vLLM, SGLang, others: ``/v1/completions`` with the ids as ``prompt``;
  ``usage.prompt_tokens_details.cached_tokens`` (vLLM needs ``--enable-prompt-tokens-details``,
  SGLang ``--enable-cache-report``).

Markers: a stock model (e.g. the default GGUF) has no ``<MARK_L>``/``<MARK_R>`` tokens, and ids past
the server's vocabulary would be rejected. At connect time the backend asks the server to tokenize the
two markers: if each is one token with our id (an exported model, ``flashback-agents export --gguf``),
the ids are sent as they are; otherwise every marker id is replaced by the server's tokenization of the
marker *text* ("<MARK_L>" as ordinary tokens). Rendering is deterministic either way, so prefixes stay
prefixes.

Required tool calls are constrained on the server (its grammar support): the prompt is extended with
``<tool_call>``, the output is constrained by the call's JSON schema (llama.cpp ``json_schema``, OpenAI
``response_format``), and ``</tool_call>`` is appended to the reply; so the reply ids equal what the
server cached and the next step is still a pure extension.

This package's modules: ``errors`` (the error types), ``tokenizer`` (the served model's tokenizer,
no weights), ``protocol`` (payloads, error mapping and SSE parsing for both dialects), ``backend``
(``ServerBackend``, ``ServerRun``). The names below are re-exported so imports from
``flashback_agents.backends.server`` keep working.
"""

from __future__ import annotations

from ...models import is_server_spec
from .backend import ServerBackend, ServerRun
from .errors import (ServerCacheReportError, ServerCacheReportWarning, ServerContextError, ServerError,
                     ServerModelError, ServerRequestError, ServerStreamError, ServerUnreachableError)
from .protocol import ServerInfo
from .tokenizer import ServerTokenizerModel, load_server_tokenizer

__all__ = ["ServerError", "ServerUnreachableError", "ServerModelError", "ServerContextError",
           "ServerCacheReportError", "ServerCacheReportWarning", "ServerStreamError", "ServerRequestError",
           "ServerInfo", "ServerBackend", "ServerRun", "ServerTokenizerModel", "is_server_spec",
           "load_server_tokenizer"]
