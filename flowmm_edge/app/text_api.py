"""OpenAI's legacy completions (`/v1/completions`), as llama-server and llama-cpp-python serve
them: a prompt string continued as it is, without the chat template.

The request takes `prompt` (a string, or a list of one), `max_tokens` (default 16, as OpenAI's),
`stop`, `stream` (+ `stream_options.include_usage`), the sampling fields of the chat endpoint and
`logprobs` (an integer: that many alternatives per token, in the legacy shape: `tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`). Fields that would change the reply and are not
built (`echo`, `suffix`, `best_of` above 1) are a 400 naming them.
"""

from __future__ import annotations

import time
import uuid

import pydantic

from .chat_api import SYSTEM_FINGERPRINT, RequestError, SamplingFields

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
REFUSED_FIELDS = ("echo", "suffix", "functions", "tools")


class CompletionRequest(SamplingFields):
    prompt: str | list
    logprobs: int | None = pydantic.Field(None, ge=0, le=20)
    best_of: int = pydantic.Field(1, ge=1, le=1)


def prompt_text(prompt) -> str:
    """The one prompt string of a request (a list of one string is taken; token arrays are not)."""
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise RequestError("prompt must be a string (or a list of one string; token arrays and batches are not "
                               "served)")
        prompt = prompt[0]
    if not prompt:
        raise RequestError("prompt must not be empty")
    return prompt


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def logprobs_field(model, entries) -> dict:
    """The legacy logprobs object from ReplyStream entries (token, logprob, [(token, logprob)])."""
    tokens, offsets, at = [], [], 0
    for tok, _, _ in entries:
        piece = model.token_to_piece(tok).decode("utf-8", "replace")
        tokens.append(piece)
        offsets.append(at)
        at += len(piece)
    tops = [{model.token_to_piece(t).decode("utf-8", "replace"): l for t, l in top} for _, _, top in entries]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops,
            "text_offset": offsets}


def _body(cid: str, model: str, choices: list, **extra) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, **extra}


def completion(cid: str, model: str, text: str, finish_reason: str, usage: dict, logprobs: dict | None) -> dict:
    return _body(cid, model, [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}],
                 usage=usage)


def chunk(cid: str, model: str, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return _body(cid, model, [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}])


def usage_chunk(cid: str, model: str, usage: dict) -> dict:
    return _body(cid, model, [], usage=usage)
