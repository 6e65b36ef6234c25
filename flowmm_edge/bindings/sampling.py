"""Token sampling through llama.cpp's sampler chain (`llama_sampler_*`), as llama-cli samples:
repetition penalty, top-k, top-p, min-p, temperature, then a seeded draw (or greedy at
temperature <= 0). The chain works on a logits array, not the context's last row, so the chat
can sample from logits it kept while other decodes (a merge's repeat pass) ran in between.

    s = Sampler(n_vocab, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=1)
    tok = s.sample(logits)      # and remembers tok for the repetition penalty

A grammar (GBNF text, `grammar`; llama-cpp-python's llama_grammar makes it from a JSON schema)
goes first in the chain (llama_sampler_init_grammar), so only tokens it allows are drawn;
OpenAI's logit_bias, frequency_penalty and presence_penalty go through llama.cpp's logit-bias and
penalties samplers.
"""

from __future__ import annotations

import ctypes
import dataclasses

import numpy as np

from ..errors import FlowMMError
from .native import llama_cpp

PENALTY_LAST_N = 64  # llama.cpp's default --repeat-last-n


class SamplingError(FlowMMError):
    pass


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's meanings: --temp (0: greedy), --top-k (<= 0: off), --top-p and --min-p
    (1.0 and 0.0: off), --repeat-penalty (1.0: off) over the last PENALTY_LAST_N tokens, --seed
    (-1: random), --ignore-eos (never draw an end-of-generation token: the reply runs to its
    length). `check` is the one range check of these settings; its error names the flag."""

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0
    ignore_eos: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple = ()        # ((token id, bias), ...), added to those tokens' logits
    grammar: str | None = None    # GBNF text whose root rule is "root"
    # a lazy grammar: free text until the reply matches one of these regexes (llama.cpp's trigger
    # patterns, matched against the whole text so far; the grammar takes it from the first group on)
    grammar_triggers: tuple = ()

    def override(self, **settings) -> "SamplingParams":
        """These settings with those given and not None in their place (a request's own)."""
        return dataclasses.replace(self, **{k: v for k, v in settings.items() if v is not None})

    def check(self) -> None:
        for ok, message in (
                (np.isfinite(self.temperature) and self.temperature >= 0,
                 f"--temp {self.temperature} must be a finite number >= 0"),
                (isinstance(self.seed, int), f"--seed {self.seed!r} must be an integer (-1: random)"),
                (0.0 <= self.top_p <= 1.0, f"--top-p {self.top_p} is out of range"),
                (0.0 <= self.min_p <= 1.0, f"--min-p {self.min_p} is out of range"),
                (np.isfinite(self.repeat_penalty) and self.repeat_penalty > 0,
                 f"--repeat-penalty {self.repeat_penalty} is out of range"),
                (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty {self.frequency_penalty} is outside [-2, 2]"),
                (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty {self.presence_penalty} is outside [-2, 2]"),
                (all(np.isfinite(b) and -100 <= b <= 100 for _, b in self.logit_bias),
                 "logit_bias values must be numbers in [-100, 100]")):
            if not ok:
                raise SamplingError(message)


class Sampler:
    def __init__(self, n_vocab: int, params: SamplingParams, banned=None, vocab=None):
        """`banned`: token ids never drawn (their logits set to -inf first, as llama.cpp's
        --ignore-eos biases the end-of-generation tokens). `vocab`: the model's llama_vocab,
        needed for a grammar."""
        params.check()
        self.n_vocab, self.params = n_vocab, params
        self._banned = None if banned is None or not len(banned) else np.asarray(banned, np.int64)
        if any(not 0 <= t < n_vocab for t, _ in params.logit_bias):
            raise SamplingError(f"logit_bias names a token outside the vocabulary of {n_vocab}")
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._chain = chain
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731  the chain owns what it holds
        if params.grammar is not None:
            if vocab is None:
                raise SamplingError("a grammar needs the model's vocabulary")
            if params.grammar_triggers:
                patterns = (ctypes.c_char_p * len(params.grammar_triggers))(
                    *[p.encode() for p in params.grammar_triggers])
                grammar = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                    vocab, params.grammar.encode(), b"root", patterns, len(params.grammar_triggers), None, 0)
            else:
                grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
            if not grammar:
                self.close()
                raise SamplingError("the grammar does not parse (llama.cpp's GBNF)")
            add(grammar)
        if params.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))(
                *[llama_cpp.llama_logit_bias(int(t), float(b)) for t, b in params.logit_bias])
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            add(llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, params.repeat_penalty,
                                                       params.frequency_penalty, params.presence_penalty))
        if params.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed >= 0 else int(np.random.SeedSequence().entropy % 2 ** 32)
            add(llama_cpp.llama_sampler_init_dist(seed % 2 ** 32))
        self._data = (llama_cpp.llama_token_data * n_vocab)()  # filled in place for every draw
        self._rows = np.ctypeslib.as_array(self._data).view(np.dtype([("id", np.int32), ("logit", np.float32),
                                                                       ("p", np.float32)]))
        self._ids = np.arange(n_vocab, dtype=np.int32)

    def sample(self, logits: np.ndarray) -> int:
        """A token from `logits` [n_vocab]; it joins the history the repetition penalty sees."""
        if len(logits) != self.n_vocab:
            raise SamplingError(f"logits for {len(logits)} tokens, the vocabulary has {self.n_vocab}")
        self._rows["id"], self._rows["logit"], self._rows["p"] = self._ids, logits, 0.0
        if self._banned is not None:
            self._rows["logit"][self._banned] = -np.inf
        arr = llama_cpp.llama_token_data_array(self._data, self.n_vocab, -1, False)
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(arr))
        tok = int(self._data[arr.selected].id)
        llama_cpp.llama_sampler_accept(self._chain, tok)
        return tok

    def reset(self) -> None:
        """Start afresh: a grammar at its root rule, an empty penalty history."""
        llama_cpp.llama_sampler_reset(self._chain)

    def accept(self, token: int) -> None:
        """Put a token that was not sampled (the prompt's) into the penalty's history."""
        llama_cpp.llama_sampler_accept(self._chain, int(token))

    def close(self) -> None:
        if getattr(self, "_chain", None) is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self):
        self.close()


def logprobs(logits: np.ndarray, token: int, top: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """(the log probability of `token`, the `top` most probable tokens with theirs) under the
    model's own distribution: log_softmax of the logits the sampler was given (as llama-server's
    n_probs and OpenAI's logprobs report, before any sampler or grammar reshapes it)."""
    z = np.asarray(logits, np.float64)
    lse = z.max() + np.log(np.exp(z - z.max()).sum())
    best = np.argpartition(-z, top)[:top] if 0 < top < len(z) else np.arange(len(z) if top else 0)
    best = best[np.lexsort((best, -z[best]))]  # most probable first, ties by id
    return float(z[token] - lse), [(int(i), float(z[i] - lse)) for i in best]
