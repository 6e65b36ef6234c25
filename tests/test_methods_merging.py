"""Merging methods (flowmm with its ablations, lookm) against plain-Python references.

The references below re-derive every step from docs/METHOD.md ('Merging strategy per layer',
'Sensitivity-aware matching') and the LOOK-M paper with loops and the textbook formulas
(selection by sorting, cosine by dot/(|a||b|), the pivotal merge as (k_j + ½Σ(k_i + k_j))/(n_j + 1)
on the vectors), sharing no code with flowmm_edge.methods.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowmm_edge.methods import METHODS, MethodError, Stats, TokenLayout
from flowmm_edge.methods.flowmm import FlowMM
from flowmm_edge.methods.base import top_by_score
from flowmm_edge.methods.token_folding import cap_absorbed

L, H, D = 3, 2, 8

PAPER = dict(importance="window", merge="pivotal")  # FlowMM as the paper reads, which the reference implements


def layout(n, labels):
    return TokenLayout(positions=np.arange(n) * 3 + 1, labels=np.asarray(labels))


def cos(a, b):
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return 0.0 if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b)) / (na * nb)


def ref_select(score, protected, slots):
    others = sorted((i for i in range(len(score)) if i not in protected), key=lambda i: (-score[i], i))
    return sorted(set(protected) | set(others[: slots - len(protected)]))


def ref_match(cands, pivots, keys, ok, max_absorb):
    """Each candidate to its most similar allowed pivot (first on ties), then each pivot keeps its
    max_absorb most similar candidates. Returns {pivot: [candidates]}."""
    got = {j: [] for j in pivots}
    for i in cands:
        best, best_c = None, None
        for j in pivots:
            if not ok(i, j):
                continue
            c = cos(keys[i], keys[j])
            if best is None or c > best_c:
                best, best_c = j, c
        if best is not None:
            got[best].append((i, best_c))
    return {j: sorted(i for i, _ in sorted(v, key=lambda t: (-t[1], t[0]))[:max_absorb]) for j, v in got.items()}


def ref_pool(row, k):
    n = len(row)
    return [sum(row[max(0, i - k // 2): min(n, i + k // 2 + 1)]) / (min(n, i + k // 2 + 1) - max(0, i - k // 2))
            for i in range(n)]


def ref_flowmm(labels, imp, keys, rho, slots, sinks, window, theta, q, flow=True, sens=True, orphans="evict",
               max_absorb=15, pool=7):
    n = len(labels)
    imp = np.array([[ref_pool(imp[l, h], pool) for h in range(H)] for l in range(L)])
    protected = set(range(min(sinks, n))) | set(range(max(0, n - window), n))
    out = {}
    for l in range(L):
        cross = (rho[l] >= theta) if flow else True
        for h in range(H):
            piv = ref_select(imp[l, h], protected, slots)
            tau = np.quantile([imp[l, h, j] for j in piv], q)
            same = lambda i, j: cross or labels[i] == labels[j]
            gate = lambda i, j: same(i, j) and (not sens or imp[l, h, j] <= tau)
            cands = [i for i in range(n) if i not in piv]
            m = ref_match(cands, piv, keys[l, h], gate, max_absorb=10**9)
            if orphans == "ungated":
                placed = {i for v in m.values() for i in v}
                retry = ref_match([i for i in cands if i not in placed], piv, keys[l, h], same, 10**9)
                m = {j: m[j] + retry[j] for j in piv}
            # the cap applies after both passes, to the most similar
            m = {j: sorted(sorted(v, key=lambda i: (-cos(keys[l, h][i], keys[l, h][j]), i))[:max_absorb]) for j, v in m.items()}
            out[l, h] = (piv, m, tau)
    return out


def ref_lookm(labels, scores, keys, slots, sinks, window, max_absorb=15):
    n = len(labels)
    recent = min(max(window, int(0.5 * slots)), slots - min(sinks, n))
    protected = set(range(min(sinks, n))) | set(range(max(0, n - recent), n))
    out = {}
    for l in range(L):
        for h in range(H):
            top = max(scores[l, h])
            prior = [s + top if labels[i] == 0 else s for i, s in enumerate(scores[l, h])]
            piv = ref_select(prior, protected, slots)
            cands = [i for i in range(n) if i not in piv]
            out[l, h] = (piv, ref_match(cands, piv, keys[l, h], lambda i, j: True, max_absorb), None)
    return out


def pivotal(kj, kis):
    return (kj + 0.5 * sum(ki + kj for ki in kis)) / (len(kis) + 1)


def check_plan(plan, ref, keys, n):
    for (l, h), (piv, m, _) in ref.items():
        assert list(plan.src[l, h, :, 0]) == piv, (l, h)
        for s, j in enumerate(piv):
            src = [int(c) for c in plan.src[l, h, s] if c >= 0]
            assert src[0] == j and sorted(src[1:]) == m[j], (l, h, j)
            w = plan.weight[l, h, s, : len(src)]
            merged = sum(float(wi) * keys[l, h, c] for wi, c in zip(w, src))
            np.testing.assert_allclose(merged, pivotal(keys[l, h, j], [keys[l, h, i] for i in m[j]]), rtol=1e-5, atol=1e-6)
            assert np.all(plan.weight[l, h, s, len(src):] == 0)


def make(n, seed, n_labels=2, tie=False):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_labels, n)
    imp = rng.random((L, H, n))
    if tie:
        imp = (imp * 4).round() / 4  # many equal importances
    keys = rng.standard_normal((L, H, n, D))
    if tie:
        keys[:, :, 5] = keys[:, :, 3]  # two identical keys: cosine ties between pivots
    return labels, imp, keys


@pytest.mark.parametrize("tie", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("n,budget", [(40, 0.3), (40, 12), (25, 25), (60, 0.2)])
@pytest.mark.parametrize("variant", [dict(), dict(flow_guidance=False), dict(sensitivity=False),
                                     dict(flow_guidance=False, sensitivity=False), dict(orphans="ungated"),
                                     dict(max_absorb=2), dict(pool=1)],
                         ids=["full", "no-flow", "no-sensitivity", "neither", "ungated", "cap2", "no-pool"])
def test_flowmm_equals_reference(n, budget, variant, tie):
    labels, imp, keys = make(n, n + 7 * tie, tie=tie)
    rho = np.array([0.1, 0.3, 0.25])  # intra, cross, cross (>= theta)
    m = FlowMM(sinks=2, window=4, theta=0.25, tau_quantile=0.8, **PAPER, **variant)
    plan = m(layout(n, labels), Stats(window_scores=imp, keys=keys, rho=rho), L, H, budget)
    slots = plan.n_slots
    assert slots == (budget if isinstance(budget, int) else math.ceil(budget * n))
    ref = ref_flowmm(labels, imp, keys, rho, slots, 2, 4, 0.25, 0.8, flow=variant.get("flow_guidance", True),
                     sens=variant.get("sensitivity", True), orphans=variant.get("orphans", "evict"),
                     max_absorb=variant.get("max_absorb", 15), pool=variant.get("pool", 7))
    check_plan(plan, ref, keys, n)


def test_flowmm_with_value_norms_ranks_by_importance_times_the_norms():
    """KVzip+'s correction: the plan equals the reference planned from importance x |v|; a method
    that asks for the norms and gets none is refused."""
    n = 40
    labels, imp, keys = make(n, 11)
    norms = np.random.default_rng(3).random((L, H, n)) * 2
    rho = np.array([0.1, 0.3, 0.25])
    m = FlowMM(sinks=2, window=4, theta=0.25, tau_quantile=0.8, **PAPER, value_norm=True)
    plan = m(layout(n, labels), Stats(window_scores=imp, keys=keys, rho=rho, value_norms=norms), L, H, 0.3)
    check_plan(plan, ref_flowmm(labels, imp * norms, keys, rho, plan.n_slots, 2, 4, 0.25, 0.8), keys, n)
    plain = FlowMM(sinks=2, window=4, theta=0.25, tau_quantile=0.8, **PAPER)(
        layout(n, labels), Stats(window_scores=imp, keys=keys, rho=rho), L, H, 0.3)
    assert not np.array_equal(plain.src, plan.src)  # the norms changed what is kept
    with pytest.raises(MethodError, match="value_norms"):
        m(layout(n, labels), Stats(window_scores=imp, keys=keys, rho=rho), L, H, 0.3)


@pytest.mark.parametrize("n,budget", [(40, 0.3), (30, 30), (64, 0.25)])
def test_lookm_equals_reference(n, budget):
    labels, scores, keys = make(n, 3 * n, tie=True)
    plan = METHODS["lookm"](sinks=2, window=4)(layout(n, labels), Stats(prompt_scores=scores, keys=keys), L, H, budget)
    check_plan(plan, ref_lookm(labels, scores, keys, plan.n_slots, 2, 4), keys, n)


def test_degenerate_cases():
    n = 30
    labels, imp, keys = make(n, 1, n_labels=1)
    st_ = Stats(window_scores=imp, keys=keys, rho=np.zeros(L), prompt_scores=imp)
    for name in ("flowmm", "lookm"):
        # one modality: intra-modal layers may merge anything into anything, so no orphan from labels
        kw = PAPER if name == "flowmm" else {}
        plan = METHODS[name](sinks=2, window=4, **kw)(layout(n, labels), st_, L, H, 10)
        absorbed = (plan.src[..., 1:] >= 0).sum(axis=(2, 3))
        assert absorbed.min() > 0
        # budget = context: nothing to merge, every slot is itself with weight 1
        plan = METHODS[name](sinks=2, window=4, **kw)(layout(n, labels), st_, L, H, 1.0)
        assert plan.src.shape[2:] == (n, 1) and np.all(plan.src[..., 0] == np.arange(n)) and np.all(plan.weight == 1)
        with pytest.raises(MethodError, match="smaller than the 6 always kept"):
            METHODS[name](sinks=2, window=4, **kw)(layout(n, labels), st_, L, H, 5)
    with pytest.raises(MethodError, match="needs rho"):
        FlowMM(sinks=2, window=4, **PAPER)(layout(n, labels), Stats(window_scores=imp, keys=keys), L, H, 0.5)
    assert "rho" not in FlowMM(flow_guidance=False).needs
    for bad in (dict(theta=1.5), dict(tau_quantile=-0.1), dict(merge="max"), dict(orphans="keep"), dict(max_absorb=-1), dict(pool=4)):
        with pytest.raises(MethodError):
            FlowMM(**bad)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(10, 70), ratio=st.floats(0.15, 1.0), sinks=st.integers(0, 3), window=st.integers(1, 6),
       n_labels=st.integers(1, 3), seed=st.integers(0, 1000), q=st.floats(0.0, 1.0),
       name=st.sampled_from(["flowmm", "lookm", "flowmm-mean", "flowmm-ungated"]))
def test_merge_invariants(n, ratio, sinks, window, n_labels, seed, q, name):
    labels, imp, keys = make(n, seed, n_labels)
    rho = np.random.default_rng(seed).random(L) * 0.5
    if name.startswith("flowmm"):
        m = FlowMM(sinks=sinks, window=window, tau_quantile=q, pool=1, importance="window",
                   merge="mean" if name == "flowmm-mean" else "pivotal",
                   orphans="ungated" if name == "flowmm-ungated" else "evict")
    else:
        m = METHODS[name](sinks=sinks, window=window)
    protected = set(range(min(sinks, n))) | set(range(max(0, n - window), n))
    try:
        plan = m(layout(n, labels), Stats(window_scores=imp, prompt_scores=imp, keys=keys, rho=rho), L, H, ratio)
    except MethodError as e:
        assert "smaller than" in str(e)
        return
    slots = max(1, math.ceil(ratio * n))
    assert plan.n_slots == slots, "budget respected exactly"
    np.testing.assert_allclose(plan.weight.sum(axis=-1), 1.0, rtol=1e-6)
    assert np.all(np.diff(plan.slot_pos) > 0) and plan.slot_pos[-1] == n * 3 - 2
    for l in range(L):
        for h in range(H):
            piv = plan.src[l, h, :, 0]
            used = plan.src[l, h][plan.src[l, h] >= 0]
            assert protected <= set(piv) and n - 1 in piv
            assert len(used) == len(set(used)), "a token goes to at most one slot"
            for s, j in enumerate(piv):
                absorbed = [c for c in plan.src[l, h, s, 1:] if c >= 0]
                if name.startswith("flowmm"):
                    if rho[l] < m.theta:  # intra-modal layer
                        assert all(labels[c] == labels[j] for c in absorbed), "merged across labels"
                    tau = np.quantile(imp[l, h, piv], q)
                    if imp[l, h, j] > tau and name != "flowmm-ungated":
                        assert not absorbed, "a pivot above tau absorbed tokens"
                if name != "flowmm-mean" and absorbed:
                    assert plan.weight[l, h, s, 0] >= 0.5 - 1e-7


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_absorb_cap_keeps_each_pivots_most_similar_candidates(data):
    """cap_absorbed (one lexsort) against the rule spelled out: per pivot, its candidates sorted
    by similarity, best first, ties to the earlier candidate; beyond max_absorb, evicted."""
    n = data.draw(st.integers(0, 40))
    n_piv = data.draw(st.integers(1, 8))
    k = data.draw(st.integers(0, 5))
    target = np.array(data.draw(st.lists(st.integers(-1, n_piv - 1), min_size=n, max_size=n)), np.int64)
    sim = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=n, max_size=n)))
    want = target.copy()
    for j in range(n_piv):
        mine = sorted(np.flatnonzero(target == j), key=lambda i: (-sim[i], i))
        for i in mine[k:]:
            want[i] = -1
    np.testing.assert_array_equal(cap_absorbed(target, sim, n_piv, k), want)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_top_by_score_keeps_the_protected_and_the_best_others(data):
    """top_by_score (one lexsort for every row) against the rule spelled out per row: the protected
    cells, then the others by score, best first, ties to the earlier position; sorted."""
    n = data.draw(st.integers(1, 30))
    rows = data.draw(st.integers(1, 4))
    scores = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=rows * n, max_size=rows * n)))
    scores = scores.reshape(rows, n)
    protected = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n))), np.int64)
    slots = data.draw(st.integers(len(protected), n))
    for r in range(rows):
        others = sorted(set(range(n)) - set(protected.tolist()), key=lambda i: (-scores[r, i], i))
        want = sorted(protected.tolist() + others[:slots - len(protected)])
        assert top_by_score(scores, protected, slots)[r].tolist() == want
