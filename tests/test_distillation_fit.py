"""The predictor's fit with sample weights (importance_predictor.fit_ridge, as
scripts/student_variants.py uses it). Reference: numpy's least squares on rows repeated as often
as they weigh."""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.methods.importance_predictor import fit_ridge


def test_a_weighted_fit_equals_least_squares_on_rows_repeated_as_often_as_they_weigh():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6)) * rng.uniform(0.2, 3, 6) + rng.normal(size=6)
    y = x @ rng.normal(size=6) + rng.normal(size=300)  # noisy: weights change the answer
    weight = rng.integers(1, 5, size=300)
    w, b = fit_ridge(x, y, 0.0, weight.astype(float))
    rows = np.repeat(np.arange(300), weight)
    ref, *_ = np.linalg.lstsq(np.c_[x[rows], np.ones(len(rows))], y[rows], rcond=None)
    np.testing.assert_allclose(w, ref[:-1], rtol=1e-6, atol=1e-8)
    assert b == pytest.approx(ref[-1], rel=1e-6, abs=1e-8)
    unweighted, _ = fit_ridge(x, y, 0.0)
    assert not np.allclose(w, unweighted, atol=1e-3)  # the weights mattered
