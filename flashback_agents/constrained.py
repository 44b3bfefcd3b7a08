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
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class Bounds:
    """The caps :func:`bound_schema` gives a constrained reply's schema where it sets none (None: left free).

    A model that loops (counting ``1, 2, 3, ...`` in an array, ``1111...`` in a number, a sentence in a
    string) must hit a cap that lets it close the call within ``max_new_tokens``; the budget guard
    (:class:`CloseGuard`) closes what the caps leave open (patterns, formats, recursive schemas).
    Every cap only narrows the schema: what the capped grammar writes still validates against the original.
    """

    max_string: int | None = DEFAULT_MAX_STRING  # maxLength of strings (raised to minLength, never above a maxLength)
    max_items: int | None = 16                   # maxItems of arrays (raised to minItems)
    max_digits: int | None = 15                  # integers and numbers: |x| < 10**max_digits (numbers: 6 decimals)
    max_properties: int | None = 8               # properties of a free object (raised to minProperties)
    max_key: int = 64                            # length of a free object's property names
    any_depth: int = 2                           # nesting of a free value (``{}``): arrays/objects this deep
    bound_any: bool = True                       # free values (``{}``, ``true``) become bounded kinds of values


#: where only strings are capped (what :func:`cap_strings` did; the server backend sends it)
STRINGS_ONLY = Bounds(max_items=None, max_digits=None, max_properties=None, bound_any=False)


def bounds_for(max_new_tokens: int | None) -> Bounds:
    """Caps for a reply of at most ``max_new_tokens`` tokens, in three tiers (few distinct grammars to
    compile): up to 512 tokens the defaults (a 160-char string is ~40-50 tokens, 16 items of up to
    15 digits leave room to close a 256-token call), relaxed when the budget allows."""
    if max_new_tokens is None or max_new_tokens <= 512:
        return Bounds()
    if max_new_tokens <= 2048:
        return Bounds(max_string=512, max_items=32, max_properties=16)
    return Bounds(max_string=2048, max_items=64, max_properties=32)


# JSON-schema keywords whose value is a schema, a list of schemas, or a map of name -> schema
# (not ``not``/``if``: narrowing those would widen the schema)
_SUB_SCHEMA = ("items", "additionalItems", "contains", "then", "else", "propertyNames", "unevaluatedItems",
               "unevaluatedProperties")
_SUB_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUB_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# keywords that make a schema something other than "any JSON value"
_CONSTRAINING = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "not", "properties",
                 "patternProperties", "additionalProperties", "items", "prefixItems", "pattern", "format",
                 "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
                 "minItems", "maxItems", "required", "if", "contains", "propertyNames"}


def _types(schema: dict) -> set[str]:
    t = schema.get("type")
    return {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value: Any) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _any_value(b: Bounds, depth: int) -> dict:
    """Any JSON value, bounded: capped strings and numbers, booleans, null; arrays and objects of such
    values while ``depth`` lasts."""
    kinds: list[dict] = [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
    if depth > 0:
        inner = _any_value(b, depth - 1)
        kinds += [{"type": "array", "items": inner},
                  {"type": "object", "additionalProperties": inner}]
    return {"anyOf": [_bound(k, b, depth) for k in kinds]}


def _bound(schema: Any, b: Bounds, depth: int) -> Any:
    if schema is True and b.bound_any:
        return _any_value(b, depth)
    if not isinstance(schema, dict):
        return schema
    out: dict = {}
    for k, v in schema.items():
        if k in _SUB_MAP and isinstance(v, dict):
            out[k] = {name: _bound(sub, b, depth) for name, sub in v.items()}
        elif k in _SUB_LIST and isinstance(v, list):
            out[k] = [_bound(sub, b, depth) for sub in v]
        elif k in _SUB_SCHEMA or k == "additionalProperties":
            out[k] = v if v is True else _bound(v, b, depth)  # ``additionalProperties: true``: see objects
        else:
            out[k] = v  # const, enum, default, examples, description, ...: data, never rewritten
    if b.bound_any and not any(k in out for k in _CONSTRAINING):  # {} or {"description": ...}: any JSON value
        return {**out, **_any_value(b, b.any_depth)}
    types = _types(out)
    free = "enum" in out or "const" in out
    if "string" in types and not free and b.max_string is not None \
            and not any(k in out for k in ("pattern", "format")):  # xgrammar ignores lengths with these
        lo = _int(out.get("minLength")) or 0
        cap = max(b.max_string, lo)
        hi = _int(out.get("maxLength"))
        if hi is None or lo <= hi:  # an impossible schema (minLength > maxLength) stays impossible: xgrammar says so
            out["maxLength"] = cap if hi is None else min(hi, cap)
    if types & {"integer", "number"} and not free and b.max_digits is not None:
        lim = 10 ** b.max_digits - 1
        lo = _num(out.get("minimum"))
        lo = lo if lo is not None else _num(out.get("exclusiveMinimum"))
        hi = _num(out.get("maximum"))
        hi = hi if hi is not None else _num(out.get("exclusiveMaximum"))
        if lo is None:
            out["minimum"] = -lim if hi is None or hi >= -lim else hi - lim
        if hi is None:
            out["maximum"] = lim if lo is None or lo <= lim else lo + lim
    if "array" in types and b.max_items is not None:
        if "items" not in out and "prefixItems" not in out:
            out["items"] = _any_value(b, max(0, depth - 1))
        lo = _int(out.get("minItems")) or 0
        hi = _int(out.get("maxItems"))
        if hi is None or lo <= hi:
            out["maxItems"] = max(b.max_items, lo) if hi is None else min(hi, max(b.max_items, lo))
    if "object" in types and b.max_properties is not None:
        extra = out.get("additionalProperties")
        named = isinstance(out.get("properties"), dict) or "patternProperties" in out
        if extra is True or (extra is None and not named):  # free object: values and count bounded
            out["additionalProperties"] = _any_value(b, max(0, depth - 1))
            extra = out["additionalProperties"]
        if isinstance(extra, dict):
            if "propertyNames" not in out:
                out["propertyNames"] = {"type": "string", "maxLength": b.max_key}
            lo = _int(out.get("minProperties")) or 0
            n = len(out.get("properties") or {}) if named else 0
            hi = _int(out.get("maxProperties"))
            cap = n + max(b.max_properties, lo)
            if hi is None or lo <= hi:
                out["maxProperties"] = cap if hi is None else min(hi, cap)
    return out


def bound_schema(schema: Any, bounds: Bounds | None = None) -> Any:
    """Copy of ``schema`` where what it leaves unbounded gets a cap (:class:`Bounds`): strings a
    ``maxLength`` (at least their ``minLength``: a ``minLength: 200`` string is capped at 200, not
    refused), integers and numbers a range, arrays a ``maxItems`` (at least ``minItems``), free objects
    and free values (``{}``, ``"type": "object"`` without properties) bounded kinds of values.
    Explicit caps are kept, only lowered to the tier's (a valid reply of the capped schema is a valid
    reply of the original); ``enum``/``const``/``pattern``/``format`` strings are left as written."""
    return _bound(schema, bounds or Bounds(), (bounds or Bounds()).any_depth)


def cap_strings(schema: Any, max_length: int | None = DEFAULT_MAX_STRING) -> Any:
    """Copy of ``schema`` where every free-form string gets ``maxLength`` (if it has none; raised to its
    ``minLength``): :func:`bound_schema` with strings only."""
    if max_length is None:
        return schema
    return bound_schema(schema, replace(STRINGS_ONLY, max_string=max_length))


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

    from .toolformat import FORMATS

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
    return proc


def tool_call_processor(lm: LoadedModel, tools: Sequence[dict], choice: str | None = None, fmt: Any = None,
                        auto: bool = False, max_new_tokens: int | None = None) -> Any:
    """A fresh logits processor forcing exactly one valid call of one of ``tools``, written in
    ``fmt`` (a :class:`~flashback_agents.toolformat.ToolCallFormat`; default Hermes ``<tool_call>``).

    ``auto=True``: no call is forced, but any call the model opens must parse (``tool_choice="auto"``).
    ``max_new_tokens``: the reply's budget; the schema's caps follow it (:func:`bounds_for`). A forced
    call is closed before the budget runs out (:class:`CloseGuard`, run by generation).
    """
    bounds = bounds_for(max_new_tokens)
    if auto:
        from .toolformat import call_schema

        body = tool_call_schema(tools) if fmt is None else call_schema(fmt, tool_call_schema(tools))
        affixes = None if fmt is None else fmt.grammar_affixes()
        return _processor(GRAMMARS.get(lm, "tool_call_auto", body, affixes=affixes, bounds=bounds))
    if fmt is None:
        return _processor(GRAMMARS.get(lm, "tool_call", tool_call_schema(tools, choice), bounds=bounds), lm)
    from .toolformat import call_schema

    return _processor(GRAMMARS.get(lm, "tool_call", call_schema(fmt, tool_call_schema(tools, choice)),
                                   affixes=fmt.grammar_affixes(), bounds=bounds), lm)


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


def json_schema_processor(lm: LoadedModel, schema: dict, max_new_tokens: int | None = None) -> Any:
    """A fresh logits processor forcing output that validates against ``schema`` (closed before the
    budget runs out, as a required call is; ``max_new_tokens``: see :func:`tool_call_processor`)."""
    if not isinstance(schema, dict):
        raise ConstraintError(f"response_schema must be a JSON schema dict, got {type(schema).__name__}.")
    return _processor(GRAMMARS.get(lm, "json", schema, bounds=bounds_for(max_new_tokens)), lm)


# --------------------------------------------------------------------------- budget guard
#: most tokens the guard may add past ``max_new_tokens`` to close a reply (more: ConstraintError)
MAX_CLOSE_OVERSHOOT = 256
#: the guard closes when the shortest close plus this many tokens no longer fits in what is left
#: (one more model token may open another string or array)
CLOSE_SLACK = 4
#: how far from the end (beyond the last known close length) the guard starts to look
CLOSE_MARGIN = 32
#: longest close the walk looks for (characters or tokens): a schema needing more cannot be closed
MAX_CLOSE_STEPS = 4096

_PRINTABLE = "".join(chr(c) for c in range(32, 127) if chr(c) != "\\")
#: characters tried, in order, outside a free string: close what is open (a string of a pattern or a
#: format too), then the next item, then the shortest values (an empty string, a digit), then anything
#: printable (t/f/n, [ and {, enum letters)
_ORDER_OUT = "]},\"0" + "".join(c for c in _PRINTABLE if c not in "]},0\"")
#: inside a free string: close it, else pad it (minLength) with a plain letter
_ORDER_IN = "\"x" + "".join(c for c in _PRINTABLE if c not in "\"x")
#: the same character chosen this many times in a row: look for the text that lets the string close
_STUCK_RUN = 8
#: what that search tries: one letter of each case, one digit, every other printable character but ``"``
_UNSTICK_ALPHABET = "x0X" + "".join(c for c in _PRINTABLE if not c.isalnum() and c != '"')
_UNSTICK_PROBES = 4000


class CloseGuard:
    """Keeps a required call (or a JSON answer) closable within the token budget.

    It follows the generated tokens with its own ``xgrammar.GrammarMatcher`` (lazily: only near the
    end of the budget) and, when the shortest valid close of what was generated so far (plus
    :data:`CLOSE_SLACK`) no longer fits in the tokens left (``max_new_tokens`` or the context
    window), returns that close: generation pushes those tokens (and a stop token) as if decoded, so
    the reply is a complete, parsable call instead of one cut at ``length``. The close is exact with
    respect to the grammar (each token is checked by a matcher); "shortest" is a greedy walk that
    closes strings, arrays and objects first, writes the smallest values still required (``""``,
    ``0``, ``[]``, the first enum member), pads a string to its ``minLength``, and searches a few
    characters ahead where a pattern or a format needs them (an email's ``@``): shortest or close to
    it for JSON-schema grammars, and never more than :data:`MAX_CLOSE_STEPS` characters.
    A close that does not fit in the context window, or needs more than :data:`MAX_CLOSE_OVERSHOOT`
    tokens past ``max_new_tokens``, raises :class:`ConstraintError`.
    """

    def __init__(self, compiled: Any, stop_ids: Sequence[int], vocab: "CloseVocab | None" = None):
        import xgrammar as xgr

        self._xgr = xgr
        self.compiled = compiled
        self.matcher = xgr.GrammarMatcher(compiled)
        self.seen = 0  # generated tokens the matcher has accepted
        self.lost = False  # a generated token the matcher refused: the guard stands aside
        self.stop_ids = sorted(int(t) for t in stop_ids)
        self.vocab = vocab or CloseVocab(compiled.tokenizer_info)
        first = self.close()  # the shortest complete reply, from the start (None: found when needed, or an error)
        #: tokens kept back for the close: the last close's length plus CLOSE_SLACK
        self.reserve = (len(first) if first is not None else 0) + CLOSE_SLACK

    def follow(self, generated: Sequence[int]) -> None:
        """Accept the generated tokens not yet seen."""
        for t in generated[self.seen:]:
            if self.matcher.is_terminated():
                break
            if not self.matcher.accept_token(int(t)):
                self.lost = True
                break
        self.seen = len(generated)

    def plan(self, generated: Sequence[int], left: int, room: int) -> list[int] | None:
        """Before a step: the close to push now (ends with a stop token), or None to let the model go on.

        ``left``: tokens this reply may still produce (budget and window); ``room``: positions left in
        the context window (the close may exceed ``left`` by up to MAX_CLOSE_OVERSHOOT, never ``room``).
        """
        if left > self.reserve + CLOSE_MARGIN:
            return None
        self.follow(generated)
        if self.lost or self.matcher.is_terminated():
            return None
        toks = self.close()
        if toks is None:
            raise ConstraintError("The constrained reply cannot be closed from where the model took it "
                                  f"(no valid close within {MAX_CLOSE_STEPS} characters); raise max_tokens or "
                                  "simplify the schema.")
        self.reserve = len(toks) + CLOSE_SLACK
        if self.reserve < left:
            return None
        if len(toks) > room:
            raise ConstraintError(f"The required tool call / JSON reply cannot be completed in the context window: "
                                  f"{room} positions are left and its shortest valid end needs {len(toks)} tokens; "
                                  "raise max_context_tokens or shorten the conversation.")
        if len(toks) > left + MAX_CLOSE_OVERSHOOT:
            raise ConstraintError(f"The required tool call / JSON reply needs {len(toks)} more tokens to be valid, "
                                  f"more than max_new_tokens leaves ({left}) plus {MAX_CLOSE_OVERSHOOT}; raise "
                                  "max_tokens or relax the schema (minLength, minItems, required properties).")
        return toks

    def step_budget(self, left: int) -> int:
        """Most tokens one multi-token step (speculation, jump-forward) may take: up to where the guard
        starts to look, then one at a time, so the guard looks at exactly the positions it looks at
        under one-token decoding (the output stays plain decoding's)."""
        edge = self.reserve + CLOSE_MARGIN
        return left - edge if left > edge else 1

    # ------------------------------------------------------------ the close
    def close(self) -> list[int] | None:
        """Token ids of the shortest valid end of the reply from the matcher's state, ending with a
        stop token (None: none found within MAX_CLOSE_STEPS)."""
        m = self.matcher.fork()
        out: list[int] = []
        text = ""
        last, run, unstuck = "", 0, False
        for _ in range(MAX_CLOSE_STEPS):
            if m.is_completed():
                break
            forced = m.find_jump_forward_string()
            if forced and m.accept_string(forced):
                text += forced
                continue
            order = _ORDER_IN if self._accepts(m, "q") and self._accepts(m, "x") else _ORDER_OUT
            ch = next((c for c in order if m.accept_string(c)), None)
            if ch is not None:
                text += ch
                run, unstuck = (run + 1, unstuck) if ch == last else (1, False)
                last = ch
                if run >= _STUCK_RUN and not unstuck:  # padding a string: a pattern/format may need other chars
                    unstuck = True
                    if self._accepts(m, " ") and self._accepts(m, "~"):  # a free string (minLength): pad on
                        continue
                    path = self._unstick(m)
                    if path and m.accept_string(path):
                        text += path
                        last, run = "", 0
                continue
            tok = self._any_token(m)  # inside a multi-byte character, or a non-ASCII enum member
            if tok is None:
                return None
            out += self._tokens(text.encode("utf-8"))
            text = ""
            out.append(tok)
        else:
            return None
        out += self._tokens(text.encode("utf-8"))
        stop = next((t for t in self.stop_ids if self._accepts_token(m, t)), None)
        if stop is None:
            return None
        out.append(stop)
        check = self.matcher.fork()  # the tokens, not only the text, must be what the grammar accepts
        if not all(check.accept_token(t) for t in out):
            return None
        return out

    def _unstick(self, m: Any) -> str | None:
        """The shortest text (up to 3 characters, at most _UNSTICK_PROBES tries) after which ``m`` can
        close a string (accepts ``"``) or is complete: what a pattern or a format (an email's ``@x``,
        a ``-`` between digit groups) needs where padding with one character never ends."""
        frontier, probes = [("", m)], 0
        for _ in range(3):
            deeper = []
            for path, node in frontier:
                for c in _UNSTICK_ALPHABET:
                    probes += 1
                    if probes > _UNSTICK_PROBES:
                        return None
                    if not node.accept_string(c):
                        continue
                    if node.is_completed() or self._accepts(node, '"'):
                        node.rollback(1)
                        return path + c
                    deeper.append((path + c, node.fork()))
                    node.rollback(1)
            frontier = deeper
        return None

    @staticmethod
    def _accepts(m: Any, s: str) -> bool:
        if m.accept_string(s):
            m.rollback(1)
            return True
        return False

    @staticmethod
    def _accepts_token(m: Any, t: int) -> bool:
        f = m.fork()
        return bool(f.accept_token(t))

    def _any_token(self, m: Any) -> int | None:
        """The allowed token with the fewest bytes (accepted into ``m``), or None."""
        xgr = self._xgr
        mask = xgr.allocate_token_bitmask(1, self.compiled.tokenizer_info.vocab_size)
        m.fill_next_token_bitmask(mask, 0)
        allowed = xgr.testing.bitmask_to_bool_mask(mask)[0]
        stops, vocab = set(self.stop_ids), self.vocab.vocab
        best = None
        for t in allowed.nonzero().flatten().tolist():
            if t in stops or t >= len(vocab) or not vocab[t]:
                continue
            if best is None or len(vocab[t]) < len(vocab[best]):
                best = t
                if len(vocab[t]) == 1:
                    break
        if best is None or not m.accept_token(best):
            return None
        return best

    def _tokens(self, data: bytes) -> list[int]:
        """``data`` as token ids, longest vocabulary piece first (exact bytes, no tokenizer quirks:
        no prefix space, no normalisation)."""
        pieces, longest = self.vocab.pieces, self.vocab.longest
        out, i = [], 0
        while i < len(data):
            for n in range(min(longest, len(data) - i), 0, -1):
                t = pieces.get(data[i:i + n])
                if t is not None:
                    out.append(t)
                    i += n
                    break
            else:
                raise ConstraintError(f"The vocabulary has no token for byte {data[i]:#x}; this model cannot close "
                                      "the reply.")
        return out


class CloseVocab:
    """A grammar vocabulary as the guard reads it: each token's bytes (special tokens blank) and
    {bytes: first token id} without stop tokens. Built once per model (:meth:`GrammarCache.close_vocab`)."""

    def __init__(self, info: Any):
        self.vocab: list[bytes] = list(info.decoded_vocab)
        stops = set(info.stop_token_ids)
        self.pieces: dict[bytes, int] = {}
        for i, b in enumerate(self.vocab):
            if b and i not in stops and b not in self.pieces:
                self.pieces[b] = i
        self.longest = max((len(b) for b in self.pieces), default=1)


def close_guard(processors: Sequence[Any], stop_ids: Sequence[int]) -> CloseGuard | None:
    """The guard for a generation whose processors include one that must complete (None: none does)."""
    marked = [p for p in processors if getattr(p, "close_on_budget", False)]
    if len(marked) != 1 or len(getattr(marked[0], "compiled_grammars", ())) != 1 or not stop_ids:
        return None
    return CloseGuard(marked[0].compiled_grammars[0], stop_ids, getattr(marked[0], "close_vocab", None))
