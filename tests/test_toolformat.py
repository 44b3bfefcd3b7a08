"""The model's own tool-call syntax (issue 18 item 3): probed from real chat templates (text fixtures
in tests/data/chat_templates, no weights), rendered, parsed, and produced by constrained decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flashback_agents.layout import ToolCall
from flashback_agents.toolformat import HERMES, LLAMA3_JSON, MISTRAL, probe_tool_format

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
FAMILIES = {"qwen2.5-7b-instruct": HERMES, "llama-3.2-instruct": LLAMA3_JSON, "mistral-large-2407": MISTRAL}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two digits.",
                                           "parameters": {"type": "object",
                                                          "properties": {"a": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9},
                                                                         "b": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
                                                          "required": ["a", "b"]}}}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from flashback_agents.testing import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-toolformat"))


def tokenizer_with(tiny_dir, template: str | None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    tok.chat_template = template
    return tok


def _template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_probe_recognises_the_family(name, tiny_dir):
    assert probe_tool_format(tokenizer_with(tiny_dir, _template(name))) is FAMILIES[name]


def test_templates_without_tool_calls_fall_back_to_hermes(tiny_dir):
    from flashback_agents.testing import CHATML_TEMPLATE

    assert probe_tool_format(tokenizer_with(tiny_dir, CHATML_TEMPLATE)) is HERMES  # drops tool_calls
    assert probe_tool_format(tokenizer_with(tiny_dir, None)) is HERMES
    broken = "{{ raise_exception('no tools here') }}"
    assert probe_tool_format(tokenizer_with(tiny_dir, broken)) is HERMES


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_family_parser_reads_what_its_template_writes(name, tiny_dir):
    """Parse the template's own rendering of an assistant call: same name and arguments."""
    fmt = FAMILIES[name]
    tok = tokenizer_with(tiny_dir, _template(name))
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "add", "arguments": {"a": 3, "b": 4}}}
    msgs = [{"role": "user", "content": "add 3 and 4"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    text = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False)
    reply = text[text.rfind("add 3 and 4") + len("add 3 and 4"):]  # after the user turn: the assistant's
    _, calls = fmt.parse(reply, allowed={"add"})
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 3, "b": 4})], reply
    # and what we render for that call is read back the same way (two calls too)
    ours = fmt.render([ToolCall("add", {"a": 3, "b": 4}), ToolCall("add", {"a": 1, "b": 2})])
    assert [(c.name, c.arguments) for c in fmt.parse("Sure. " + ours)[1]] == [("add", {"a": 3, "b": 4}),
                                                                             ("add", {"a": 1, "b": 2})]


def test_unparsable_markup_stays_content():
    for fmt in (HERMES, LLAMA3_JSON, MISTRAL):
        raw = f"Let me think {fmt.open}{{not json"
        assert fmt.parse(raw) == (raw, [])
    assert LLAMA3_JSON.parse('The set {"x": 1} is not a call')[1] == []  # a JSON object without a name
    content, calls = LLAMA3_JSON.parse('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}')
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON, MISTRAL], ids=lambda f: f.name)
def test_constrained_decoding_writes_the_family_format(fmt, tiny_dir):
    """The grammar follows the probed format: a random model's constrained output parses as a call."""
    pytest.importorskip("xgrammar")
    from flashback_agents import CachedContext, GenerationConfig, generate, load_model
    from flashback_agents.constrained import tool_call_processor

    lm = load_model(str(tiny_dir), device="cpu", adapter=None)
    ctx = CachedContext(lm)
    ctx.append(lm.encode("<|im_start|>user\nadd 3 and 4<|im_end|>\n<|im_start|>assistant\n"))
    result = generate(ctx, GenerationConfig(max_new_tokens=80), [tool_call_processor(lm, TOOLS, fmt=fmt)])
    text = lm.decode(result.token_ids, skip_special_tokens=True)
    assert text.startswith(fmt.open) if fmt.open else text.startswith("{")
    _, calls = fmt.parse(text, allowed={"add"})
    assert len(calls) == 1 and calls[0].name == "add" and set(calls[0].arguments) == {"a", "b"}, text
    body = json.loads(text[len(fmt.open):].strip().removesuffix(fmt.close).strip())
    if fmt.array:
        body = body[0]
    assert fmt.args_key in body  # "parameters" for Llama 3, "arguments" otherwise
