"""The caps a constrained reply's JSON schema gets, so a required call or a JSON answer always closes.

A small model that loops (counting in an array, ``1111...`` in a number, a sentence in a string) must hit
a cap that lets it close the reply within ``max_new_tokens``: :func:`bound_schema` narrows what a schema
leaves unbounded (:class:`Bounds`, three budget tiers in :func:`bounds_for`). Pure Python, no grammar
library: :mod:`flashback_agents.constrained` compiles the bounded schema, the server backend sends it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

__all__ = ["DEFAULT_MAX_STRING", "Bounds", "STRINGS_ONLY", "bounds_for", "bound_schema", "cap_strings"]

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
