"""Which chat template renders a conversation, decided as llama.cpp's tools decide it.

    tmpl = choose(model, requested=None, vision=True)   # requested: --chat-template NAME|FILE
    text = tmpl.render(model, [("user", "hi")], add_assistant=True)
    print(tmpl.why)                                     # said on stderr by `chat`

- A name from llama.cpp's built-in list (`llama_chat_builtin_templates`: chatml, llama2,
  vicuna, gemma, llama3, ...) is applied by `llama_chat_apply_template`, as `llama-cli
  --chat-template NAME` does.
- A file holds a Jinja template (a model card's `chat_template`). It is rendered with jinja2 in
  a sandbox, with `messages`, `add_generation_prompt`, `bos_token` and `eos_token`, which is
  how llama-cpp-python's Jinja2ChatFormatter renders it.
- Otherwise the GGUF's own template (`tokenizer.chat_template`).
- A GGUF without one: a llama-architecture model given an mmproj is LLaVA-1.5-style and gets
  vicuna. That is the format LLaVA-1.5 was trained on, and what llama.cpp's mtmd tools tell
  such models to use. Anything else gets chatml, llama.cpp's fallback. `why` says which and why.
"""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

from ..models import gguf_file
from ..errors import FlowMMError
from ..bindings.native import llama_cpp


MEDIA = "<__media__>"  # the marker an image's place takes in a message's text (mtmd's default)


class ChatTemplateError(FlowMMError):
    pass


def message_text(segments) -> str:
    """A message's text as the template renders it: its text segments, and MEDIA for each image."""
    return "".join(MEDIA if s.kind == "image" else s.text for s in segments)


def _jinja():
    """The sandboxed Jinja environment a template file is checked and rendered in."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def builtin_names() -> list[str]:
    n = llama_cpp.llama_chat_builtin_templates(None, 0)
    out = (ctypes.c_char_p * n)()
    llama_cpp.llama_chat_builtin_templates(out, n)
    return [x.decode() for x in out]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    name: str          # a built-in name, "gguf" or the file's path
    jinja: str | None  # the template text for a file, else None (llama.cpp applies `name` or the GGUF's)
    why: str

    def jinja_text(self, model) -> str | None:
        """The Jinja text this template renders with: a file's, or the GGUF's own."""
        if self.jinja is not None:
            return self.jinja
        return model.chat_template() if self.name == "gguf" else None

    def render(self, model, messages: list[tuple[str, str]], add_assistant: bool, tools: list | None = None) -> str:
        """The conversation as the model reads it. With `tools` (OpenAI's, app/tool_calls.py) the
        Jinja template (a file's, else the GGUF's own) renders them through its `tools` variable,
        and every message of that conversation with them, as llama-server renders with --jinja."""
        if self.jinja is None and tools is None:
            return model.format_chat(messages, add_assistant, None if self.name == "gguf" else self.name)
        text = self.jinja_text(model)
        if text is None:
            raise ChatTemplateError(f"chat template {self.name} is not a Jinja template, so it cannot render tools")
        try:
            return _jinja().from_string(text).render(
                messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=add_assistant,
                bos_token=model.special_text("bos"), eos_token=model.special_text("eos"),
                **({"tools": tools} if tools is not None else {}))
        except Exception as e:  # a template error of any kind is the file's problem, named as such
            raise ChatTemplateError(f"chat template {self.name}: {type(e).__name__}: {e}") from None


def choose(model, model_path: str | Path, requested: str | None = None, vision: bool = False) -> ChatTemplate:
    """The template for `model` (see the module docstring); a bad request is a one-line error."""
    if requested:
        if requested in builtin_names():
            return ChatTemplate(requested, None, f"chat template: {requested} (--chat-template)")
        path = Path(requested)
        if not path.is_file():
            raise ChatTemplateError(f"--chat-template {requested!r} is neither a file nor one of llama.cpp's names "
                                    f"({', '.join(builtin_names())})")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"--chat-template {requested}: cannot read it as UTF-8 text ({e})") from None
        from jinja2 import TemplateSyntaxError

        try:
            _jinja().parse(text)
        except TemplateSyntaxError as e:
            raise ChatTemplateError(f"--chat-template {requested}: not a Jinja template (line {e.lineno}: {e.message})") from None
        return ChatTemplate(str(path), text, f"chat template: {path} (Jinja, --chat-template)")
    if model.chat_template():
        return ChatTemplate("gguf", None, "chat template: the model's own (from its GGUF)")
    arch = gguf_file.read_text_model(model_path).architecture
    if vision and arch == "llama":
        return ChatTemplate("vicuna", None, "chat template: vicuna (the GGUF has none; a llama model with an mmproj "
                                            "is LLaVA-1.5-style; --chat-template overrides)")
    return ChatTemplate("chatml", None, "chat template: chatml (the GGUF has none; llama.cpp's fallback; "
                                        "--chat-template overrides)")
