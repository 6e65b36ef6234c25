"""Folding tokens into a kept slot without moving its key: values weighted by attention mass and
a log-mass bias on the slot's logit (merge="mass"). Pure numpy, planned on the host; the native
merge applies it (V weighted apart from K) and the slot bias carries the gain.

Derivation. A query q attends to cell i with weight exp(s_i) / Z, s_i = q.k_i / sqrt(d) + b_i
(b_i: the cell's bias, 0 unless an earlier merge set one), and the output is sum_i exp(s_i) v_i / Z.
Fold a group G of cells into one slot that keeps the key k_p of its pivot p. For i in G write
r_i = exp(s_i - s_p); then

    sum_{i in G} exp(s_i) v_i = exp(s_p) * sum_i r_i v_i = exp(s_p + log R) * (sum_i r_i v_i / R),  R = sum_i r_i,

so a slot with key k_p, value v = sum_i r_i v_i / R and bias b_p + log R contributes exactly what
the group did, to Z as well. That is exact whenever r_i does not depend on the query: for
identical keys r_i = exp(b_i - b_p), and with no bias r_i = 1, giving ToMe's proportional
attention (bias log |G|, the mean value). For keys that differ, r_i is estimated by the masses
the observation queries gave the cells, r_i ~ m_i / m_p (they include each cell's bias), so

    v_slot = sum_i m_i v_i / sum_i m_i,      b_slot = b_p + log(sum_i m_i / m_p).

The estimate holds while k_i and k_p point the same way, so only candidates whose key has cosine
>= `floor` with the pivot's are folded (KeepKV uses 0.8); the rest are evicted, which is what a
selection does with them. With nothing above the floor the plan is the selection itself.
The kept key is never rewritten, so a slot that absorbs nothing is unchanged.

One bound: r_i = min(m_i / m_p, 1), a candidate never counts for more than its pivot. The ratio
is least reliable where the pivot itself drew almost no attention, and there it can reach
millions (a chat measured log gains of 15 after six merges): the slot would then dominate every
query it was not measured on. Bounded, a slot's bias rises by at most log(group size) per
merge, ToMe's value for identical keys, where the rule stays exact (r_i = 1) unless the
candidates carry larger biases than their pivot from earlier merges.
"""

from __future__ import annotations

import numpy as np

from .base import Plan, TokenLayout

MASS_FLOOR = 0.8     # cosine a candidate's key needs with its pivot's to be folded (KeepKV's)
MIN_MASS = 1e-12     # a cell the observation never attended still counts for this much


def floor_for(merge: str, floor: float | None) -> float | None:
    """The key-cosine floor a method uses: the one given, else MASS_FLOOR for the mass rule and
    none for the others (LOOK-M's pivotal rule and the mean fold every candidate)."""
    return MASS_FLOOR if floor is None and merge == "mass" else floor


def mass_plan(layout: TokenLayout, src: np.ndarray, mass: np.ndarray) -> Plan:
    """A Plan from each slot's sources [n_layer, n_head_kv, B, S] (base.merge_sources: the pivot
    first, -1 unused) and the attention mass of every cell [n_layer, n_head_kv, n]."""
    weight = np.zeros(src.shape, np.float32)
    weight[..., 0] = 1.0  # the key stays the pivot's
    v_weight = np.empty(src.shape, np.float32)
    gain = np.empty(src.shape[:-1], np.float32)
    for layer in range(src.shape[0]):  # one layer at a time: the float64 work stays a layer's size
        s = src[layer]
        # every slot at once: r_i = min(mass_i / mass_pivot, 1) over its sources (r_0 = 1: the pivot)
        m = np.take_along_axis(np.asarray(mass[layer], np.float64)[:, None, :], np.maximum(s, 0), axis=-1)
        m = np.maximum(m, MIN_MASS)
        r = np.where(s >= 0, np.minimum(m / m[..., :1], 1.0), 0.0)
        r[..., 0] = 1.0
        total = r.sum(axis=-1)
        v_weight[layer] = r / total[..., None]
        gain[layer] = np.log(total)
    return Plan(src=src, weight=weight, slot_pos=layout.positions[src[0, 0, :, 0]], v_weight=v_weight, bias_gain=gain)
