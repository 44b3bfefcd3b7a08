"""Constrained decoding with xgrammar: required tool calls and JSON-schema outputs always parse.

A small model asked to call a tool often answers in prose. When a call is *required*, the output is
constrained to ``<tool_call>{"name": <one of the tools>, "arguments": {...}}</tool_call>`` (then EOS),
so it is always a valid call. The grammar is built by xgrammar from JSON schemas (no hand-written
grammar) and applied through xgrammar's transformers-style logits processor, which plugs into
:func:`flashback_agents.generation.generate` as a processor.

Compiling a grammar costs ~0.3 s on the default model, so compiled grammars are kept in an explicit,
bounded LRU cache keyed by (model, canonical schema).

:func:`tool_call_processor` and :func:`json_schema_processor` build the processors. The schema caps live
in :mod:`flashback_agents.bounds`, the budget guard in :mod:`flashback_agents.closeguard`, and the
call-body schemas with the tool-call vocabulary in :mod:`flashback_agents.toolformat`; their names are
re-exported here. xgrammar is the optional dependency, imported where it is used.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from functools import partial
from typing import Any, Sequence

from .bounds import DEFAULT_MAX_STRING, STRINGS_ONLY, Bounds, bound_schema, bounds_for, cap_strings
from .closeguard import (CLOSE_MARGIN, CLOSE_SLACK, MAX_CLOSE_OVERSHOOT, MAX_CLOSE_STEPS, CloseGuard, CloseVocab,
                         close_guard)
from .models import LoadedModel
from .toolformat import (FORMATS, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ConstraintError, ToolCallFormat, call_schema,
                         tool_call_schema, tool_name)

__all__ = ["ConstraintError", "GrammarCache", "GRAMMARS", "tool_call_processor", "json_schema_processor",
           "lazy_calls_supported", "tool_name", "tool_call_schema", "Bounds", "STRINGS_ONLY", "DEFAULT_MAX_STRING",
           "bounds_for", "bound_schema", "cap_strings", "CloseGuard", "CloseVocab", "close_guard",
           "MAX_CLOSE_OVERSHOOT", "CLOSE_SLACK", "CLOSE_MARGIN", "MAX_CLOSE_STEPS"]


#: a capped string's characters as xgrammar writes them (any char but ``"``, ``\``, CR, LF: raw control
#: characters pass, which strict JSON refuses, and no escapes) and what they become: no raw control
#: characters, JSON escapes allowed (``\u`` without lone surrogates), as in xgrammar's uncapped strings
_XGR_STRING_CHAR = r' ::= (([^\"\\\r\n]))'
_JSON_STRING_CHAR = (r' ::= (([^\0-\x1f\"\\]) | ("\\" ([\"\\/bfnrt] | ("u" ('
                     r'[0-9A-Ca-c] [0-9A-Fa-f] [0-9A-Fa-f] [0-9A-Fa-f] | [Dd] [0-7] [0-9A-Fa-f] [0-9A-Fa-f] | '
                     r'[EeFf] [0-9A-Fa-f] [0-9A-Fa-f] [0-9A-Fa-f])))))')


def _json_strings(grammar: Any) -> Any:
    """``grammar`` whose capped strings accept what strict JSON accepts (see :data:`_JSON_STRING_CHAR`):
    the grammar and the call parser then agree. Unchanged where xgrammar prints another form."""
    import xgrammar as xgr

    text = str(grammar)
    if _XGR_STRING_CHAR not in text:
        return grammar
    try:
        return xgr.Grammar.from_ebnf(text.replace(_XGR_STRING_CHAR, _JSON_STRING_CHAR))
    except Exception:  # noqa: BLE001 - another xgrammar's printout: keep its grammar (the parser is lenient)
        return grammar


class GrammarCache:
    """Bounded LRU of compiled grammars, plus one xgrammar compiler per model."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._grammars: OrderedDict[tuple, Any] = OrderedDict()
        self._compilers: dict[int, tuple[LoadedModel, Any, Any]] = {}
        self._vocabs: dict[int, tuple[LoadedModel, CloseVocab]] = {}
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
                entry = (lm, xgr.GrammarCompiler(_without_specials(lm, info)), info)
                self._compilers[id(lm)] = entry
            return entry

    def compiler(self, lm: LoadedModel):
        return self._entry(lm)[1]

    def close_vocab(self, lm: LoadedModel) -> "CloseVocab":
        """The compiler's vocabulary (special tokens blank) as :class:`CloseGuard` reads it, once per model."""
        with self._lock:
            hit = self._vocabs.get(id(lm))
            if hit is not None and hit[0] is lm:
                return hit[1]
        vocab = CloseVocab(self.get(lm, "json", {"type": "boolean"}).tokenizer_info)  # any grammar: its vocabulary
        with self._lock:
            self._vocabs[id(lm)] = (lm, vocab)
        return vocab

    def tokenizer_info(self, lm: LoadedModel):
        """xgrammar's view of ``lm``'s vocabulary (``decoded_vocab``: each token's bytes, special tokens
        included; :mod:`flashback_agents.callmask` reads it to forbid call openings). The compiler's own
        view blanks special tokens (see :func:`_without_specials`)."""
        return self._entry(lm)[2]

    def get(self, lm: LoadedModel, kind: str, schema: dict, affixes: tuple[str, str] | None = None,
            bounds: Bounds | None = None):
        """Compiled grammar for ``kind`` ("tool_call" wraps the schema in the call markup, "json" not,
        "tool_call_auto" leaves text free until the call markup opens).

        ``affixes``: the text around a call's body in the model's own format
        (:meth:`flashback_agents.toolformat.ToolCallFormat.grammar_affixes`); default Hermes ``<tool_call>``.
        ``bounds``: the caps the schema gets (:func:`bound_schema`; default :class:`Bounds` ()).
        """
        import xgrammar as xgr

        bounds = bounds or Bounds()
        key = (id(lm), kind, json.dumps(schema, sort_keys=True, default=str), affixes, bounds)
        with self._lock:
            hit = self._grammars.get(key)
            if hit is not None:
                self._grammars.move_to_end(key)
                return hit
        compiler = self.compiler(lm)
        try:
            body = xgr.Grammar.from_json_schema(json.dumps(bound_schema(schema, bounds)), any_whitespace=False)
        except Exception as exc:  # xgrammar raises RuntimeError with the parse details
            raise ConstraintError(f"Cannot build a grammar from this JSON schema: {exc}") from exc
        body = _json_strings(body)
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
            vocab = self._vocabs.get(id(lm))
            if vocab is not None and vocab[0] is lm:
                del self._vocabs[id(lm)]
            if entry is not None and entry[0] is lm:
                del self._compilers[id(lm)]
                for key in [k for k in self._grammars if k[0] == id(lm)]:
                    del self._grammars[key]

    def clear(self) -> None:
        with self._lock:
            self._grammars.clear()
            self._compilers.clear()
            self._vocabs.clear()


GRAMMARS = GrammarCache()


def _without_specials(lm: LoadedModel, info: Any) -> Any:
    """``info`` with the text of special tokens blanked (xgrammar never allows an empty token but at a
    stop), so a grammar cannot write ``<|im_start|>`` into a JSON string: decoding skips special tokens,
    and what the grammar accepted must be what the parser reads. Stop tokens and the call markers of
    the known formats (Mistral's ``[TOOL_CALLS]``, Llama's ``<|python_tag|>``) keep their text."""
    import xgrammar as xgr

    tok = lm.tokenizer
    special = {int(i) for i in (getattr(tok, "all_special_ids", None) or [])}
    special |= {int(i) for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items()
                if getattr(t, "special", False)}
    markers = {m for f in FORMATS.values() for m in (f.open, f.close) if m} | {"<|python_tag|>"}
    vocab = list(info.decoded_vocab)
    blank = [i for i in special - set(info.stop_token_ids) if 0 <= i < len(vocab) and vocab[i]
             and vocab[i].decode("utf-8", "replace") not in markers]
    if not blank:
        return info
    for i in blank:
        vocab[i] = b""
    try:
        return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=info.vocab_size,
                                 stop_token_ids=list(info.stop_token_ids), add_prefix_space=info.add_prefix_space)
    except Exception:  # noqa: BLE001 - an xgrammar that builds no raw vocabulary: keep the model's view
        return info


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


def _processor(compiled, required: LoadedModel | None = None) -> Any:
    """xgrammar's HF logits processor for ``compiled``; ``required``: the model, when the reply must
    complete (a required call, a JSON answer): generation then runs a :class:`CloseGuard` for it."""
    from xgrammar.contrib.hf import LogitsProcessor

    proc = LogitsProcessor(compiled)  # single use: one per generation
    proc.close_on_budget = required is not None
    if required is not None:
        proc.close_vocab = GRAMMARS.close_vocab(required)
        #: the guard's constructor, passed in with the processor: ``generation.budget_guard`` calls it
        proc.close_guard = partial(CloseGuard, compiled, vocab=proc.close_vocab)
    return proc


def tool_call_processor(lm: LoadedModel, tools: Sequence[dict], choice: str | None = None, fmt: ToolCallFormat | None = None,
                        auto: bool = False, max_new_tokens: int | None = None) -> Any:
    """A fresh logits processor forcing exactly one valid call of one of ``tools``, written in
    ``fmt`` (a :class:`~flashback_agents.toolformat.ToolCallFormat`; default Hermes ``<tool_call>``).

    ``auto=True``: no call is forced, but any call the model opens must parse (``tool_choice="auto"``).
    ``max_new_tokens``: the reply's budget; the schema's caps follow it (:func:`bounds_for`). A forced
    call is closed before the budget runs out (:class:`CloseGuard`, run by generation).
    """
    bounds = bounds_for(max_new_tokens)
    if auto:
        body = tool_call_schema(tools) if fmt is None else call_schema(fmt, tool_call_schema(tools))
        affixes = None if fmt is None else fmt.grammar_affixes()
        return _processor(GRAMMARS.get(lm, "tool_call_auto", body, affixes=affixes, bounds=bounds))
    if fmt is None:
        return _processor(GRAMMARS.get(lm, "tool_call", tool_call_schema(tools, choice), bounds=bounds), lm)
    return _processor(GRAMMARS.get(lm, "tool_call", call_schema(fmt, tool_call_schema(tools, choice)),
                                   affixes=fmt.grammar_affixes(), bounds=bounds), lm)


def lazy_calls_supported(lm: LoadedModel, fmt: ToolCallFormat | None = None) -> bool:
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


def json_schema_processor(lm: LoadedModel, schema: dict, max_new_tokens: int | None = None) -> Any:
    """A fresh logits processor forcing output that validates against ``schema`` (closed before the
    budget runs out, as a required call is; ``max_new_tokens``: see :func:`tool_call_processor`)."""
    if not isinstance(schema, dict):
        raise ConstraintError(f"response_schema must be a JSON schema dict, got {type(schema).__name__}.")
    return _processor(GRAMMARS.get(lm, "json", schema, bounds=bounds_for(max_new_tokens)), lm)
