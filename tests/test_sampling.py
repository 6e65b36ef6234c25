"""llama.cpp's sampler chain (flowmm_edge/sampling.py) against numpy: greedy is the argmax,
top-k and min-p draw only where numpy's softmax allows, the repetition penalty moves the argmax
as llama.cpp's rule computed here says, and a seed fixes the draws (in a chat session too)."""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.bindings.sampling import Sampler, SamplingError, SamplingParams
from flowmm_edge.app.session import Session, SessionError

V = 300
LOGITS = np.random.default_rng(0).normal(0, 2, V).astype(np.float32)


def test_greedy_is_the_argmax():
    s = Sampler(V, SamplingParams(temperature=0.0))
    for seed in range(5):
        l = np.random.default_rng(seed).normal(size=V).astype(np.float32)
        assert s.sample(l) == int(np.argmax(l))


def test_banned_tokens_are_never_drawn_and_the_logits_are_not_changed():
    """--ignore-eos: the end-of-generation ids are banned; greedy is numpy's argmax of the rest, a
    seeded draw never lands on them even where they hold almost all the mass."""
    order = np.argsort(-LOGITS)
    banned = order[:2]
    rest = LOGITS.copy()
    rest[banned] = -np.inf
    given = LOGITS.copy()
    assert Sampler(V, SamplingParams(temperature=0.0), banned=banned).sample(given) == int(np.argmax(rest))
    assert np.array_equal(given, LOGITS)
    peaked = LOGITS.copy()
    peaked[banned] += 30
    draws = {Sampler(V, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=k), banned=banned)
             .sample(peaked) for k in range(40)}
    assert not draws & set(banned.tolist())


def test_top_k_and_min_p_draw_only_what_they_allow():
    draws = {Sampler(V, SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=k)).sample(LOGITS)
             for k in range(60)}
    assert draws <= set(np.argsort(-LOGITS)[:3].tolist()) and len(draws) > 1
    p = np.exp(LOGITS - LOGITS.max())
    p /= p.sum()
    allowed = set(np.flatnonzero(p >= 0.2 * p.max()).tolist())
    draws = {Sampler(V, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=k)).sample(LOGITS)
             for k in range(60)}
    assert draws <= allowed and len(draws) > 1


def test_repeat_penalty_follows_llama_cpps_rule():
    """llama.cpp divides a seen token's positive logit by the penalty and multiplies a negative one."""
    s = Sampler(V, SamplingParams(temperature=0.0, repeat_penalty=1.5))
    order = np.argsort(-LOGITS)
    seen = [int(order[0]), int(order[1])]
    for t in seen:
        s.accept(t)
    want = LOGITS.astype(np.float64).copy()
    for t in set(seen):
        want[t] = want[t] / 1.5 if want[t] > 0 else want[t] * 1.5
    assert s.sample(LOGITS) == int(np.argmax(want)) != int(order[0])


def test_a_seed_fixes_the_draws():
    flat = np.zeros(V, np.float32)
    a = Sampler(V, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11))
    b = Sampler(V, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11))
    c = Sampler(V, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=12))
    sa, sb, sc = ([x.sample(flat) for _ in range(20)] for x in (a, b, c))
    assert sa == sb and sa != sc
    with pytest.raises(SamplingError, match="--top-p"):
        Sampler(V, SamplingParams(top_p=1.5))


def test_the_same_seed_gives_the_same_reply(tiny_models):
    text, _ = tiny_models
    replies = []
    for seed in (3, 3):
        with Session(text, budget=48, n_ctx=256, max_reply=12, n_threads=2, temperature=0.9, top_k=0, top_p=1.0,
                     min_p=0.0, seed=seed) as s:
            replies.append(s.chat("the secret key is red"))
    assert replies[0] == replies[1]
    with pytest.raises(SessionError, match="--min-p"):
        Session(text, budget=48, n_ctx=256, min_p=-0.1)


def test_a_lazy_grammar_holds_only_from_its_trigger_on(text_model):
    """llama.cpp's trigger patterns (a tool call under tool_choice auto): free text first; once the
    text matches the trigger, only what the grammar allows after the opening tag is drawn."""
    from flowmm_edge.app.tool_calls import Hermes

    m = text_model
    grammar = 'root ::= "<tool_call>\\n{\\"a\\": 1}\\n</tool_call>"'
    free = m.tokenize("Hello", add_special=False)[0]

    def onehot(t):
        z = np.zeros(m.n_vocab, np.float32)
        z[t] = 10.0
        return z

    lazy = Sampler(m.n_vocab, SamplingParams(grammar=grammar, grammar_triggers=(Hermes.trigger,)), vocab=m.vocab)
    assert lazy.sample(onehot(free)) == free  # before the trigger: the model writes freely
    for t in m.tokenize(Hermes.opening, add_special=False, parse_special=True):
        assert lazy.sample(onehot(t)) == t
    after = lazy.sample(onehot(free))  # "Hello" is not what the grammar allows after the tag
    assert after != free and m.token_to_piece(after).startswith(b"\n")
    lazy.close()
    strict = Sampler(m.n_vocab, SamplingParams(grammar=grammar), vocab=m.vocab)
    first = strict.sample(onehot(free))  # without a trigger the grammar holds from the first token
    assert first != free and Hermes.opening.encode().startswith(m.token_to_piece(first, special=True))
    strict.close()
