"""Refit merged slots' values to reference queries (after Attention Matching, Zweiger et al. 2026,
arXiv 2602.16284): keep the merge's keys and biases, and choose the values so that, for the
queries given, attention over the slots returns what attention over the whole sequence returned.

For one (layer, KV head), with reference queries Q [m, d] (the KV head's query heads pooled),
the sequence's keys and values K, V [n, d] before the merge, and the slots' keys, biases and
values K', b, V0 [P, d] after it:

    O  = softmax(Q K^T s) V            the output each query got from the whole sequence
    A' = softmax(Q K'^T s + b)         the weights it gives the slots
    V' = argmin ||A' V' - O||^2 + lam ||V' - V0||^2,   lam = ridge * tr(A'^T A') / P

(s = 1/sqrt(d)). Both outputs are local to the sequence (normalised over its own cells): the
rest of the context attends as before, and the slot biases keep the sequence's mass. The ridge
pulls each value toward the merge's own, so a slot few reference queries reach keeps it.
Pure numpy; the caller reads K, V, K', b through kv_cache and writes V' back.
"""

from __future__ import annotations

import numpy as np

RIDGE = 1e-2  # [I] lam relative to the mean diagonal of A'^T A'
QUERY_STRIDE = 4  # [I] the repeat rows whose queries are kept: every 4th


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


def fitted_values(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_slots: np.ndarray, bias: np.ndarray,
                  v_slots: np.ndarray, ridge: float = RIDGE, prior_bias: np.ndarray | None = None) -> np.ndarray:
    """V' [P, d] for queries q [m, d], the sequence's k, v [n, d] and the slots' k_slots [P, d],
    bias [P] (the slot's additive logit bias) and v_slots [P, d] (see the module docstring);
    prior_bias [n]: the biases the sequence's cells carried before the merge (earlier merges')."""
    q = np.asarray(q, np.float64)
    scale = 1.0 / np.sqrt(q.shape[1])
    logits = q @ (np.asarray(k, np.float64).T * scale)
    if prior_bias is not None:  # the biases the sequence's cells carried before the merge
        logits += np.asarray(prior_bias, np.float64)[None, :]
    target = _softmax(logits) @ np.asarray(v, np.float64)
    a = _softmax(q @ (np.asarray(k_slots, np.float64).T * scale) + np.asarray(bias, np.float64)[None, :])
    gram = a.T @ a
    lam = ridge * max(np.trace(gram) / len(gram), 1e-12)
    v0 = np.asarray(v_slots, np.float64)
    return np.linalg.solve(gram + lam * np.eye(len(gram)), a.T @ target + lam * v0)
