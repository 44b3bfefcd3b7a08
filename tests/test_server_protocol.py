"""The server wire protocol as pure functions (no server): payloads and SSE parsing for both dialects."""

from __future__ import annotations

import json

import pytest

from flashback_agents.backends.server import ServerRequestError, ServerStreamError
from flashback_agents.backends.server.protocol import (Prepared, ServerInfo, StreamState, build_payload,
                                                       cache_figures, finish_reason, http_error, read_event,
                                                       split_url, stream_events)
from flashback_agents.generation import GenerationConfig


def _info(flavor: str) -> ServerInfo:
    base, api = split_url("http://127.0.0.1:9/v1/")
    return ServerInfo(url="http://127.0.0.1:9/v1", base_url=base, api_url=api, flavor=flavor, model_id="m", n_ctx=100)


def _sse(*events) -> list[str]:
    return [": keep-alive", *(f"data: {json.dumps(e)}" for e in events), "data: [DONE]", "data: {\"never\": 1}"]


def test_payloads_per_dialect():
    cfg = GenerationConfig(max_new_tokens=8, stop=["END"], seed=3, top_k=5, min_new_tokens=2)
    warned = []
    url, body = build_payload(_info("llama.cpp"), [1, 2], cfg, Prepared(schema={"type": "object"}),
                              lambda k, m: warned.append(k))
    assert url == "http://127.0.0.1:9/completion" and body["cache_prompt"] and body["n_predict"] == 8
    assert body["json_schema"]["x-guidance"]["key_separator"] == ": " and warned == ["min_tokens"]
    url, body = build_payload(_info("vllm"), [1, 2], cfg, Prepared(), lambda k, m: warned.append(k))
    assert url == "http://127.0.0.1:9/v1/completions" and body["return_token_ids"] and body["min_tokens"] == 2
    assert body["stop"] == ["END"] and body["stream_options"] == {"include_usage": True}
    _, body = build_payload(_info("sglang"), "text", GenerationConfig(max_new_tokens=4, min_new_tokens=4),
                            Prepared(schema={"type": "object"}), lambda k, m: None)
    assert body["ignore_eos"] and json.loads(body["json_schema"]) == {"type": "object"}
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}


def test_openai_stream_is_parsed_into_text_ids_finish_and_cache_figures():
    usage = {"prompt_tokens": 30, "prompt_tokens_details": {"cached_tokens": 20}}
    state = StreamState()
    texts = [read_event(ev, state, llama=False) for ev in stream_events(_sse(
        {"choices": [{"text": "Hi END", "token_ids": [5, 6]}]},
        {"choices": [{"text": "", "finish_reason": "stop"}]},
        {"choices": [], "usage": usage}), "u")]
    assert texts == ["Hi END", "", ""] and state.raw == "Hi END" and state.gen_ids == [5, 6] and state.got_ids
    assert state.complete(llama=False)
    assert finish_reason(state, False, 100, False, ["END"]) == ("stop", "END")
    assert cache_figures(state, 30)[:2] == (20, 10)


def test_llama_stream_finish_and_timings():
    state = StreamState()
    for ev in stream_events(_sse({"content": "ab", "tokens": [1, 2], "stop": False},
                                 {"content": "", "stop": True, "stop_type": "limit", "tokens_evaluated": 90,
                                  "tokens_predicted": 10, "timings": {"cache_n": 7, "prompt_n": 3,
                                                                      "prompt_ms": 50, "predicted_ms": 20}}), "u"):
        read_event(ev, state, llama=True)
    assert state.complete(llama=True) and finish_reason(state, True, 100, False, []) == ("context", None)
    assert cache_figures(state, 10) == (7, 3, 0.05, 0.02)
    assert not StreamState().complete(llama=True)


def test_bad_streams_and_http_errors():
    with pytest.raises(ServerStreamError, match="malformed"):
        list(stream_events(["data: [1]"], "u"))
    with pytest.raises(ServerRequestError, match="mid-stream: boom"):
        list(stream_events(["error: boom"], "u"))
    err = http_error(_info("vllm"), "u", 400, json.dumps({"error": {"message": "maximum context length"}}), 120)
    assert (err.needed, err.limit) == (121, 100)
    assert "HTTP 500" in str(http_error(_info("vllm"), "u", 500, "oops", 1))
