"""The model's own tool-call syntax, probed from its chat template (issue 18 item 3).

Models are trained to call tools in their family's syntax, and a call written in another one is
less likely to be produced or recognised: Hermes / Qwen ``<tool_call>{"name", "arguments"}</tool_call>``,
Llama 3.1+ a bare JSON object ``{"name", "parameters"}`` (after ``<|python_tag|>`` for built-in
tools), Mistral ``[TOOL_CALLS][{"name", "arguments"}, ...]``. :func:`probe_tool_format` renders one
assistant tool call through the tokenizer's chat template and recognises which of these it wrote,
the same way the layout probes role wrappers. A template that shows no tool calls (or cannot render
one) gets today's Hermes format, so nothing changes for the default model.

This module is the bottom of the tool-call stack: the call type (:class:`ToolCall`), the Hermes markers,
the tool list's text and call-body schemas (:func:`render_tool_schemas`, :func:`tool_call_schema`), the
one call parser (:func:`parse_tool_calls`) and the stream holdback (:func:`holdback`). It imports no
other package module but :mod:`flashback_agents.errors`; :mod:`~flashback_agents.layout`,
:mod:`~flashback_agents.generation`, :mod:`~flashback_agents.constrained` and the chat engine build on it.

Each :class:`ToolCallFormat` renders calls, parses generated text back into calls, and gives the
text around one call's JSON body, which :mod:`flashback_agents.constrained` wraps around the
grammar of the body (``tool_call_processor(..., fmt=...)``), so constrained decoding writes the
family's syntax and the family's parser accepts it.

:class:`~flashback_agents.layout.Layout` probes the format once per model (``Layout.tool_format``) and
renders assistant calls and the tool list of the system block in it; :class:`~flashback_agents.chat.ChatEngine`
parses replies, holds call markup back from streams and constrains required calls with the same format.
:data:`HERMES` renders exactly what the layout rendered before formats were probed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import FlashBackError

__all__ = ["FORMATS", "HERMES", "LLAMA3_JSON", "MISTRAL", "PYTHON_TAG", "TOOL_CALL_CLOSE", "TOOL_CALL_OPEN", "ConstraintError",
           "ToolCall", "ToolCallFormat", "call_schema", "format_for", "format_tool_calls", "holdback",
           "parse_tool_calls", "probe_tool_format", "render_tool_schemas", "tool_call_schema", "tool_name"]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


class ConstraintError(ValueError, FlashBackError):
    """A schema or tool choice that cannot be turned into a grammar."""


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "arguments": self.arguments}, ensure_ascii=False)


def holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing chars might start a stop string (not yet safe to emit).

    Trailing U+FFFD (the bytes of a character split across byte-level tokens, not yet complete) are
    never safe, and the check runs on the text before them: the completed character may finish a
    stop string that the chars before it begin (stop ``" 中"`` after ``"ok "`` + half of ``中``).
    """
    stable = text.rstrip("\ufffd")
    if len(stable) < len(text):
        return len(text) - len(stable) + holdback(stable, stops)
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


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


def render_tool_schemas(tools: Sequence[dict]) -> str:
    """Deterministic text block describing the tools (sorted keys, stable order as given)."""
    if not tools:
        return ""
    lines = ["", "", "# Tools", "", "You may call one or more functions. Available functions:"]
    for tool in tools:
        fn = tool.get("function", tool)
        lines.append(json.dumps({"name": fn.get("name"), "description": fn.get("description", ""),
                                 "parameters": fn.get("parameters", {})}, sort_keys=True, ensure_ascii=False))
    lines += ["", f"To call a function, reply with {TOOL_CALL_OPEN}{{\"name\": <function-name>, "
              f"\"arguments\": <args-json-object>}}{TOOL_CALL_CLOSE}. Tool results arrive marked as evidence."]
    return "\n".join(lines)


@dataclass(frozen=True)
class ToolCallFormat:
    """How one family writes tool calls: ``open`` + body + ``close`` per call, or with ``array`` one
    ``open`` + a JSON array of bodies + ``close``; each body is ``{"name": ..., <args_key>: {...}}``."""

    name: str
    open: str
    close: str
    args_key: str = "arguments"
    array: bool = False  # Mistral: [TOOL_CALLS][{...}, {...}]

    def body(self, call: ToolCall) -> str:
        return json.dumps({"name": call.name, self.args_key: call.arguments}, ensure_ascii=False)

    def render(self, calls: Iterable[ToolCall]) -> str:
        """The calls as the family writes them (what a reply with these calls looks like)."""
        calls = list(calls)
        if not calls:
            return ""
        if self.array:
            return self.open + "[" + ", ".join(self.body(c) for c in calls) + "]" + self.close
        return "".join(self.open + self.body(c) + self.close for c in calls)

    def tools_text(self, tools: list[dict] | tuple[dict, ...]) -> str:
        """The tool list appended to the system block, in the family's words (deterministic: sorted
        keys, tools in the order given). Hermes: exactly :func:`~flashback_agents.layout.render_tool_schemas`."""
        if not tools:
            return ""
        if self.name == "llama3_json":  # the Llama 3.1+ template's tools-in-system text
            return ("\n\nYou have access to the following functions. To call a function, please respond with JSON "
                    'for a function call. Respond in the format {"name": function name, "parameters": dictionary '
                    "of argument name and its value}. Do not use variables.\n\n"
                    + "".join(json.dumps(_tool_entry(t), indent=4, ensure_ascii=False) + "\n\n" for t in tools)
                    + "Tool results arrive marked as evidence.")
        if self.name == "mistral":  # Mistral v3's [AVAILABLE_TOOLS] block
            return ("\n\n[AVAILABLE_TOOLS] [" + ", ".join(json.dumps(_tool_entry(t), ensure_ascii=False) for t in tools)
                    + "][/AVAILABLE_TOOLS]\nTool results arrive marked as evidence.")
        return render_tool_schemas(tools)

    def stream_split(self, raw: str) -> tuple[str, int]:
        """While streaming: (the content before any call markup, how many of its chars are safe to emit
        now; the rest might begin call markup)."""
        if self.open:
            cut = raw.find(self.open)
            if cut >= 0:
                return raw[:cut], cut
            return raw, len(raw) - holdback(raw, (self.open,))
        # Llama 3: a call is a bare JSON object opening the reply, or follows <|python_tag|>
        lead = len(raw) - len(raw.lstrip())
        if lead == len(raw) or raw[lead] == "{":
            return raw[:lead], 0
        cut = raw.find(_PYTHON_TAG)
        if cut >= 0:
            return raw[:cut], cut
        return raw, len(raw) - holdback(raw, (_PYTHON_TAG,))

    def grammar_affixes(self) -> tuple[str, str]:
        """Text before and after one call's JSON body under constrained decoding (one call)."""
        return (self.open + "[", "]" + self.close) if self.array else (self.open, self.close)

    def parse(self, raw: str, allowed: set[str] | None = None, *, strip: bool = True) -> tuple[str, list[ToolCall]]:
        """Split generated text into (content, calls); text that does not parse stays content.

        The one call parser (:func:`parse_tool_calls` is this, for every format): each call body is
        decoded as one JSON value (a closing tag inside a string argument does not cut the call short),
        leniently where the constrained grammar is (:data:`JSON_DECODER`: raw control characters inside
        strings). ``strip``: strip the content around the calls (Hermes replies keep it as written).
        """
        calls: list[ToolCall] = []
        pieces: list[str] = []
        pos = search = 0
        while True:
            start = raw.find(self.open, search) if self.open else _json_start(raw, search)
            if start < 0:
                break
            body = start + len(self.open)
            while body < len(raw) and raw[body].isspace():
                body += 1
            try:
                value, end = JSON_DECODER.raw_decode(raw, body)
            except ValueError:
                search = body + 1
                continue
            found = [self._coerce(v, allowed) for v in (value if self.array and isinstance(value, list) else [value])]
            if not found or any(c is None for c in found):
                search = end
                continue
            rest = end
            while rest < len(raw) and raw[rest].isspace():
                rest += 1
            if self.close and raw.startswith(self.close, rest):
                end = rest + len(self.close)
            pieces.append(raw[pos:start].removesuffix(_PYTHON_TAG))  # Llama 3's built-in-tool tag
            calls.extend(found)  # type: ignore[arg-type]
            pos = search = end
        pieces.append(raw[pos:])
        if not calls:
            return raw, calls
        content = "".join(pieces)
        return (content.strip() if strip else content), calls

    def _coerce(self, obj: Any, allowed: set[str] | None) -> ToolCall | None:
        """One decoded call body as a ToolCall (None: not a call of an allowed tool)."""
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get(self.args_key, obj.get("arguments", obj.get("parameters", {})))
        if isinstance(args, str):  # OpenAI style: the arguments as a JSON string
            try:
                args = JSON_DECODER.decode(args)
            except ValueError:
                return None
        if not isinstance(args, dict) or (allowed is not None and obj["name"] not in allowed):
            return None
        return ToolCall(name=obj["name"], arguments=args, id="call_" + uuid.uuid4().hex[:24])


#: the call parser's JSON decoder: strict JSON, except that raw control characters (tab, U+0001, ...)
#: are accepted inside strings, as a grammar may write them (xgrammar's capped strings did); the
#: grammar (flashback_agents.constrained) now escapes them, the parser still reads either
JSON_DECODER = json.JSONDecoder(strict=False)

#: Llama 3's built-in-tool tag (a call may follow it)
PYTHON_TAG = _PYTHON_TAG = "<|python_tag|>"


def _tool_entry(tool: dict) -> dict:
    """``{"type": "function", "function": {name, description, parameters}}`` with sorted inner keys."""
    fn = tool.get("function", tool)
    inner = {"name": fn.get("name"), "description": fn.get("description", ""), "parameters": fn.get("parameters", {})}
    return {"type": "function", "function": json.loads(json.dumps(inner, sort_keys=True))}


def _json_start(raw: str, search: int) -> int:
    """Where a bare JSON call may start (Llama 3 writes the object alone, maybe after <|python_tag|>)."""
    return raw.find("{", search)


HERMES = ToolCallFormat("hermes", TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
LLAMA3_JSON = ToolCallFormat("llama3_json", "", "", args_key="parameters")
MISTRAL = ToolCallFormat("mistral", "[TOOL_CALLS]", "", array=True)
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}

_PROBE_NAME = "flashback_probe_fn"
_PROBE_VALUE = "zqxprobe"  # in the call's arguments only, never in the tool list: it locates the call
_PROBE_ID = "abcdefghi"  # Mistral templates require 9 alphanumeric characters
_PROBE_TOOL = {"type": "function", "function": {"name": _PROBE_NAME, "description": "probe",
                                                "parameters": {"type": "object",
                                                               "properties": {"q": {"type": "string"}}}}}


def _render_probe(tokenizer: Any) -> str | None:
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"id": _PROBE_ID, "type": "function",
                             "function": {"name": _PROBE_NAME, "arguments": {"q": _PROBE_VALUE}}}]},
            {"role": "tool", "tool_call_id": _PROBE_ID, "content": "8"},
            {"role": "assistant", "content": "ok"},  # Mistral templates insist on user/assistant turns
            {"role": "user", "content": "thanks"}]
    try:
        return tokenizer.apply_chat_template(msgs, tools=[_PROBE_TOOL], tokenize=False)
    except Exception:  # noqa: BLE001 - templates raise anything on shapes they do not support
        return None


def probe_tool_format(tokenizer: Any) -> ToolCallFormat:
    """The family's tool-call format, from how its chat template renders one assistant call.

    Recognised: Hermes/Qwen ``<tool_call>``, Mistral ``[TOOL_CALLS]``, Llama 3 bare JSON with
    ``"parameters"``. Anything else (no template, no tool support, another syntax): :data:`HERMES`.
    """
    if not getattr(tokenizer, "chat_template", None):
        return HERMES
    text = _render_probe(tokenizer)
    at = text.find(_PROBE_VALUE) if text else -1
    if at < 0:  # the template dropped the call: it has no tool-call syntax of its own
        return HERMES
    before = text[:at]
    mistral, hermes = before.rfind(MISTRAL.open), before.rfind(HERMES.open)
    if mistral > hermes:
        return MISTRAL
    if hermes >= 0:
        return HERMES
    call = before[before.rfind(_PROBE_NAME) - 16:]
    if '"name"' in call and '"parameters"' in call:
        return LLAMA3_JSON
    return HERMES


def format_for(lm_or_tokenizer: Any) -> ToolCallFormat:
    """:func:`probe_tool_format` for a LoadedModel or a tokenizer."""
    return probe_tool_format(getattr(lm_or_tokenizer, "tokenizer", lm_or_tokenizer))


def call_schema(fmt: ToolCallFormat, schema: dict) -> dict:
    """A call-body JSON schema (:func:`tool_call_schema`) with the family's arguments key."""
    if fmt.args_key == "arguments":
        return schema
    if "anyOf" in schema:
        return {"anyOf": [call_schema(fmt, s) for s in schema["anyOf"]]}
    props = {(fmt.args_key if k == "arguments" else k): v for k, v in schema["properties"].items()}
    required = [fmt.args_key if k == "arguments" else k for k in schema.get("required", [])]
    return {**schema, "properties": props, "required": required}


def format_tool_calls(calls: Iterable[ToolCall], tool_format: ToolCallFormat | None = None) -> str:
    """The calls as an assistant writes them: Hermes ``<tool_call>`` or ``tool_format``."""
    return (tool_format or HERMES).render(calls)


def parse_tool_calls(raw: str, allowed: set[str] | None = None,
                     fmt: ToolCallFormat | None = None) -> tuple[str, list[ToolCall]]:
    """Split generated text into (content, tool calls). Unparsable markup stays in the content.

    Each ``<tool_call>`` is decoded as one JSON value (so a ``</tool_call>`` inside a string argument
    does not cut the call short), optionally followed by ``</tool_call>``. ``fmt``: the model's
    :class:`ToolCallFormat` (``Layout.tool_format``); default Hermes. One parser for every path:
    :meth:`ToolCallFormat.parse` (lenient where the grammar is: raw control characters inside strings);
    Hermes content is kept as written, other formats' is stripped.
    """
    if fmt is None or (fmt.open, fmt.close, fmt.array) == (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, False):
        return (fmt or HERMES).parse(raw, allowed, strip=False)
    return fmt.parse(raw, allowed)
