"""Chat templates: the choice (--chat-template NAME|FILE, the GGUF's own, LLaVA-1.5-style
detection) and the rendered prompt against llama.cpp's own llama_chat_apply_template for the
named template, called here directly; a Jinja file against the text it must produce."""

from __future__ import annotations

import ctypes

import pytest

from flowmm_edge.models import tiny as tm
from flowmm_edge.app import chat_template
from flowmm_edge.bindings import runtime
from flowmm_edge.bindings.native import llama_cpp
from flowmm_edge.app.session import Session

MESSAGES = [("system", "Be brief."), ("user", "What is in the picture?"), ("assistant", "A cat."), ("user", "Colour?")]


def _llama_cpp_render(name: str, messages, add_assistant: bool) -> str:
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(r.encode(), c.encode()) for r, c in messages])
    buf = ctypes.create_string_buffer(8192)
    n = llama_cpp.llama_chat_apply_template(name.encode(), chat, len(messages), add_assistant, buf, len(buf))
    assert 0 < n <= len(buf)
    return buf.raw[:n].decode()


@pytest.fixture(scope="module")
def no_template_model(tmp_path_factory):
    """The tiny llama model written without tokenizer.chat_template, as LLaVA-1.5's GGUFs ship."""
    path = tm.write_text_model(tm.TINY.text, tmp_path_factory.mktemp("nt") / "llava15-like.gguf", chat_template="")
    with runtime.Model(path) as m:
        yield path, m


def test_a_llava15_like_model_gets_vicuna_and_says_so(no_template_model):
    path, m = no_template_model
    assert m.chat_template() is None
    t = chat_template.choose(m, path, vision=True)
    assert t.name == "vicuna" and "vicuna" in t.why and "has none" in t.why
    assert t.render(m, MESSAGES, True) == _llama_cpp_render("vicuna", MESSAGES, True)
    plain = chat_template.choose(m, path, vision=False)  # no mmproj: llama.cpp's fallback
    assert plain.name == "chatml" and plain.render(m, MESSAGES, True) == _llama_cpp_render("chatml", MESSAGES, True)


@pytest.mark.parametrize("name", ["chatml", "llama2", "vicuna", "gemma", "llama3", "mistral-v7"])
def test_a_named_template_renders_as_llama_cpp_renders_it(model, tiny_models, name):
    t = chat_template.choose(model, tiny_models[0], requested=name)
    assert t.render(model, MESSAGES, True) == _llama_cpp_render(name, MESSAGES, True)
    assert t.render(model, MESSAGES[:2], False) == _llama_cpp_render(name, MESSAGES[:2], False)


def test_the_gguf_template_is_used_by_default(model, tiny_models):
    t = chat_template.choose(model, tiny_models[0], vision=True)
    assert t.name == "gguf" and "own" in t.why
    assert t.render(model, MESSAGES, True) == _llama_cpp_render(model.chat_template(), MESSAGES, True)


def test_a_jinja_file_and_bad_requests(model, tiny_models, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
    t = chat_template.choose(model, tiny_models[0], requested=str(f))
    want = model.special_text("bos") + "".join(f"[{r}] {c}\n" for r, c in MESSAGES) + "[assistant]"
    assert t.render(model, MESSAGES, True) == want
    assert model.special_text("bos") == "<s>"
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    for req, message in ((str(bad), "not a Jinja template"), ("no-such-template", "neither a file nor one of")):
        with pytest.raises(chat_template.ChatTemplateError, match=message):
            chat_template.choose(model, tiny_models[0], requested=req)


def test_the_session_renders_turns_with_the_chosen_template(no_template_model, tiny_models):
    path, _ = no_template_model
    with Session(path, tiny_models[1], budget=48, n_ctx=256, max_reply=4, n_threads=2) as s:
        assert s.template.name == "vicuna"
        s.add_user_turn("hello")
        assert s.cached_text == _llama_cpp_render("vicuna", s.messages, True)
    with pytest.raises(chat_template.ChatTemplateError, match="neither a file"):
        Session(path, budget=48, n_ctx=256, chat_template="nonsense")
