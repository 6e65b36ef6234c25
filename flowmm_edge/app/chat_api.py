"""The OpenAI / llama-cpp-python chat shapes: request messages in, completion dicts out.

Messages are `{"role": "system"|"user"|"assistant", "content": str | [part, ...]}` with parts
`{"type": "text", "text": ...}` and `{"type": "image_url", "image_url": {"url": ...} | str}`;
an image URL is a `data:image/...;base64,` URL, or a local file (`file://` or a path) where the
caller's MediaPolicy allows one (bindings/media.py bounds every read). Nothing is fetched from
the network. Each message becomes a `Turn` whose `key` identifies it exactly
(role, text, sha256 of each image), so a conversation resent by a client can be matched against
the one in the cache. Replies are the dicts llama-cpp-python's `create_chat_completion` returns
(`chat.completion`, or `chat.completion.chunk` pieces when streaming).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from pathlib import Path

import pydantic

from ..bindings import media
from ..bindings.prompt import Segment, valid_text
from ..errors import FlowMMError

ROLES = ("system", "user", "assistant", "tool")
ALIASES = {"developer": "system"}  # OpenAI's current name for the system role
MAX_CHOICES = 4  # `n`: choices per request, each its own job (and slot), decoded in the worker's one batch
SYSTEM_FINGERPRINT = "flowmm-edge"  # OpenAI's field: which backend configuration answered


class RequestError(FlowMMError):
    """A request the caller must fix (HTTP 400)."""


class SamplingFields(pydantic.BaseModel):
    """The sampling fields both endpoints take (OpenAI's and llama-server's), checked by range;
    fields not named here change nothing and are accepted (user, metadata, store, ...)."""

    model_config = pydantic.ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = pydantic.Field(None, ge=1)
    temperature: float | None = pydantic.Field(None, ge=0.0, le=100.0)
    top_p: float | None = pydantic.Field(None, ge=0.0, le=1.0)
    top_k: int | None = None
    min_p: float | None = pydantic.Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = pydantic.Field(None, gt=0.0)
    seed: int | None = None
    ignore_eos: bool | None = None  # llama-server's extension: the reply runs to max_tokens
    # llama-server's extension: False decodes the whole prompt afresh on its slot, nothing kept (llama.cpp's
    # logits are not bit-identical across batch sizes, so a kept prefix may change a sampled reply)
    cache_prompt: bool = True
    frequency_penalty: float | None = pydantic.Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = pydantic.Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = pydantic.Field(1, ge=1, le=MAX_CHOICES)


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str
    segments: tuple[Segment, ...]
    key: tuple  # (role, text with image markers, sha256 of each image): equal keys, equal turns
    calls: tuple = ()  # an assistant message's tool calls: (name, arguments as JSON text)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments if s.kind == "text")


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    """Which image URLs a caller may name: `serve` reads data URLs only unless started with
    --allowed-local-media DIR; a Session's own caller may name any local file (allowed_dir "/")."""

    allowed_dir: Path | None = None
    max_bytes: int = media.MAX_IMAGE_BYTES


def _image_bytes(url: str, policy: MediaPolicy) -> bytes:
    try:
        return media.image_from_url(url, policy.allowed_dir, policy.max_bytes)
    except media.MediaError as e:
        raise RequestError(str(e)) from None


def _segments(content, policy: MediaPolicy) -> list[Segment]:
    if isinstance(content, str):
        return [Segment("text", valid_text(content))]
    if content is None:
        return [Segment("text", "")]
    if not isinstance(content, list):
        raise RequestError("a message's content must be a string or a list of parts")
    # text parts are joined by a newline, none right after an image (llama.cpp's common/chat:
    # a newline once the message's text, images' markers included, is not empty)
    out, after_media, started = [], False, False
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            text = ("\n" if started and not after_media else "") + valid_text(part["text"])
            out.append(Segment("text", text))
            started, after_media = started or bool(text), False
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise RequestError("an image_url part needs a url string")
            out.append(Segment("image", image=_image_bytes(url, policy), modality="image"))
            started = after_media = True
        else:
            raise RequestError(f"unsupported content part {str(part)[:60]!r} (text and image_url are)")
    return out


def assistant_key(content: str, calls) -> tuple:
    """The key of an assistant message with tool calls, however its arguments were spaced: a
    client's resent message and the conversation's own reply (tool_calls.py parses it) match."""
    norm = []
    for name, args in calls:
        try:
            args = json.dumps(json.loads(args), sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
        norm.append((name, args))
    return ("assistant", (content or "").strip(), tuple(norm))


def _calls(m: dict) -> tuple:
    """An assistant message's OpenAI tool_calls as (name, arguments as JSON text)."""
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise RequestError("an assistant message's tool_calls must be a list")
    out = []
    for c in calls:
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments"), str):
            raise RequestError("each tool call needs function.name and function.arguments (a JSON string)")
        out.append((f["name"], f["arguments"]))
    return tuple(out)


def parse_messages(messages, media_policy: MediaPolicy = MediaPolicy()) -> list[Turn]:
    """The request's messages as turns; consecutive messages of one role are joined (by a newline),
    but tool results and assistant messages with tool calls stay one turn each. Image URLs are
    read as `media_policy` allows (default: data URLs only)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    turns: list[Turn] = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") in ALIASES:
            m = dict(m, role=ALIASES[m["role"]])
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"each message needs a role of {', '.join(ROLES + tuple(ALIASES))}")
        segs = _segments(m.get("content"), media_policy)
        if m["role"] != "user" and any(s.kind == "image" for s in segs):
            raise RequestError(f"images go in user messages, not {m['role']} ones")
        calls = _calls(m) if m["role"] == "assistant" else ()
        if turns and turns[-1].role == m["role"] and m["role"] != "tool" and not calls and not turns[-1].calls:
            segs = list(turns.pop().segments) + [Segment("text", "\n")] + segs
        text = "".join(s.text if s.kind == "text" else "\0image\0" for s in segs)
        digests = tuple(hashlib.sha256(s.image).hexdigest() for s in segs if s.kind == "image")
        key = assistant_key(text, calls) if calls else (m["role"], text, digests)
        turns.append(Turn(m["role"], tuple(segs), key, calls))
    if turns[-1].role == "system" or turns[-1].calls:
        raise RequestError("the last message must be the user's, a tool's result, or an assistant message to "
                           "continue")
    if turns[-1].role == "assistant" and len(turns) == 1:
        raise RequestError("an assistant message to continue must follow a user message")
    return turns


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage: the prompt's positions (those the cache held already among them) and the reply's."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _fingerprinted(d: dict, server: bool) -> dict:
    """OpenAI's system_fingerprint on what the server sends (llama-cpp-python's dicts have none)."""
    return {**d, "system_fingerprint": SYSTEM_FINGERPRINT} if server else d


def logprobs_content(model, entries) -> dict:
    """OpenAI's choice.logprobs from ReplyStream entries (token, logprob, [(token, logprob)])."""
    def one(tok: int, lp: float) -> dict:
        piece = model.token_to_piece(tok)
        return {"token": piece.decode("utf-8", "replace"), "logprob": lp, "bytes": list(piece)}

    return {"content": [{**one(tok, lp), "top_logprobs": [one(t, l) for t, l in top]} for tok, lp, top in entries],
            "refusal": None}


def tool_calls_field(calls, streamed: bool = False) -> list[dict]:
    """OpenAI's tool_calls from [(name, arguments as JSON text)], each with a new id (a stream's
    delta numbers them with `index`)."""
    return [{**({"index": i} if streamed else {}), "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": name, "arguments": args}} for i, (name, args) in enumerate(calls)]


def completion(cid: str, model: str, content: str, finish_reason: str, usage_: dict, server: bool = False,
               logprobs: dict | None = None, tool_calls: list | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message = {"role": "assistant", "content": content or None, "tool_calls": tool_calls}
    return _fingerprinted({"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": usage_}, server)


def usage_chunk(cid: str, model: str, usage_: dict, server: bool = False) -> dict:
    """The last chunk of a stream asked for with stream_options.include_usage (OpenAI's shape)."""
    return _fingerprinted({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                           "choices": [], "usage": usage_}, server)


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, server: bool = False,
          logprobs: dict | None = None) -> dict:
    return _fingerprinted({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                           "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish_reason}]}, server)


class FormatError(RequestError):
    pass


# JSON Schema keywords llama-cpp-python's converter (llama_grammar.json_schema_to_gbnf) reads no
# constraint from: a schema that uses one is refused (its replies could break it), except integer
# bounds over a range of at most MAX_INT_RANGE values, which become the equivalent enum.
UNENFORCED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minProperties",
              "maxProperties", "uniqueItems", "not", "if", "then", "else", "dependentRequired",
              "dependentSchemas", "patternProperties", "propertyNames", "contains", "minContains", "maxContains")
MAX_INT_RANGE = 1000


def enforceable(schema, where: str = "schema"):
    """`schema` with bounded integers as enums; a FormatError naming the first keyword the
    grammar could not enforce."""
    if isinstance(schema, list):
        return [enforceable(s, f"{where}[{i}]") for i, s in enumerate(schema)]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    lo, hi = out.get("minimum"), out.get("maximum")
    if out.get("type") == "integer" and isinstance(lo, int) and isinstance(hi, int) and 0 <= hi - lo < MAX_INT_RANGE \
            and not set(out) & {"exclusiveMinimum", "exclusiveMaximum", "multipleOf", "enum", "const"}:
        out.pop("minimum"), out.pop("maximum")
        out["enum"] = list(range(lo, hi + 1))
    for key in UNENFORCED:
        if key in out:
            raise FormatError(f"response_format.json_schema: '{key}' at {where} cannot be enforced by the grammar "
                              f"(integer bounds within {MAX_INT_RANGE} values can)")
    for key, value in out.items():
        if key in ("properties", "$defs", "definitions"):
            out[key] = {k: enforceable(v, f"{where}.{key}.{k}") for k, v in value.items()} \
                if isinstance(value, dict) else value
        elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems"):
            out[key] = enforceable(value, f"{where}.{key}")
    return out


def _schema_grammar(schema, where: str) -> str:
    from llama_cpp import llama_grammar

    if not isinstance(schema, dict):
        raise FormatError(f"{where} must be a JSON Schema object")
    schema = enforceable(schema)
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter's own errors name the unsupported construct
        raise FormatError(f"{where} cannot be turned into a grammar: {e}") from None


def grammar_for(response_format) -> str | None:
    """The GBNF grammar an OpenAI `response_format` asks for: None for text, llama.cpp's JSON
    grammar for json_object (or its `schema`'s, as llama-server reads one there), one made from the
    schema (llama-cpp-python's json_schema_to_gbnf) for json_schema. Anything else is a FormatError naming what is wrong."""
    from llama_cpp import llama_grammar

    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise FormatError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":  # with a "schema", llama-server's extension: that schema's grammar
        if "schema" not in response_format:
            return llama_grammar.JSON_GBNF
        return _schema_grammar(response_format["schema"], "response_format.schema")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        return _schema_grammar(spec.get("schema") if isinstance(spec, dict) else None, "response_format.json_schema.schema")
    raise FormatError(f"response_format.type {kind!r} is not one of text, json_object, json_schema")


def create_chat_completion(conv, messages: list[dict], media_policy: MediaPolicy = MediaPolicy(),
                           max_tokens: int | None = None, temperature: float | None = None,
                           top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
                           repeat_penalty: float | None = None, seed: int | None = None,
                           stop: str | list[str] | None = None, stream: bool = False,
                           response_format: dict | None = None, tools: list | None = None, tool_choice=None,
                           logprobs: bool | None = None, top_logprobs: int | None = None):
    """llama-cpp-python's `Llama.create_chat_completion` over a conversation (app/conversation.py):
    the messages parsed (images as `media_policy` allows), the conversation brought to them
    (`feed`: only new messages are decoded), the reply sampled with the conversation's settings
    overridden where given (`response_format`, `tools` and `tool_choice`, `logprobs` and
    `top_logprobs` as the server takes them), and shaped as a `chat.completion` dict or, with
    stream=True, an iterator of `chat.completion.chunk` dicts."""
    from . import tool_calls

    turns = parse_messages(messages, media_policy)
    grammar = grammar_for(response_format)
    family = tool_calls.family_for(conv.template.jinja_text(conv.model)) if tools is not None else None
    tools, parse_calls, grammar, triggers = tool_calls.plan(turns, tools, tool_choice, None, family, grammar)
    params = conv.engine.sampling.override(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                           repeat_penalty=repeat_penalty, seed=seed, grammar=grammar,
                                           grammar_triggers=triggers)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    held, decoded = conv.feed(turns, tools)
    reply = conv.reply_stream(max_tokens, params, stops, logprobs=(top_logprobs or 0) if logprobs else None,
                              hide_from=parse_calls.opening if parse_calls else None)
    gen = conv.generate(reply)
    cid, name = completion_id(), conv.model_path.name
    if stream:
        return _chunks(conv, gen, reply, parse_calls, cid, name)
    content = "".join(gen)
    calls = parse_calls.parse(reply.full)[1] if parse_calls else []
    lp = logprobs_content(conv.model, reply.token_logprobs) if logprobs else None
    return completion(cid, name, content, "tool_calls" if calls else conv.finish_reason,
                      usage(held + decoded, held, conv.last_reply_tokens), logprobs=lp,
                      tool_calls=tool_calls_field(calls))


def _chunks(conv, gen, reply, parse_calls, cid: str, name: str):
    yield chunk(cid, name, {"role": "assistant"})  # llama-cpp-python's first delta (the server adds content "")
    for piece in gen:
        entries = reply.take_logprobs()
        yield chunk(cid, name, {"content": piece},
                    logprobs=logprobs_content(conv.model, entries) if reply.logprobs is not None else None)
    calls = parse_calls.parse(reply.full)[1] if parse_calls else []
    if calls:
        yield chunk(cid, name, {"tool_calls": tool_calls_field(calls, streamed=True)})
    yield chunk(cid, name, {}, "tool_calls" if calls else conv.finish_reason)
