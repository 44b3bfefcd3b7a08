"""Constrained decoding with xgrammar: required tool calls and JSON-schema outputs always parse.

A small model asked to call a tool often answers in prose. When a call is *required*, the output is
constrained to ``<tool_call>{"name": <one of the tools>, "arguments": {...}}</tool_call>`` (then EOS),
so it is always a valid call. The grammar is built by xgrammar from JSON schemas (no hand-written
grammar) and applied through xgrammar's transformers-style logits processor, which plugs into
:func:`flashback_agents.generation.generate` as a processor.

Compiling a grammar costs ~0.3 s on the default model, so compiled grammars are kept in an explicit,
bounded LRU cache keyed by (model, canonical schema).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Sequence

from .errors import FlashBackError
from .layout import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from .models import LoadedModel


class ConstraintError(ValueError, FlashBackError):
    """A schema or tool choice that cannot be turned into a grammar."""


def tool_name(tool: dict) -> str:
    """Name of an OpenAI-style tool dict (``{"type": "function", "function": {...}}`` or bare)."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else {}
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise ConstraintError(f"Tool {tool!r} has no name; tools must be OpenAI-style function dicts.")
    return name


def _parameters(tool: dict) -> dict:
    fn = tool.get("function", tool)
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise ConstraintError(f"Tool {tool_name(tool)!r} has parameters that are not a JSON schema object.")
    return params


def tool_call_schema(tools: Sequence[dict], choice: str | None = None) -> dict:
    """JSON schema of one call's body: ``{"name": const, "arguments": params}`` (anyOf over tools).

    ``choice`` narrows to one tool by name; ``None``/"any"/"required" allows every tool.
    """
    if not tools:
        raise ConstraintError("A tool call was required but no tools were given.")
    names = [tool_name(t) for t in tools]
    chosen = list(tools)
    if choice not in (None, "any", "required"):
        if choice not in names:
            raise ConstraintError(f"tool_choice {choice!r} is not one of the bound tools {names}.")
        chosen = [t for t in tools if tool_name(t) == choice]
    bodies = [{"type": "object",
               "properties": {"name": {"const": tool_name(t)}, "arguments": _parameters(t)},
               "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    return bodies[0] if len(bodies) == 1 else {"anyOf": bodies}


#: Longest string a constrained reply may produce where the schema sets no ``maxLength``. Small models
#: tend to loop inside a JSON string ("The cat was a cat. The cat was ..."); a cap guarantees that a
#: required call or a structured answer always closes within a bounded number of tokens.
DEFAULT_MAX_STRING = 160


def cap_strings(schema: Any, max_length: int | None = DEFAULT_MAX_STRING) -> Any:
    """Copy of ``schema`` where every free-form string gets ``maxLength`` (if it has none)."""
    if max_length is None:
        return schema
    if isinstance(schema, list):
        return [cap_strings(s, max_length) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (cap_strings(v, max_length) if k not in ("const", "enum", "default", "examples") else v)
           for k, v in schema.items()}
    types = out.get("type")
    is_string = types == "string" or (isinstance(types, list) and "string" in types)
    if is_string and not any(k in out for k in ("maxLength", "enum", "const", "pattern", "format")):
        out["maxLength"] = max_length
    return out


class GrammarCache:
    """Bounded LRU of compiled grammars, plus one xgrammar compiler per model."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._grammars: OrderedDict[tuple, Any] = OrderedDict()
        self._compilers: dict[int, tuple[LoadedModel, Any, Any]] = {}
        self._lock = threading.Lock()

    def _entry(self, lm: LoadedModel) -> tuple[LoadedModel, Any, Any]:
        """(lm, xgrammar compiler, xgrammar TokenizerInfo) of ``lm``, built once per model."""
        import xgrammar as xgr

        with self._lock:
            entry = self._compilers.get(id(lm))
            if entry is None or entry[0] is not lm:
                vocab = lm.model.get_input_embeddings().weight.shape[0]  # includes the 2 marker rows
                out = lm.model.get_output_embeddings()
                if out is not None:
                    vocab = max(vocab, out.weight.shape[0])
                info = xgr.TokenizerInfo.from_huggingface(lm.tokenizer, vocab_size=vocab,
                                                          stop_token_ids=sorted(lm.eos_token_ids))
                entry = (lm, xgr.GrammarCompiler(info), info)
                self._compilers[id(lm)] = entry
            return entry

    def compiler(self, lm: LoadedModel):
        return self._entry(lm)[1]

    def tokenizer_info(self, lm: LoadedModel):
        """xgrammar's view of ``lm``'s vocabulary (``decoded_vocab``: each token's bytes), shared with
        the compiler (:mod:`flashback_agents.callmask` reads it to forbid call openings)."""
        return self._entry(lm)[2]

    def get(self, lm: LoadedModel, kind: str, schema: dict, affixes: tuple[str, str] | None = None):
        """Compiled grammar for ``kind`` ("tool_call" wraps the schema in the call markup, "json" not,
        "tool_call_auto" leaves text free until the call markup opens).

        ``affixes``: the text around a call's body in the model's own format
        (:meth:`flashback_agents.toolformat.ToolCallFormat.grammar_affixes`); default Hermes ``<tool_call>``.
        """
        import xgrammar as xgr

        key = (id(lm), kind, json.dumps(schema, sort_keys=True, default=str), affixes)
        with self._lock:
            hit = self._grammars.get(key)
            if hit is not None:
                self._grammars.move_to_end(key)
                return hit
        compiler = self.compiler(lm)
        try:
            body = xgr.Grammar.from_json_schema(json.dumps(cap_strings(schema)), any_whitespace=False)
        except Exception as exc:  # xgrammar raises RuntimeError with the parse details
            raise ConstraintError(f"Cannot build a grammar from this JSON schema: {exc}") from exc
        if kind == "tool_call_auto":
            grammar = _lazy_call_grammar(body, affixes)
        elif kind == "tool_call":
            before, after = affixes or (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
            parts = ([xgr.Grammar.from_ebnf(f"root ::= {json.dumps(before, ensure_ascii=False)}")] if before else []) \
                + [body] + ([xgr.Grammar.from_ebnf(f"root ::= {json.dumps(after, ensure_ascii=False)}")] if after else [])
            grammar = xgr.Grammar.concat(*parts) if len(parts) > 1 else body
        else:
            grammar = body
        compiled = compiler.compile_grammar(grammar)
        with self._lock:
            self._grammars[key] = compiled
            while len(self._grammars) > self.max_entries:
                self._grammars.popitem(last=False)
        return compiled

    def forget(self, lm: LoadedModel) -> None:
        """Drop ``lm``'s compiler and grammars (its engine is gone; the model may be freed)."""
        with self._lock:
            entry = self._compilers.get(id(lm))
            if entry is not None and entry[0] is lm:
                del self._compilers[id(lm)]
                for key in [k for k in self._grammars if k[0] == id(lm)]:
                    del self._grammars[key]

    def clear(self) -> None:
        with self._lock:
            self._grammars.clear()
            self._compilers.clear()


GRAMMARS = GrammarCache()


def _lazy_call_grammar(body: Any, affixes: tuple[str, str] | None) -> Any:
    """Free text, but once the model opens a call (the format's opening tag) the call must parse.

    xgrammar's triggered structural tag: text is unconstrained until the trigger, then the call body
    (``body``, the compact-JSON grammar a required call uses, passed as EBNF: the tag's own
    ``json_schema`` content would allow free whitespace) follows. This is how a call under
    ``tool_choice="auto"`` is kept valid (a declared tool name, arguments of the declared types)
    without forcing the model to call anything.
    """
    import xgrammar as xgr

    before, after = affixes or (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
    if not before.strip():
        raise ConstraintError("A call format without an opening tag cannot be constrained lazily.")
    tag = {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": [before],
        "tags": [{"begin": before, "content": {"type": "grammar", "grammar": str(body)}, "end": after}],
        "at_least_one": False, "stop_after_first": False}}
    try:
        return xgr.Grammar.from_structural_tag(json.dumps(tag))
    except Exception as exc:
        raise ConstraintError(f"Cannot build a grammar from this JSON schema: {exc}") from exc


def _processor(compiled) -> Any:
    from xgrammar.contrib.hf import LogitsProcessor

    return LogitsProcessor(compiled)  # single use: one per generation


def tool_call_processor(lm: LoadedModel, tools: Sequence[dict], choice: str | None = None, fmt: Any = None,
                        auto: bool = False) -> Any:
    """A fresh logits processor forcing exactly one valid call of one of ``tools``, written in
    ``fmt`` (a :class:`~flashback_agents.toolformat.ToolCallFormat`; default Hermes ``<tool_call>``).

    ``auto=True``: no call is forced, but any call the model opens must parse (``tool_choice="auto"``).
    """
    if auto:
        from .toolformat import call_schema

        body = tool_call_schema(tools) if fmt is None else call_schema(fmt, tool_call_schema(tools))
        affixes = None if fmt is None else fmt.grammar_affixes()
        return _processor(GRAMMARS.get(lm, "tool_call_auto", body, affixes=affixes))
    if fmt is None:
        return _processor(GRAMMARS.get(lm, "tool_call", tool_call_schema(tools, choice)))
    from .toolformat import call_schema

    return _processor(GRAMMARS.get(lm, "tool_call", call_schema(fmt, tool_call_schema(tools, choice)),
                                   affixes=fmt.grammar_affixes()))


def lazy_calls_supported(lm: LoadedModel, fmt: Any = None) -> bool:
    """Whether calls under ``tool_choice="auto"`` can be constrained lazily for this model/format.

    The trigger is the call's opening text; a format that opens with a *special* token (Mistral's
    ``[TOOL_CALLS]``) cannot be matched as text by the grammar, which would mask that token and forbid
    calls altogether, so those stay unconstrained.
    """
    before = fmt.grammar_affixes()[0] if fmt is not None else TOOL_CALL_OPEN
    if not before.strip():
        return False
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    return not any(t in special for t in lm.encode(before))


def json_schema_processor(lm: LoadedModel, schema: dict) -> Any:
    """A fresh logits processor forcing output that validates against ``schema``."""
    if not isinstance(schema, dict):
        raise ConstraintError(f"response_schema must be a JSON schema dict, got {type(schema).__name__}.")
    return _processor(GRAMMARS.get(lm, "json", schema))
