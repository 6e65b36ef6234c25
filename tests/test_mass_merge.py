"""The mass merge (methods/mass_merge.py) against attention computed in numpy, and in the cache.

(a) tokens with identical keys folded by the rule give the full cache's attention output for
    every query, to float tolerance; (b) on clustered random keys, the merged cache's output on
    the observation queries is closer to the full cache's than evicting the same candidates;
(c) with no candidate above the floor, FlowMM's plan is SnapKV's selection: the same cells and
    the same bytes in llama.cpp's state.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import span_labels
from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.compression.compressor import Compressor
from flowmm_edge.methods.base import TokenLayout, merge_sources
from flowmm_edge.methods.flowmm import FlowMM
from flowmm_edge.methods.mass_merge import MIN_MASS, mass_plan
from flowmm_edge.methods.token_folding import fold, key_matcher
from flowmm_edge.methods.snapkv import SnapKV

D = 16


def _attend(q, k, v, bias=None):
    """softmax(q k^T / sqrt(d) + bias) v for each query row, and the attention probabilities."""
    s = q @ k.T / np.sqrt(D) + (0 if bias is None else bias)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p @ v, p


def _merged(plan, k, v, mass_bias=True):
    """The slots a one-layer, one-head plan makes, in numpy: keys by `weight`, values by `v_weight`."""
    src, w, vw = plan.src[0, 0], plan.weight[0, 0], plan.v_weight[0, 0]
    rows = np.maximum(src, 0)
    keys = np.einsum("bs,bsd->bd", np.where(src >= 0, w, 0), k[rows])
    vals = np.einsum("bs,bsd->bd", np.where(src >= 0, vw, 0), v[rows])
    return keys, vals, plan.bias_gain[0, 0] if mass_bias else 0


def _layout(n):
    return TokenLayout(positions=np.arange(n), labels=np.zeros(n, np.int32))


def _src(pivots, absorbed):
    """Sources [L, H, B, S] spelled out from per (layer, head, slot) lists: the pivot, then its candidates."""
    pivots = np.asarray(pivots)
    width = 1 + max((len(a) for per_l in absorbed for per_h in per_l for a in per_h), default=0)
    src = np.full(pivots.shape + (width,), -1, np.int32)
    for l, per_l in enumerate(absorbed):
        for h, per_h in enumerate(per_l):
            for s, a in enumerate(per_h):
                src[l, h, s, 0] = pivots[l, h, s]
                src[l, h, s, 1:1 + len(a)] = a
    return src


@pytest.mark.parametrize("seed", range(4))
def test_merge_sources_groups_every_candidate_under_its_slot(seed):
    """merge_sources (one sort) against the lists spelled out: per slot, its pivot, then the
    candidates whose target is that slot, in candidate order; evicted ones nowhere."""
    rng = np.random.default_rng(seed)
    L_, H_, n, b = 3, 2, 40, 7
    pivots = np.stack([np.stack([np.sort(rng.choice(n, b, replace=False)) for _ in range(H_)]) for _ in range(L_)])
    cand = np.stack([np.stack([np.setdiff1d(np.arange(n), pivots[l, h]) for h in range(H_)]) for l in range(L_)])
    target = rng.integers(-1, b, cand.shape) if seed else np.full(cand.shape, -1)  # seed 0: nothing folded
    want = _src(pivots, [[[cand[l, h][target[l, h] == j] for j in range(b)] for h in range(H_)] for l in range(L_)])
    np.testing.assert_array_equal(merge_sources(pivots, cand, target), want)


def test_identical_keys_fold_exactly(rng=np.random.default_rng(0)):
    groups = [0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4]          # five distinct keys, repeated
    base = rng.normal(size=(5, D))
    k, v = base[groups], rng.normal(size=(len(groups), D))
    q_obs = rng.normal(size=(8, D))
    mass = _attend(q_obs, k, v)[1].sum(axis=0)
    pivots = np.array([0, 3, 4, 6, 10])
    absorbed = [np.array([1, 2]), np.array([], int), np.array([5]), np.array([7, 8, 9]), np.array([], int)]
    plan = mass_plan(_layout(len(groups)), _src(pivots[None, None], [[absorbed]]), mass[None, None])
    keys, vals, bias = _merged(plan, k, v)
    np.testing.assert_array_equal(keys, k[pivots])     # kept keys are not touched
    np.testing.assert_allclose(bias, np.log([3, 1, 2, 4, 1]), rtol=1e-6)  # ToMe's log(group size)
    q_new = rng.normal(size=(20, D))                    # queries the merge never saw
    np.testing.assert_allclose(_attend(q_new, keys, vals, bias)[0], _attend(q_new, k, v)[0], atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_merging_beats_evicting_the_same_candidates(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, D)) * 2
    k = centres[rng.integers(0, 12, 96)] + 0.15 * rng.normal(size=(96, D))
    v = rng.normal(size=(96, D))
    q_obs = rng.normal(size=(16, D))
    full, p = _attend(q_obs, k, v)
    mass = p.sum(axis=0)
    pivots = np.sort(np.argsort(-mass, kind="stable")[:24])
    cand = np.setdiff1d(np.arange(96), pivots)
    target = fold(key_matcher(k[None, None]), 0, pivots[None], cand[None], max_absorb=15, floor=0.8)
    assert np.any(target >= 0)
    plan = mass_plan(_layout(96), merge_sources(pivots[None, None], cand[None, None], target[None]), mass[None, None])
    keys, vals, bias = _merged(plan, k, v)
    evicted = _attend(q_obs, k[pivots], v[pivots])[0]
    merged = _attend(q_obs, keys, vals, bias)[0]
    assert np.linalg.norm(merged - full) < np.linalg.norm(evicted - full)


def test_nothing_above_the_floor_is_snapkvs_selection_byte_for_byte(model):
    tokens = model.tokenize("the secret key is red and the code is 1234 please tell me what color the cat is "
                            "and how many dogs are here in the picture of the city")
    n = len(tokens)
    states, plans = [], []
    for method in (SnapKV(window=8), FlowMM(window=8, merge="mass", floor=1.01, flow_guidance=False, importance="window",
                                            sensitivity=False)):
        with runtime.Context(model, n_ctx=256, n_threads=2) as ctx:
            comp = Compressor(method, 0.4)
            with comp.observe(ctx, prompt_end=n, labels=span_labels(n)):
                ctx.decode(tokens, 0)
            plans.append(comp.compress(ctx, span_labels(n)).plan)
            states.append(ctx.state())
            assert not np.any(kv_cache.get_slot_bias(ctx))  # no gain: no bias
    np.testing.assert_array_equal(plans[1].src[..., 0], plans[0].src[..., 0])
    assert plans[1].src.shape[-1] == 1 and states[0] == states[1]


def test_the_gain_becomes_the_slot_bias_and_adds_up_over_merges(model):
    tokens = model.tokenize("the secret key is red and the code is 1234 please tell me what color the cat is "
                            "and how many dogs are here in the picture of the city")
    more = model.tokenize(" and then the dogs ran to the river and back again", add_special=False)
    n, m = len(tokens), len(more)
    labels = np.zeros(n + m + 8, np.int32)
    method = FlowMM(window=8, merge="mass", floor=0.0, flow_guidance=False, sensitivity=False, importance="window")
    with runtime.Context(model, n_ctx=256, n_threads=2) as ctx:
        comp = Compressor(method, 0.5)
        with comp.observe(ctx, prompt_end=n, labels=labels):
            ctx.decode(tokens, 0)
        first = comp.compress(ctx, labels).plan
        assert np.any(first.bias_gain > 0)
        np.testing.assert_allclose(kv_cache.get_slot_bias(ctx), first.bias_gain, rtol=1e-6)
        # a second turn and a second merge: each slot carries its pivot's bias plus the new gain
        before = kv_cache.get_slot_bias(ctx)
        cells, pos = kv_cache.seq_cells(ctx)
        by_pos = np.concatenate([before[..., np.argsort(pos)], np.zeros(before.shape[:2] + (m,), np.float32)], axis=-1)
        comp = Compressor(method, 24)
        with comp.observe(ctx, prompt_end=n + m, labels=labels):
            ctx.decode(more, n)
        second = comp.compress(ctx, labels).plan
        want = np.take_along_axis(by_pos, second.src[..., 0], axis=-1) + second.bias_gain
        np.testing.assert_allclose(kv_cache.get_slot_bias(ctx), want, rtol=1e-5, atol=1e-6)


def test_a_candidate_never_counts_for_more_than_its_pivot():
    mass = np.array([[[1e-9, 0.5, 0.2, 0.7]]])  # a pivot the window hardly saw, absorbing three that it did
    plan = mass_plan(_layout(4), np.array([[[[0, 1, 2, 3]]]]), mass)
    assert plan.bias_gain[0, 0, 0] == pytest.approx(np.log(4))  # at most log(group size)
    np.testing.assert_allclose(plan.v_weight[0, 0, 0], [0.25] * 4)


def test_slot_weights_follow_the_formula_for_every_slot():
    """mass_plan (all slots at once) against the rule spelled out slot by slot: r_i = min(m_i / m_pivot, 1)
    with masses floored at MIN_MASS, V weights r / sum(r), bias gain log(sum(r)), K the pivot's."""
    rng = np.random.default_rng(5)
    L_, H_, n, b = 2, 3, 30, 6
    pivots = np.stack([np.stack([np.sort(rng.choice(n, b, replace=False)) for _ in range(H_)]) for _ in range(L_)])
    absorbed = []
    for l in range(L_):
        per_l = []
        for h in range(H_):
            cand, target = np.setdiff1d(np.arange(n), pivots[l, h]), rng.integers(-1, b, n - b)
            per_l.append([cand[target == j] for j in range(b)])
        absorbed.append(per_l)
    mass = rng.random((L_, H_, n)) * (rng.random((L_, H_, n)) > 0.3)
    plan = mass_plan(TokenLayout(np.arange(n), np.zeros(n, np.int32)), _src(pivots, absorbed), mass)
    for l in range(L_):
        for h in range(H_):
            for s in range(b):
                srcs = [pivots[l, h, s], *absorbed[l][h][s]]
                m = [max(float(mass[l, h, i]), MIN_MASS) for i in srcs]
                r = [min(x / m[0], 1.0) for x in m]
                assert list(plan.src[l, h, s, :len(srcs)]) == srcs and np.all(plan.src[l, h, s, len(srcs):] == -1)
                np.testing.assert_allclose(plan.v_weight[l, h, s, :len(srcs)], np.array(r) / sum(r), rtol=1e-6)
                assert plan.weight[l, h, s, 0] == 1 and not plan.weight[l, h, s, 1:].any()
                assert abs(plan.bias_gain[l, h, s] - math.log(sum(r))) < 1e-6
