"""Session.create_chat_completion: llama-cpp-python's dict shapes (its own Llama is the
reference), prefix reuse that answers as a fresh session does, stop strings, streaming, and bad
requests that change nothing."""

from __future__ import annotations

import base64
import contextlib

import pytest
from llama_cpp import Llama

from flowmm_edge.app.chat_api import RequestError
from flowmm_edge.app.session import Session
from flowmm_edge.bindings import images

from greedy_reference import GreedyReference

PNG = "data:image/png;base64," + base64.b64encode(images.pattern(3)).decode()


def session(tiny_models, **kw) -> Session:
    return Session(tiny_models[0], tiny_models[1], budget=kw.pop("budget", 80), n_ctx=512, max_reply=12,
                   n_threads=2, schedule="blocking", **kw)


def first_turns() -> list[dict]:
    return [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}},
                                         {"type": "text", "text": "what is in the picture of the city"}]}]


def shape(x):
    """The nested keys of a dict (lists by their first element): what a client reads."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shape(x[0])] if x else []
    return type(x).__name__ if x is not None else None


def test_the_dicts_have_llama_cpp_pythons_shape(tiny_models):
    msgs = [{"role": "user", "content": "hello there"}]
    with contextlib.closing(Llama(model_path=str(tiny_models[0]), n_ctx=256, verbose=False)) as llm:
        ref = llm.create_chat_completion(msgs, max_tokens=4, temperature=0)
        ref_chunks = list(llm.create_chat_completion(msgs, max_tokens=4, temperature=0, stream=True))
    with session(tiny_models) as s:
        ours = s.create_chat_completion(msgs, max_tokens=4, temperature=0)
        chunks = list(s.create_chat_completion(msgs, max_tokens=4, temperature=0, stream=True))
    for d in (ref, ours):  # the content's and the logprobs' types may differ; the keys may not
        d["choices"][0]["logprobs"] = None
    assert set(ours) == set(ref) and shape(ours["choices"]) == shape(ref["choices"])
    usage = shape(ours["usage"])
    assert {k: usage[k] for k in shape(ref["usage"])} == shape(ref["usage"])  # and OpenAI's prompt_tokens_details
    assert ours["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert ours["object"] == ref["object"] and ours["choices"][0]["finish_reason"] in ("stop", "length")
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * len(chunks)
    assert chunks[0]["choices"][0]["delta"] == ref_chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert set(chunks[-1]["choices"][0]) == set(ref_chunks[-1]["choices"][0])
    assert chunks[-1]["choices"][0]["finish_reason"] is not None and chunks[-1]["choices"][0]["delta"] == {}


@pytest.mark.parametrize("method", ["full", "flowmm"])
def test_a_resent_history_decodes_only_its_new_turn(tiny_models, method):
    msgs = first_turns()
    with session(tiny_models, method=method, budget=80 if method == "flowmm" else 400) as s:
        r1 = s.create_chat_completion(msgs, max_tokens=6, temperature=0)
        msgs += [r1["choices"][0]["message"], {"role": "user", "content": "and what colour is the cat"}]
        r2 = s.create_chat_completion(msgs, max_tokens=6, temperature=0)
        assert s.report()["merges"] >= (method == "flowmm")  # the budget forced merges on the way
    new_turn = msgs[-1:]
    with session(tiny_models, method=method, budget=80 if method == "flowmm" else 400) as alone:
        # the new turn's own tokens, less the BOS a conversation's first turn carries
        alone_tokens = alone.create_chat_completion(new_turn, max_tokens=1)["usage"]["prompt_tokens"]
    u1, u2 = r1["usage"], r2["usage"]
    assert u2["prompt_tokens_details"]["cached_tokens"] == u1["prompt_tokens"] + u1["completion_tokens"]
    assert u2["prompt_tokens"] - u2["prompt_tokens_details"]["cached_tokens"] < alone_tokens + 8 < u1["prompt_tokens"]


@pytest.mark.parametrize("question", [
    "And what is the capital of Italy? One word.",  # the default run's one real-model case
    pytest.param("And how many legs has a spider? A number.", marks=pytest.mark.slow),
])
def test_on_the_default_model_a_reused_history_answers_as_a_fresh_prefill(default_model_path, question):
    """Real replies re-tokenize to the tokens generated, so a reused cache (no merge: a large
    budget) must be the fresh prefill's and give the very same greedy answer."""
    msgs = [{"role": "user", "content": "What is the capital of France? One word."}]
    with Session(default_model_path, budget=1024, n_ctx=2048, max_reply=12, n_threads=2) as s:
        r1 = s.create_chat_completion(msgs, max_tokens=12, temperature=0)
        msgs += [r1["choices"][0]["message"], {"role": "user", "content": question}]
        r2 = s.create_chat_completion(msgs, max_tokens=12, temperature=0)
        s.reset()
        r2_fresh = s.create_chat_completion(msgs, max_tokens=12, temperature=0)
        u1, u2, fresh = r1["usage"], r2["usage"], r2_fresh["usage"]
        assert u2["prompt_tokens_details"]["cached_tokens"] == u1["prompt_tokens"] + u1["completion_tokens"]
        assert fresh["prompt_tokens_details"]["cached_tokens"] == 0
        assert fresh["prompt_tokens"] == u2["prompt_tokens"]  # the reply re-tokenized to the tokens generated
    assert r2["choices"][0]["message"]["content"] == r2_fresh["choices"][0]["message"]["content"]


def test_a_changed_history_starts_afresh_from_its_first_different_token(tiny_models):
    """A history that does not extend the cached one starts afresh, keeping the cells of the
    tokens both begin with (the system message), as llama-server's cache_prompt does: fewer
    positions decoded than a fresh session's, and the reply is the edited conversation's decoded
    alone (greedy_reference: a kept prefix was decoded in another batch)."""
    msgs = first_turns()
    with session(tiny_models, method="full") as s:
        r1 = s.create_chat_completion(msgs, max_tokens=6, temperature=0)
        edited = [msgs[0], {"role": "user", "content": "a different first question"}, r1["choices"][0]["message"],
                  {"role": "user", "content": "and then"}]
        r2 = s.create_chat_completion(edited, max_tokens=6, temperature=0, logprobs=True)
    with session(tiny_models, method="full") as fresh:
        r2_fresh = fresh.create_chat_completion(edited, max_tokens=6, temperature=0)
    u, uf = r2["usage"], r2_fresh["usage"]
    assert u["prompt_tokens"] == uf["prompt_tokens"] and uf["prompt_tokens_details"]["cached_tokens"] == 0
    assert 0 < u["prompt_tokens_details"]["cached_tokens"] < u["prompt_tokens"]
    with GreedyReference(tiny_models[0], 6) as ref:
        ref.feed(edited)
        ref.check(pieces=[bytes(e["bytes"]) for e in r2["choices"][0]["logprobs"]["content"]])


def test_stop_strings_cut_the_reply_in_both_modes_and_the_same_seed_draws_the_same(tiny_models):
    msgs = [{"role": "user", "content": "tell me about the dogs"}]
    with session(tiny_models) as s:
        plain = s.create_chat_completion(msgs, max_tokens=12, temperature=0)["choices"][0]["message"]["content"]
        assert len(plain) >= 6
        stop = plain[3:5]
        cut = s.create_chat_completion(msgs, max_tokens=12, temperature=0, stop=[stop, "\x01never"])
        assert cut["choices"][0]["message"]["content"] == plain[:plain.find(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"
        pieces = [c["choices"][0]["delta"].get("content", "") for c in
                  s.create_chat_completion(msgs, max_tokens=12, temperature=0, stop=stop, stream=True)]
        assert "".join(pieces) == plain[:plain.find(stop)]
        hot = [s.create_chat_completion(msgs, max_tokens=8, temperature=1.5, seed=7)["choices"][0]["message"]
               for _ in range(2)]
        assert hot[0] == hot[1]


@pytest.mark.parametrize("bad, message", [
    ([{"role": "assistant", "content": "hi"}], "must follow a user message"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}], "last message"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
     "base64"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "https://example.com/a.png"}]}], "network"),
    ([{"role": "robot", "content": "hi"}], "role"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported"),
    ([], "non-empty"),
])
def test_a_bad_request_names_the_problem_and_changes_nothing(tiny_models, bad, message):
    msgs = first_turns()
    with session(tiny_models) as s:
        r1 = s.create_chat_completion(msgs, max_tokens=4, temperature=0)
        before, state = s.report(), s.ctx.state()
        with pytest.raises(RequestError, match=message):
            s.create_chat_completion(bad)
        assert s.report() == before and s.ctx.state() == state
        msgs += [r1["choices"][0]["message"], {"role": "user", "content": "next"}]
        u = s.create_chat_completion(msgs, max_tokens=4)["usage"]
        assert u["prompt_tokens_details"]["cached_tokens"] == r1["usage"]["total_tokens"]  # still reused


def test_an_unreadable_image_changes_nothing(tiny_models):
    msgs = first_turns()
    with session(tiny_models) as s:
        r1 = s.create_chat_completion(msgs, max_tokens=4, temperature=0)
        before, state = s.report(), s.ctx.state()
        junk = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
        with pytest.raises(Exception, match="image"):
            s.create_chat_completion(msgs + [r1["choices"][0]["message"],
                                             {"role": "user", "content": [{"type": "image_url", "image_url": junk}]}])
        assert s.report() == before and s.ctx.state() == state


def test_a_final_assistant_message_is_continued_as_llama_cpp_continues_it(default_model_path):
    """The reply goes on from the partial assistant message (llama-server's and vLLM's reading):
    greedy tokens equal a fresh context's greedy continuation of the same two decodes (the
    template's turn, then the partial text), and the next request sees one assistant message."""
    from flowmm_edge.bindings import runtime

    user = {"role": "user", "content": "Name the colour of a clear daytime sky."}
    partial = "The colour of a clear daytime sky is"
    with Session(default_model_path, n_ctx=1024, max_reply=8, n_threads=2) as s:
        r = s.create_chat_completion([user, {"role": "assistant", "content": partial}], max_tokens=8)
        got = r["choices"][0]["message"]["content"]
        rendered = s.template.render(s.model, [("user", user["content"])], add_assistant=True)
        again = s.create_chat_completion([user, {"role": "assistant", "content": partial + got},
                                          {"role": "user", "content": "And at night?"}], max_tokens=4)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # one message: the cache kept it
        model = s.model
        with runtime.Context(model, n_ctx=512, n_threads=2) as ctx:
            a = model.tokenize(rendered, add_special=True)
            b = model.tokenize(partial, add_special=False)
            ctx.decode(a, 0)
            want, _ = ctx.greedy(ctx.decode(b, len(a)), len(a) + len(b), 8)
        assert got == model.detokenize(want) and got.strip()  # inside: the session frees its model


def test_a_system_message_mid_history_is_rendered_where_the_template_puts_it(tiny_models, tmp_path):
    """A template that renders every system message first re-renders earlier turns: the request is
    decoded afresh (not refused), and answers as a fresh session does."""
    tmpl = tmp_path / "systems-first.jinja"
    tmpl.write_text("{% for m in messages if m.role == 'system' %}SYSTEM: {{ m.content }}\n{% endfor %}"
                    "{% for m in messages if m.role != 'system' %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")
    first = [{"role": "user", "content": "hello there"}]
    with session(tiny_models, chat_template=str(tmpl), temperature=0) as s:
        r1 = s.create_chat_completion(first)
        later = first + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                         {"role": "system", "content": "answer in one word"}, {"role": "user", "content": "and now"}]
        r2 = s.create_chat_completion(later)
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # afresh
    with session(tiny_models, chat_template=str(tmpl), temperature=0) as fresh:
        assert fresh.create_chat_completion(later)["choices"][0]["message"] == r2["choices"][0]["message"]


def test_the_python_api_takes_tools_and_logprobs_as_the_server_does(default_model_path):
    """Session.create_chat_completion(tools=, tool_choice=, logprobs=): llama-cpp-python's
    fields, in the shapes the server returns."""
    import json

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    with Session(default_model_path, n_ctx=1024, max_reply=48, n_threads=2) as s:
        msgs = [{"role": "user", "content": "Weather in Oslo?"}]
        r = s.create_chat_completion(msgs, tools=tools, tool_choice="required", logprobs=True, top_logprobs=1)
        choice = r["choices"][0]
        (call,) = choice["message"]["tool_calls"]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert call["function"]["name"] == "get_weather" and isinstance(json.loads(call["function"]["arguments"]), dict)
        assert len(choice["logprobs"]["content"]) == r["usage"]["completion_tokens"]
        chunks = list(s.create_chat_completion(msgs, tools=tools, tool_choice="required", stream=True))
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert any("tool_calls" in d for d in deltas) and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert not "".join(d.get("content") or "" for d in deltas)
        with pytest.raises(RequestError, match="tool_choice needs tools"):
            s.create_chat_completion(msgs, tool_choice="required")
