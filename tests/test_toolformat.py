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


def tokenizer_with(tiny_model_dir, template: str | None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.chat_template = template
    return tok


def _template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_probe_recognises_the_family(name, tiny_model_dir):
    assert probe_tool_format(tokenizer_with(tiny_model_dir, _template(name))) is FAMILIES[name]


def test_templates_without_tool_calls_fall_back_to_hermes(tiny_model_dir):
    from flashback_agents.testing import CHATML_TEMPLATE

    assert probe_tool_format(tokenizer_with(tiny_model_dir, CHATML_TEMPLATE)) is HERMES  # drops tool_calls
    assert probe_tool_format(tokenizer_with(tiny_model_dir, None)) is HERMES
    broken = "{{ raise_exception('no tools here') }}"
    assert probe_tool_format(tokenizer_with(tiny_model_dir, broken)) is HERMES


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_family_parser_reads_what_its_template_writes(name, tiny_model_dir):
    """Parse the template's own rendering of an assistant call: same name and arguments."""
    fmt = FAMILIES[name]
    tok = tokenizer_with(tiny_model_dir, _template(name))
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
def test_constrained_decoding_writes_the_family_format(fmt, tiny_model_dir):
    """The grammar follows the probed format: a random model's constrained output parses as a call."""
    pytest.importorskip("xgrammar")
    from flashback_agents import CachedContext, GenerationConfig, generate, load_model
    from flashback_agents.constrained import tool_call_processor

    lm = load_model(str(tiny_model_dir), device="cpu", adapter=None)
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


# --- wired in: Layout and ChatEngine use the probed format (tiny random model per template family) ---

#: per family: special tokens its format needs, plain added tokens, the end-of-turn token (as EOS)
FAMILY_TOKENS = {
    "qwen2.5-7b-instruct": ([], ["<tool_call>", "</tool_call>"], None),
    "llama-3.2-instruct": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"], [],
                           "<|eot_id|>"),
    "mistral-large-2407": (["</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                            "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], [], "</s>"),
}
#: the raw text of a required call, as each family writes it
FAMILY_SYNTAX = {
    "qwen2.5-7b-instruct": r'<tool_call>\s*\{\s*"name"\s*:\s*"add"\s*,\s*"arguments"\s*:\s*\{.*\}\s*\}\s*</tool_call>',
    "llama-3.2-instruct": r'\{\s*"name"\s*:\s*"add"\s*,\s*"parameters"\s*:\s*\{.*\}\s*\}',
    "mistral-large-2407": r'\[TOOL_CALLS\]\s*\[\s*\{\s*"name"\s*:\s*"add"\s*,\s*"arguments"\s*:\s*\{.*\}\s*\}\s*\]',
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """The tiny model with each family's template, special tokens and end-of-turn EOS (the model's
    embeddings grow to the tokenizer when loaded); a longer window: the tiny vocabulary spells tool
    schemas in many tokens."""
    import shutil

    from transformers import AddedToken, AutoTokenizer

    from flashback_agents.testing import build_tiny_model_dir

    tiny_model_dir = build_tiny_model_dir(tmp_path_factory.mktemp("tiny-families"), max_positions=4096)
    out = {}
    for name, (special, plain, eos) in FAMILY_TOKENS.items():
        path = tmp_path_factory.mktemp(f"tiny-{name}")
        shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
        tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
        if eos:
            tok.eos_token = eos
        tok.chat_template = _template(name)
        tok.save_pretrained(str(path))
        out[name] = path
    return out


@pytest.fixture(scope="module")
def family_engines(family_dirs):
    from flashback_agents import load_model
    from flashback_agents.engines import local_engine

    engines = {name: local_engine(load_model(str(path), device="cpu", adapter=None)) for name, path in family_dirs.items()}
    yield engines
    for engine in engines.values():
        engine.close()


def _conversation():
    from flashback_agents.layout import Message

    call = ToolCall("add", {"a": 3, "b": 4}, id="abcdefghi")
    return [Message("system", "You add numbers."), Message("user", "add 3 and 4", documents=["3 + 4 = 7"]),
            Message("assistant", "", tool_calls=[call]), Message("tool", "7", tool_call_id="abcdefghi", name="add"),
            Message("assistant", "It is 7."), Message("user", "and 1 and 2?"),
            Message("assistant", "Sure.", tool_calls=[ToolCall("add", {"a": 1, "b": 2}, id="bcdefghij")]),
            Message("tool", "3", tool_call_id="bcdefghij"), Message("evidence", "1 + 2 = 3", name="notes")]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_layout_renders_the_family_format_prefix_stable(name, family_engines):
    """Each template's per-message rendering is append-only (1..n a prefix of 1..n+1), assistant calls
    and the tool list are in the family's syntax, and Llama's system block has a fixed date."""
    engine = family_engines[name]
    layout, fmt = engine.layout, FAMILIES[name]
    assert layout.tool_format is fmt
    msgs = _conversation()
    prev: list[int] = []
    for n in range(1, len(msgs) + 1):
        ids = layout.render(msgs[:n], tools=TOOLS, add_generation_prompt=False)
        assert ids[:len(prev)] == prev, (name, n)
        with_prompt = layout.render(msgs[:n], tools=TOOLS)
        assert with_prompt[:len(ids)] == ids
        prev = ids
    text = engine.lm.decode(prev)
    assert fmt.render([ToolCall("add", {"a": 3, "b": 4})]) in text  # the calls, as the family writes them
    assert [(c.name, c.arguments) for c in fmt.parse(text[text.find("add 3 and 4"):], allowed={"add"})[1]] == \
        [("add", {"a": 3, "b": 4}), ("add", {"a": 1, "b": 2})]
    if name == "llama-3.2-instruct":
        from flashback_agents.layout import TEMPLATE_DATE

        assert f"Today Date: {TEMPLATE_DATE}\n" in text  # not today's: the prefix does not change daily
        assert '"parameters"' in text and "respond with JSON for a function call" in text
        assert '<|end_header_id|>\n\n<MARK_L>add: 7<MARK_R><|eot_id|>' in text  # tool results unquoted
    elif name == "mistral-large-2407":
        assert text.startswith("<|endoftext|>[INST] You add numbers.")  # probed, not the ChatML fallback
        assert "[AVAILABLE_TOOLS] [" in text and "[/AVAILABLE_TOOLS]" in text
        assert "[INST] and 1 and 2?[/INST]" in text
    else:  # Hermes: exactly the layout's historical text
        from flashback_agents.layout import render_tool_schemas

        assert render_tool_schemas(TOOLS) in text and "<tool_call>" in text


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_engine_required_call_and_append_only_turns(name, family_engines):
    """Through ChatEngine: a required call is written in the family's syntax and its parser reads it;
    every turn computes exactly its new tokens (the rest is reused)."""
    pytest.importorskip("xgrammar")
    import re

    from flashback_agents import GenerationConfig
    from flashback_agents.layout import Message

    engine = family_engines[name]
    fmt = FAMILIES[name]
    engine.pool.clear()
    msgs = [Message("system", "You add numbers."), Message("user", "add 3 and 4")]
    context: list[int] = []  # what the cache holds after each turn: prompt + generated ids
    for turn, choice in enumerate(["required", None, "any"]):
        ids = engine.layout.render(msgs, tools=TOOLS)
        assert ids[:len(context)] == context, turn  # append-only
        reply = engine.chat(msgs, tools=TOOLS, tool_choice=choice, config=GenerationConfig(max_new_tokens=6))
        assert reply.usage.cache_read == len(context), turn  # turn 0: nothing cached yet
        assert reply.usage.computed == len(ids) - len(context), turn  # exactly the new tokens
        context = ids + reply.token_ids
        if choice is not None:  # constrained: one call, in the family's syntax, read by its parser
            assert re.fullmatch(FAMILY_SYNTAX[name], reply.raw_text.strip(), re.DOTALL), reply.raw_text
            _, calls = fmt.parse(reply.raw_text, allowed={"add"})
            assert [c.name for c in calls] == ["add"] and set(calls[0].arguments) == {"a", "b"}
            assert [(c.name, c.arguments) for c in reply.tool_calls] == [(c.name, c.arguments) for c in calls]
            assert reply.finish_reason == "tool_calls" and reply.text == ""
        msgs.append(Message("assistant", reply.text, tool_calls=reply.tool_calls))
        if reply.tool_calls:
            call = reply.tool_calls[0]
            msgs.append(Message("tool", str(sum(call.arguments.values())), tool_call_id=call.id))
        else:
            msgs.append(Message("user", "and 1 and 2?"))


def test_tiny_default_model_keeps_hermes(tiny_model_dir):
    """A template without tool syntax (the tiny model's ChatML, SmolLM2's): Hermes, rendered as before."""
    from flashback_agents import load_model
    from flashback_agents.layout import Layout, Message, render_tool_schemas

    lm = load_model(str(tiny_model_dir), device="cpu", adapter=None)
    layout = Layout(lm)
    assert layout.tool_format is HERMES
    call = ToolCall("add", {"a": 3, "b": 4})
    ids = layout.render([Message("system", "S"), Message("user", "u"), Message("assistant", "x", tool_calls=[call])],
                        tools=TOOLS, add_generation_prompt=False)
    expected = ("<|im_start|>system\nS" + render_tool_schemas(TOOLS) + "<|im_end|>\n<|im_start|>user\nu<|im_end|>\n"
                "<|im_start|>assistant\nx<tool_call>" + call.to_json() + "</tool_call><|im_end|>\n")
    assert ids == lm.encode("<|im_start|>system\nS") + lm.encode(render_tool_schemas(TOOLS)) + \
        lm.encode("<|im_end|>\n") + lm.encode("<|im_start|>user\n") + lm.encode("u") + lm.encode("<|im_end|>\n") + \
        lm.encode("<|im_start|>assistant\n") + lm.encode("x<tool_call>" + call.to_json() + "</tool_call>") + \
        lm.encode("<|im_end|>\n")
    assert lm.decode(ids) == expected


def test_special_token_markers_survive_decoding(family_engines):
    """Decoding skips special tokens; a reply whose ``[TOOL_CALLS]`` is the special token (as a real
    Mistral writes it unconstrained) still parses as a call, with the marker in ``raw_text``."""
    from flashback_agents.chat import ChatUsage, _Plan
    from flashback_agents.generation import GenerationConfig, GenerationResult

    engine = family_engines["mistral-large-2407"]
    lm = engine.lm
    marker = lm.tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")
    ids = [marker] + lm.encode('[{"name": "add", "arguments": {"a": 1, "b": 2}}]') + [lm.tokenizer.eos_token_id]
    text = lm.decode(ids, skip_special_tokens=True)
    assert "[TOOL_CALLS]" not in text
    plan = _Plan([], GenerationConfig(), None, {"add"}, parse_tools=True, remember=False)
    reply = engine._finish(plan, GenerationResult(text=text, token_ids=ids, finish_reason="stop"), ChatUsage())
    assert reply.raw_text.startswith("[TOOL_CALLS]") and reply.text == ""
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("add", {"a": 1, "b": 2})]


def test_stream_split_holds_call_markup_back():
    assert HERMES.stream_split("Sure <tool") == ("Sure <tool", 5)  # may begin <tool_call>: held back
    assert HERMES.stream_split('Sure <tool_call>{"name"') == ("Sure ", 5)
    assert MISTRAL.stream_split("ok [TOOL_CALLS][{") == ("ok ", 3)
    assert LLAMA3_JSON.stream_split('  {"name": "add"') == ("  ", 0)  # a reply opening with JSON: a call
    assert LLAMA3_JSON.stream_split(" ") == (" ", 0)
    assert LLAMA3_JSON.stream_split("It is 7 <|py") == ("It is 7 <|py", 8)
    assert LLAMA3_JSON.stream_split("It is {7}") == ("It is {7}", 9)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_streamed_required_call_is_not_content(name, family_engines):
    pytest.importorskip("xgrammar")
    from flashback_agents.layout import Message

    run = family_engines[name].stream_chat([Message("user", "add 3 and 4")], tools=TOOLS, tool_choice="any")
    assert "".join(run) == ""
    assert [c.name for c in run.reply.tool_calls] == ["add"]
