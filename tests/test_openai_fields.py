"""What an OpenAI client sends that changes the reply is honoured or refused, never ignored:
response_format (a grammar in llama.cpp's sampler chain; replies validated by `jsonschema`),
frequency/presence penalties and logit_bias (llama.cpp's samplers, against numpy's formula),
refused fields (400 naming the field), the developer role, the stream's first chunk,
system_fingerprint and CORS. Servers run here on 127.0.0.1."""

from __future__ import annotations

import json

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from flowmm_edge.bindings.sampling import Sampler, SamplingParams
from test_server import client, server

MSG = [{"role": "user", "content": "Describe a small red fox."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "description": "The local time in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    {"type": "object", "properties": {"score": {"type": "number"}}, "required": ["score"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"kind": {"const": "fox"}}, "required": ["kind"]},
    {"type": "string", "enum": ["yes", "no"]},
    {"type": "integer", "minimum": 10, "maximum": 99},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 8}},
     "required": ["a", "b"]},
    {"type": "object", "properties": {"legs": {"type": "integer", "minimum": 0, "maximum": 8},
                                      "wild": {"type": "boolean"}}, "required": ["legs", "wild"]},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
    {"type": "object", "properties": {"size": {"enum": ["small", "large"]},
                                      "colour": {"enum": ["red", "grey"]}}, "required": ["size", "colour"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["n"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["id"]},
        "minItems": 1, "maxItems": 2}}, "required": ["items"]},
    {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z]{1,6}$"}}, "required": ["word"]},
    {"type": "boolean"},
    {"type": "object", "properties": {"animal": {"enum": ["fox", "cat"]}, "count": {"type": "integer",
                                      "minimum": 1, "maximum": 3}}, "required": ["animal", "count"],
     "additionalProperties": False},
]


@pytest.fixture(scope="module")
def srv(tiny_models):
    with server(tiny_models, "-c", "1024", "-np", "2", "--budget", "96") as proc:
        yield proc


@pytest.fixture(scope="module")
def real(default_model_path, tiny_models):
    with server(tiny_models, "-m", str(default_model_path), "-c", "2048", "-np", "2", "-n", "64") as proc:
        yield proc


def check_schemas(real, schemas):
    c = client(real)
    for k, schema in enumerate(schemas):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": schema, "strict": True}}
        r = c.chat.completions.create(model="x", messages=MSG, max_tokens=64, temperature=0, response_format=fmt)
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        chunks = c.chat.completions.create(model="x", messages=MSG, max_tokens=64, temperature=0, response_format=fmt,
                                           stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        jsonschema.validate(json.loads(text), schema)


def test_json_schema_replies_validate_in_both_stream_modes(real):
    """Nested objects, arrays, enums, required fields, bounded integers (as enums), patterns."""
    check_schemas(real, [SCHEMAS[i] for i in (1, 7, 16)])


@pytest.mark.slow
def test_every_json_schema_reply_validates_in_both_stream_modes(real):
    assert len(SCHEMAS) >= 20
    check_schemas(real, SCHEMAS)


def test_json_object_is_json_and_unenforceable_schemas_are_refused(real):
    r = client(real).chat.completions.create(
        model="x", max_tokens=256, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give the colour of a red fox as a JSON object."}])
    assert r.choices[0].finish_reason == "stop" and json.loads(r.choices[0].message.content) is not None
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"]}
    r = client(real).chat.completions.create(  # llama-server's json_object with a schema: that schema enforced
        model="x", max_tokens=64, temperature=0, response_format={"type": "json_object", "schema": schema},
        messages=[{"role": "user", "content": "Give the colour of a red fox as a JSON object."}])
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    with pytest.raises(openai.BadRequestError, match="response_format.schema"):
        client(real).chat.completions.create(model="x", messages=MSG, max_tokens=4,
                                             response_format={"type": "json_object", "schema": 123})
    for schema, keyword in (({"type": "number", "minimum": 0.5}, "minimum"),
                            ({"type": "array", "uniqueItems": True}, "uniqueItems"),
                            ({"type": "integer", "minimum": 0, "maximum": 10 ** 9}, "minimum")):
        with pytest.raises(openai.BadRequestError, match=keyword):
            client(real).chat.completions.create(model="x", messages=MSG, max_tokens=4, response_format={
                "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})


def test_fields_that_change_the_reply_and_are_not_built_are_refused_by_name(srv):
    for field, value in (("functions", [{"name": "f"}]), ("function_call", "auto"), ("audio", {"voice": "x"})):
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSG, field: value}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field and field in r.json()["error"]["message"]
    for body, param in (({"tool_choice": "required"}, "tool_choice"), ({"tools": [{"type": "function"}]}, "tools"),
                        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"messages": MSG + [{"role": "assistant", "content": "x"}, {"role": "tool", "content": "1"}]},
                         "messages")):
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSG, **body}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    for fmt in ({"type": "sound"}, {"type": "json_schema"}, "json"):
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSG, "response_format": fmt}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSG, "logit_bias": {"99999999": 1}}, timeout=60)
    assert r.status_code == 400 and "logit_bias" in r.text
    # fields that change nothing are accepted
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                   json={"messages": MSG, "max_tokens": 2, "user": "u", "metadata": {"a": "b"}, "store": False,
                         "tool_choice": "none", "logprobs": False})
    assert r.status_code == 200


def test_developer_role_first_chunk_fingerprint_and_cors(srv):
    c = client(srv)
    msgs = [{"role": "developer", "content": "Answer briefly."}, *MSG]
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=4, temperature=0)
    assert r.system_fingerprint and r.choices[0].message.content is not None
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60,
                      json={"messages": msgs, "max_tokens": 4, "stream": True}) as s:
        first = json.loads(next(line for line in s.iter_lines() if line.startswith("data: "))[6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["system_fingerprint"]
    pre = httpx.options(srv.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    # as llama-server answers a preflight by default: the origin echoed, with credentials
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.test"
    assert pre.headers["access-control-allow-credentials"] == "true"


def test_the_api_key_is_still_required_after_a_preflight(tiny_models):
    with server(tiny_models, "-c", "512", "-np", "1", "--api-key", "sesame") as s:
        pre = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "http://example.test", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200
        assert httpx.post(s.url + "/v1/chat/completions", json={"messages": MSG}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").chat.completions.create(model="x", messages=MSG, max_tokens=2)


def reference_penalised(logits, history, freq, presence):
    """llama.cpp's penalties (llama-sampling.cpp): logit -= count * freq + (count > 0) * presence."""
    out = logits.astype(np.float64).copy()
    for t, n in zip(*np.unique(history, return_counts=True)):
        out[t] -= n * freq + presence
    return out


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    return z - z.max() - np.log(np.exp(z - z.max()).sum())


def test_logprobs_are_the_log_softmax_of_the_logits_read_separately(default_model_path):
    """A reply's logprobs (ReplyStream, the path serve takes) against log_softmax of the logits a
    fresh context computes for the same tokens, in numpy."""
    from flowmm_edge.app.session import Session
    from flowmm_edge.bindings import runtime

    with Session(default_model_path, n_ctx=1024, max_reply=12, n_threads=2, temperature=0.7, seed=3) as s:
        s.add_user_turn("Name three colours.")
        start = s.pos
        stream = s.reply_stream(12, s.engine.sampling, logprobs=4)
        while (tok := stream.next_token()) is not None:
            stream.accept(tok, s.ctx.decode([tok], s.pos, s.seq_id))
        entries = stream.take_logprobs()
        stream.close()
        tokens = s.tokens_by_pos.tolist()
    assert len(entries) == len(tokens) - start > 3
    with runtime.Model(default_model_path) as model, runtime.Context(model, n_ctx=1024, n_threads=2) as ctx:
        rows = [ctx.decode(tokens[:start], 0)]  # the prompt, then each reply token: the batches a reply decodes
        rows += [ctx.decode([tok], pos) for pos, tok in enumerate(tokens[start:-1], start)]
    for (tok, lp, top), row, want_tok in zip(entries, rows, tokens[start:]):
        ref = _log_softmax(row)
        assert tok == want_tok and abs(lp - ref[tok]) < 2e-3
        assert [t for t, _ in top] == list(np.argsort(-ref, kind="stable")[:4])
        np.testing.assert_allclose([v for _, v in top], np.sort(ref)[::-1][:4], atol=2e-3)


def test_the_server_sends_logprobs_in_openais_shape_streamed_or_not(real):
    c = client(real)
    r = c.chat.completions.create(model="x", messages=MSG, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content and len(content) == 8
    for e in content:  # greedy: the chosen token is the most probable one
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token
        assert e.logprob == e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob and bytes(e.bytes).decode() == e.token
    chunks = list(c.chat.completions.create(model="x", messages=MSG, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=2, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    plain = c.chat.completions.create(model="x", messages=MSG, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        c.chat.completions.create(model="x", messages=MSG, max_tokens=4, top_logprobs=2)


def _assembled(chunks):
    """(content, tool calls, finish_reason) of a stream, as an OpenAI client assembles it."""
    content, calls, finish = "", {}, None
    for ch in chunks:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            calls[tc.index]["name"] += tc.function.name or ""
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_round_trip_with_the_openai_client(real, stream):
    """tools -> tool_calls -> a tool message -> the final answer, the official client, streamed and
    not; the second request reuses the cache the first left (the resent call matches the reply)."""
    c = client(real)
    # (the 0.5B model calls the tool again after its result unless the system prompt says not to)
    msgs = [{"role": "system", "content": "Call a tool only when you lack its result; then answer the user in one "
                                          "sentence."},
            {"role": "user", "content": "What is the weather in Paris right now?"}]
    kw = dict(model="x", tools=TOOLS, temperature=0, max_tokens=64)
    r = c.chat.completions.create(messages=msgs, tool_choice="required", stream=stream, **kw)
    if stream:
        content, calls, finish = _assembled(r)
    else:
        m = r.choices[0].message
        content, finish = m.content, r.choices[0].finish_reason
        calls = [{"id": x.id, "name": x.function.name, "arguments": x.function.arguments} for x in m.tool_calls]
    assert finish == "tool_calls" and not content and len(calls) >= 1, (content, calls)
    call = calls[0]
    assert call["name"] in ("get_weather", "get_time") and call["id"].startswith("call_")
    assert isinstance(json.loads(call["arguments"])["city"], str)
    msgs += [{"role": "assistant", "content": None, "tool_calls": [
                 {"id": x["id"], "type": "function", "function": {"name": x["name"], "arguments": x["arguments"]}}
                 for x in calls]}] + [{"role": "tool", "tool_call_id": x["id"], "content": "18 degrees, sunny"}
                                      for x in calls]
    r2 = c.chat.completions.create(messages=msgs, **kw)
    assert r2.choices[0].finish_reason == "stop" and not r2.choices[0].message.tool_calls, r2.choices[0].message
    assert "18" in r2.choices[0].message.content, r2.choices[0].message.content
    assert r2.usage.prompt_tokens_details.cached_tokens > 0  # the slot kept the call's turn


def test_a_named_tool_choice_calls_that_tool_and_auto_parses_what_the_model_writes(real):
    c = client(real)
    named = {"type": "function", "function": {"name": "get_time"}}
    r = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=TOOLS,
                                  tool_choice=named, temperature=0, max_tokens=64)
    assert [x.function.name for x in r.choices[0].message.tool_calls] == ["get_time"]
    r = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=TOOLS,
                                  temperature=0, max_tokens=64)  # auto: whatever the model writes, parsed
    m = r.choices[0].message
    assert (r.choices[0].finish_reason == "tool_calls") == bool(m.tool_calls)
    assert "<tool_call>" not in (m.content or "")


def test_hermes_calls_parse_and_render_back_as_the_template_writes_them():
    from flowmm_edge.app import tool_calls

    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = tool_calls.Hermes.parse(text)
    assert content == "Let me check." and [n for n, _ in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0][1]) == {"city": "Paris"}
    assert tool_calls.Hermes.render(content, calls) == text.replace("</tool_call>\n<tool", "</tool_call>\n<tool")
    assert tool_calls.Hermes.parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


def test_penalties_and_logit_bias_draw_as_llama_cpps_formula_says():
    rng = np.random.default_rng(0)
    n = 64
    for trial in range(20):
        logits = rng.normal(size=n).astype(np.float32)
        history = rng.integers(0, n, size=6)
        freq, presence = rng.uniform(0, 2), rng.uniform(0, 2)
        s = Sampler(n, SamplingParams(frequency_penalty=freq, presence_penalty=presence))
        for t in history:
            s.accept(int(t))
        want = int(np.argmax(reference_penalised(logits, history, freq, presence)))
        assert s.sample(logits) == want, trial
        s.close()
        bias = {int(t): float(b) for t, b in zip(rng.integers(0, n, 3), rng.uniform(-5, 5, 3))}
        b = Sampler(n, SamplingParams(logit_bias=tuple(bias.items())))
        shifted = logits.astype(np.float64).copy()
        for t, v in bias.items():
            shifted[t] += v
        assert b.sample(logits) == int(np.argmax(shifted)), trial
        b.close()


def test_session_and_chat_take_a_schema_for_every_reply(default_model_path, tmp_path):
    """Session.reply(response_format=) for one reply; chat's --json-schema (llama-cli's) for every
    reply: the grammar starts afresh at each reply, so the second is valid too."""
    import subprocess
    import sys

    from flowmm_edge.app.session import Session

    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Berlin"]}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    with Session(default_model_path, n_ctx=1024, max_reply=32, n_threads=2) as s:
        for question in ("Capital of France?", "Capital of Italy?"):
            s.add_user_turn(question)
            jsonschema.validate(json.loads("".join(s.reply(response_format=fmt))), schema)
    script = tmp_path / "in.txt"
    script.write_text("Capital of France?\nCapital of Germany?\n/quit\n")
    r = subprocess.run([sys.executable, "-m", "flowmm_edge", "chat", "-m", str(default_model_path), "-n", "32",
                        "--json-schema", json.dumps(schema)], stdin=script.open(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    replies = [json.loads(line[line.index("{"):]) for line in r.stdout.splitlines() if "{" in line]
    assert len(replies) == 2 and [x["city"] for x in replies] == ["Paris", "Berlin"], r.stdout
    for x in replies:
        jsonschema.validate(x, schema)


def test_completions_continue_a_prompt_as_llama_cpp_does_greedily(real, default_model_path):
    """/v1/completions: the prompt continued without the chat template; greedy text equals a fresh
    context's greedy continuation (llama.cpp directly); streamed equals not; a prompt extending
    the last one (prompt + reply) reuses the slot's cache; logprobs in the legacy shape."""
    from flowmm_edge.bindings import runtime

    c = client(real)
    prompt = "The three primary colours are"
    r = c.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
    with runtime.Model(default_model_path) as model, runtime.Context(model, n_ctx=256, n_threads=2) as ctx:
        tokens = model.tokenize(prompt, add_special=True)
        want, _ = ctx.greedy(ctx.decode(tokens, 0), len(tokens), 12)
        want_text = model.detokenize([t for t in want if not model.is_end_of_generation(t)])
    text = r.choices[0].text
    assert r.object == "text_completion" and text == want_text and r.usage.completion_tokens == len(want)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == text and len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.tokens)
    assert all(max(top.values()) == pytest.approx(v, abs=1e-6) for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="x", prompt=prompt, max_tokens=12,
                                                                          temperature=0, stream=True) if ch.choices)
    assert streamed == text
    again = c.completions.create(model="x", prompt=prompt + text + " and", max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= len(tokens)
    for body in ({"echo": True}, {"suffix": "x"}, {"prompt": [1, 2, 3]}, {"n": 5}):
        resp = httpx.post(real.url + "/v1/completions", json={"prompt": prompt, **body}, timeout=60)
        assert resp.status_code == 400, (body, resp.text)


def test_text_parts_are_joined_by_newlines_but_not_next_to_an_image():
    """llama.cpp's common/chat joins a message's text parts with a newline, none beside a media marker."""
    import io

    from PIL import Image

    from flowmm_edge.app import chat_api
    from flowmm_edge.app.chat_template import MEDIA, message_text

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    url = "data:image/png;base64," + __import__("base64").b64encode(buf.getvalue()).decode()
    turns = chat_api.parse_messages([{"role": "user", "content": [
        {"type": "text", "text": "What is"}, {"type": "text", "text": "the best book"},
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "in it?"},
        {"type": "text", "text": "Say."}]}])
    assert message_text(turns[0].segments) == f"What is\nthe best book{MEDIA}in it?\nSay."
    turns = chat_api.parse_messages([{"role": "user", "content": [  # an image counts as text before a part
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": ""}, {"type": "text", "text": "a"}]}])
    assert message_text(turns[0].segments) == f"{MEDIA}\na"


def test_n_choices_are_the_replies_of_single_requests_seeded_in_turn(real):
    """`n`: choice i is what a request of its own with seed + i answers (and greedy choices are
    the greedy reply), decoded together; usage counts the prompt once and every reply."""
    c = client(real)
    msgs = [{"role": "user", "content": "Name a colour."}]
    afresh = {"cache_prompt": False}  # (a kept prefix, decoded in another batch, may move a sampled token)
    alone = [c.chat.completions.create(model="x", messages=msgs, max_tokens=6, temperature=1.5, seed=7 + i,
                                       extra_body=afresh) for i in range(3)]
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=6, temperature=1.5, seed=7, n=3,
                                  extra_body=afresh)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.message.content for ch in r.choices] == [a.choices[0].message.content for a in alone]
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    greedy = c.completions.create(model="x", prompt="The capital of France is", max_tokens=4, temperature=0,
                                  extra_body=afresh)
    both = c.completions.create(model="x", prompt="The capital of France is", max_tokens=4, temperature=0, n=2,
                                extra_body=afresh)
    assert [ch.text for ch in both.choices] == [greedy.choices[0].text] * 2
    streamed = ["", "", ""]  # streamed, each chunk names its choice; the usage chunk counts every reply
    chunks = list(c.chat.completions.create(model="x", messages=msgs, max_tokens=6, temperature=1.5, seed=7, n=3,
                                            stream=True, stream_options={"include_usage": True}, extra_body=afresh))
    for ch in chunks:
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [ch.message.content for ch in r.choices]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
