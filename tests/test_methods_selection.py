"""Selection methods (full, streaming, h2o, snapkv, random) against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowmm_edge.methods import METHODS, MethodError, Stats, TokenLayout

L, H = 3, 2


def layout(n, labels=None):
    return TokenLayout(positions=np.arange(n) * 2 + 5, labels=np.zeros(n, int) if labels is None else labels)


def brute_topk(scores_row, protected, slots):
    """Protected cells, then the best others by (higher score, earlier index), by plain Python."""
    others = sorted((i for i in range(len(scores_row)) if i not in set(protected)), key=lambda i: (-scores_row[i], i))
    return sorted(set(protected) | set(others[: slots - len(protected)]))


def brute_pool(row, k):
    n = len(row)
    return np.array([np.mean(row[max(0, i - k // 2): min(n, i + k // 2 + 1)]) for i in range(n)])


def selections(plan):
    return plan.src[..., 0]


@pytest.mark.parametrize("n,budget", [(40, 0.5), (40, 12), (17, 17), (64, 0.25)])
def test_h2o_and_snapkv_equal_brute_force(n, budget):
    rng = np.random.default_rng(n)
    scores = rng.random((L, H, n)).round(2)  # rounding makes ties
    lay = layout(n)
    for name, field in (("h2o", "prompt_scores"), ("snapkv", "window_scores")):
        m = METHODS[name](sinks=2, window=4)
        plan = m(lay, Stats(**{field: scores}), L, H, budget)
        slots = budget if isinstance(budget, int) else math.ceil(budget * n)
        protected = [0, 1] + list(range(n - 4, n))
        for l in range(L):
            for h in range(H):
                got = list(selections(plan)[l, h])
                if name == "h2o":
                    assert got == brute_topk(scores[l, h], protected, slots), (name, l, h)
                else:  # pooled scores tie only up to float rounding: check it is a top-k
                    pooled = brute_pool(scores[l, h], 7)
                    chosen = [i for i in got if i not in protected]
                    rest = [i for i in range(n) if i not in got]
                    assert set(protected) <= set(got) and len(got) == slots
                    if chosen and rest:
                        assert pooled[chosen].min() >= pooled[rest].max() - 1e-12, (l, h)
        assert np.all(plan.weight == 1) and plan.src.shape == (L, H, slots, 1)
        assert np.array_equal(plan.slot_pos, lay.positions[selections(plan)[0, 0]])


def test_ties_go_to_the_earlier_position():
    n = 20
    plan = METHODS["h2o"](sinks=1, window=2)(layout(n), Stats(prompt_scores=np.ones((L, H, n))), L, H, 6)
    assert list(selections(plan)[0, 0]) == [0, 1, 2, 3, 18, 19]


def test_streaming_and_full_and_random():
    n = 30
    lay = layout(n)
    s = METHODS["streaming"](sinks=3, window=4)(lay, Stats(), L, H, 10)
    assert list(selections(s)[1, 1]) == [0, 1, 2] + list(range(23, 30))
    f = METHODS["full"]()(lay, Stats(), L, H, 0.1)
    assert np.array_equal(selections(f), np.broadcast_to(np.arange(n), (L, H, n)))
    r1 = METHODS["random"](sinks=2, window=3, seed=1)(lay, Stats(), L, H, 12)
    r2 = METHODS["random"](sinks=2, window=3, seed=1)(lay, Stats(), L, H, 12)
    assert np.array_equal(r1.src, r2.src)
    assert not np.array_equal(selections(r1)[0, 0], selections(r1)[2, 1])  # heads choose independently


@pytest.mark.parametrize("budget,message", [
    (0.0, "outside \\(0, 1\\]"), (1.5, "outside \\(0, 1\\]"), (float("nan"), "outside"), (0, "at least 1"),
    (31, "outside \\[1, 30\\]"), (5, "smaller than the 6 always kept"), ("half", "neither a ratio"),
])
def test_bad_budgets_are_refused(budget, message):
    with pytest.raises(MethodError, match=message):
        METHODS["h2o"](sinks=2, window=4)(layout(30), Stats(prompt_scores=np.zeros((L, H, 30))), L, H, budget)


def test_missing_or_bad_statistics_are_refused():
    lay = layout(30)
    with pytest.raises(MethodError, match="needs prompt_scores"):
        METHODS["h2o"](sinks=2, window=4)(lay, Stats(), L, H, 0.5)
    with pytest.raises(MethodError, match="shape"):
        METHODS["snapkv"](sinks=2, window=4)(lay, Stats(window_scores=np.zeros((L, H, 29))), L, H, 0.5)
    bad = np.zeros((L, H, 30))
    bad[0, 0, 3] = np.nan
    with pytest.raises(MethodError, match="NaN"):
        METHODS["snapkv"](sinks=2, window=4)(lay, Stats(window_scores=bad), L, H, 0.5)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(8, 80), ratio=st.floats(0.3, 1.0), sinks=st.integers(0, 3), window=st.integers(1, 5),
       name=st.sampled_from(["streaming", "h2o", "snapkv", "random"]), seed=st.integers(0, 10))
def test_invariants(n, ratio, sinks, window, name, seed):
    lay = layout(n)
    scores = np.random.default_rng(seed).random((L, H, n))
    m = METHODS[name](sinks=sinks, window=window)
    protected = set(range(min(sinks, n))) | set(range(max(0, n - window), n))
    try:
        plan = m(lay, Stats(prompt_scores=scores, window_scores=scores), L, H, ratio)
    except MethodError as e:
        assert "smaller than" in str(e)
        return
    slots = max(1, int(np.ceil(ratio * n)))
    assert plan.src.shape[2] == slots
    sel = selections(plan)
    for l in range(L):
        for h in range(H):
            row = list(sel[l, h])
            assert row == sorted(set(row)), "sorted and unique"
            assert protected <= set(row) and n - 1 in row
    assert np.all(np.diff(plan.slot_pos) > 0) and plan.slot_pos[-1] == lay.positions[-1]


@pytest.mark.parametrize("n,slots", [(96, 50), (128, 61)])
def test_flowmm_importance_both_alternates_the_window_and_reconstruction_picks(n, slots):
    """importance="both" with nothing merged keeps the protected cells, then walks both rankings
    a rank at a time (a brute-force loop here), each cell once."""
    from flowmm_edge.methods.flowmm import FlowMM

    rng = np.random.default_rng(n)
    win, rec = rng.random((L, H, n)), rng.random((L, H, n))
    keys = rng.normal(size=(L, H, n, 8))
    m = FlowMM(importance="both", merge="mass", floor=2.0, pool=1, flow_guidance=False)
    plan = m(layout(n), Stats(window_scores=win, reconstruction_scores=rec, keys=keys), L, H, slots)
    assert plan.src.shape[3] == 1
    protected = m.protected(n).tolist()
    for l in range(L):
        for h in range(H):
            lists = [sorted(range(n), key=lambda i: (-s[l, h, i], i)) for s in (win, rec)]
            chosen = set(protected)
            for r in range(n):
                picks = sorted({lists[0][r], lists[1][r]} - chosen)  # a tie between the lists: earlier first
                for i in picks[: slots - len(chosen)]:
                    chosen.add(i)
                if len(chosen) == slots:
                    break
            assert selections(plan)[l, h].tolist() == sorted(chosen)
