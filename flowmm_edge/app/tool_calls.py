"""Tool calls in the model's own syntax, one parser per chat-template family (llama.cpp's
common/chat keeps one per family too).

    family = family_for(template_text)            # None: this template has no syntax we parse
    tools = check_tools(request["tools"])          # OpenAI's [{"type": "function", "function": {...}}]
    text = family.render(content, calls)           # an assistant message's calls, as the model writes them
    content, calls = family.parse(reply_text)      # and back
    grammar = family.grammar(tools, choice)        # tool_choice "required" or a named function

Tools are rendered by the model's own chat template (its `tools` variable, app/chat_template.py).
Hermes, which Qwen2.5 and many others follow, writes each call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A reply's calls become OpenAI's `message.tool_calls` (arguments as a JSON string) and its
finish_reason "tool_calls". tool_choice "required" or a named function is enforced by a grammar
from the first token (the reply is one or more calls and nothing else); under "auto" the model
writes freely until it opens a call, and from the opening tag on the same grammar holds (a lazy
grammar, llama.cpp's trigger patterns, as llama-server does); "none" renders the tools and parses
nothing.
"""

from __future__ import annotations

import json
import re

from .chat_api import FormatError, RequestError, enforceable

CHOICES = ("auto", "none", "required")


def check_tools(tools) -> list[dict]:
    """OpenAI's `tools`, checked: function tools with a name and an object of parameters."""
    if not isinstance(tools, list) or not tools:
        raise RequestError("tools must be a non-empty list")
    out, names = [], set()
    for t in tools:
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        name = f.get("name") if isinstance(f, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise RequestError("each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}} "
                               "with a name of letters, digits, _ . -")
        if name in names:
            raise RequestError(f"tool {name!r} is given twice")
        names.add(name)
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise RequestError(f"tool {name!r}: parameters must be a JSON schema object")
        out.append({"type": "function", "function": {**f, "parameters": params}})
    return out


def chosen(tools: list[dict], choice) -> tuple[str, list[dict]]:
    """(mode, the tools a call may name) for OpenAI's tool_choice: mode is "auto", "none",
    "required", or "required" with one named function."""
    if choice is None:
        return "auto", tools
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise RequestError(f"tool_choice {choice!r} is not one of {', '.join(CHOICES)} or a named function")
        return choice, tools
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise RequestError(f"tool_choice names {name!r}, which is not among the tools")
    return "required", named


class Hermes:
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call>, each call in its own block."""

    name = "hermes"
    opening, closing = "<tool_call>", "</tool_call>"
    trigger = r"[\s\S]*?(<tool_call>)[\s\S]*"  # the reply opens a call: the grammar takes it from the tag
    _block = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    @classmethod
    def detect(cls, template: str) -> bool:
        return cls.opening in template and "tools" in template

    @classmethod
    def render(cls, content: str, calls: list[tuple[str, str]]) -> str:
        """An assistant message's content and calls [(name, arguments as JSON text)] as the model writes them."""
        blocks = []
        for name, args in calls:
            try:
                obj = json.loads(args)
            except (TypeError, ValueError):
                raise RequestError(f"tool call {name!r}: arguments must be a JSON string") from None
            blocks.append(f'{cls.opening}\n{{"name": {json.dumps(name)}, "arguments": '
                          f'{json.dumps(obj, ensure_ascii=False)}}}\n{cls.closing}')
        return "\n".join(([content] if content else []) + blocks)

    @classmethod
    def parse(cls, text: str) -> tuple[str, list[tuple[str, str]]]:
        """(the text outside the calls, the calls [(name, arguments as JSON text)]). A block that
        is not a call's JSON stays in the text, as llama-server leaves it."""
        calls, kept, at = [], [], 0
        for m in cls._block.finditer(text):
            try:
                obj = json.loads(m.group(1))
                name, args = obj["name"], obj.get("arguments", {})
                if not isinstance(name, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                continue
            kept.append(text[at:m.start()])
            at = m.end()
            calls.append((name, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
        kept.append(text[at:])
        return "".join(kept).strip(), calls

    @classmethod
    def grammar(cls, tools: list[dict], parallel: bool = True) -> str:
        """GBNF: one call of one of `tools` (or several, with parallel calls), nothing else. The
        arguments follow each tool's parameters (llama-cpp-python's json_schema_to_gbnf)."""
        from llama_cpp import llama_grammar

        schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                              "arguments": t["function"]["parameters"]},
                             "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
        try:
            rules = llama_grammar.json_schema_to_gbnf(json.dumps(enforceable(schema, "tool parameters")))
        except FormatError as e:
            raise RequestError(str(e)) from None
        except Exception as e:  # the converter names the construct it cannot take
            raise RequestError(f"tool parameters cannot be turned into a grammar: {e}") from None
        rules = re.sub(r"^root ::=", "call ::=", rules, flags=re.MULTILINE)
        block = f'"{cls.opening}\\n" call "\\n{cls.closing}"'
        root = f'root ::= {block} ("\\n" {block})*' if parallel else f"root ::= {block}"
        return root + "\n" + rules


FAMILIES = (Hermes,)


class ToolsError(RequestError):
    """A request's tools or tool_choice the caller must fix; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def plan(turns, tools, tool_choice, parallel, family, grammar: str | None):
    """What a request's tools ask of its reply: (the checked tools or None, the family whose calls
    the reply is parsed for or None, the grammar, its trigger patterns). `turns` are its messages
    (chat_api.parse_messages), `family` the template's (family_for), `grammar` the
    response_format's, if any."""
    if tools is None:
        if any(t.role == "tool" or t.calls for t in turns):
            raise ToolsError("tool calls and tool results in the messages need the request's tools", "messages")
        if tool_choice not in (None, "none"):
            raise ToolsError("tool_choice needs tools", "tool_choice")
        return None, None, grammar, ()
    try:
        tools = check_tools(tools)
        mode, allowed = chosen(tools, tool_choice)
    except RequestError as e:
        raise ToolsError(str(e), "tool_choice" if "tool_choice" in str(e) else "tools") from None
    if family is None:
        raise ToolsError("this model's chat template writes no tool-call syntax this program reads", "tools")
    triggers = ()
    if mode == "required":
        if grammar is not None:
            raise ToolsError("tool_choice 'required' or a named function cannot be combined with response_format",
                             "tool_choice")
        try:
            grammar = family.grammar(allowed, parallel=parallel is not False)
        except RequestError as e:
            raise ToolsError(str(e), "tools") from None
    elif mode == "auto" and grammar is None:  # free text until a call opens, then the call's grammar
        try:
            grammar, triggers = family.grammar(allowed, parallel=parallel is not False), (family.trigger,)
        except RequestError:
            pass  # parameters no grammar can hold: the calls are parsed as written
    return tools, (family if mode != "none" else None), grammar, triggers


def family_for(template: str | None):
    """The tool-call family whose syntax `template` (Jinja text) writes, or None."""
    return next((f for f in FAMILIES if template and f.detect(template)), None)
