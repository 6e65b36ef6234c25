"""Every method, driven by compression.Compressor on the tiny model: it asks for its statistics
during the real prefill, its plan applies through the native API, and decoding continues."""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.models import tiny as tm
from conftest import TINY_PROMPT, span_labels
from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.compression.compressor import Compressor
from flowmm_edge.methods import METHODS
from flowmm_edge.methods.flowmm import FlowMM

SPEC = tm.TINY.text
PROMPT = TINY_PROMPT


CASES = [(name, "f16") for name in sorted(METHODS) + ["flowmm-policy"]] + [("flowmm", "q8_0"), ("lookm", "q8_0")]


@pytest.mark.parametrize("name,kv_type", CASES)
def test_method_plan_applies_and_decoding_continues(model, name, kv_type):
    tokens = model.tokenize(PROMPT)
    n = len(tokens)
    labels = span_labels(n)
    if name == "flowmm-policy":
        comp = Compressor(FlowMM(sinks=2, window=6), 0.4, rho=np.array([0.0, 1.0, 0.0, 1.0]))
    else:
        comp = Compressor(METHODS[name](sinks=2, window=6), 0.4)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, n_threads=2, kv_type=kv_type) as ctx:
        with comp.observe(ctx, prompt_end=n, labels=labels):
            logits = ctx.decode(tokens, 0)
        cells0, before = kv_cache.seq_cells(ctx)
        k0 = {(l, h): kv_cache.read_rows(ctx, l, h, cells0, "k") for l in range(SPEC.n_layer) for h in range(SPEC.n_head_kv)}
        report = comp.compress(ctx, labels, tokens=np.asarray(tokens))
        slots = n if name == "full" else int(np.ceil(0.4 * n))
        assert (report.cells_before, report.cells_after) == (n, slots)
        assert kv_cache.used_bound(ctx) == slots
        kept = kv_cache.seq_cells(ctx)[1]
        assert set(kept) <= set(before) and kept[-1] == n - 1 and list(kept[:2]) == [0, 1]
        if report.plan is not None:  # each slot's key is the plan's weighted sum of the old keys
            cells1 = kv_cache.seq_cells(ctx)[0]
            p = report.plan
            for (l, h), k in k0.items():
                want = np.einsum("bs,bsd->bd", p.weight[l, h], k[np.maximum(p.src[l, h], 0)])
                got = kv_cache.read_rows(ctx, l, h, cells1, "k")
                tol = 2e-3 if kv_type == "f16" else 3e-2
                assert np.abs(got - want).max() <= tol * np.abs(want).max(), (l, h)
        if name in ("flowmm", "lookm"):
            assert (report.plan.src[..., 1:] >= 0).any(), "some tokens were merged, not only kept"
        if name.startswith("flowmm"):
            assert report.rho_source == ("policy" if name == "flowmm-policy" else "prompt")
            assert report.rho.shape == (SPEC.n_layer,) and np.all((report.rho >= 0) & (report.rho <= 1))
        pos = n
        for _ in range(5):
            logits = ctx.decode([int(logits.argmax())], pos)
            assert np.isfinite(logits).all()
            pos += 1


def test_a_plan_runs_with_one_blas_thread(model):
    """numpy's BLAS threads spin after a call and take the cores from the decode that follows:
    the plan runs with one, as threadpoolctl (the reference) reports from inside it."""
    from threadpoolctl import threadpool_info

    seen = []

    class Spy(FlowMM):
        def plan(self, *args):
            seen.append([lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"])
            return super().plan(*args)

    tokens = model.tokenize(TINY_PROMPT)
    labels = span_labels(len(tokens))
    with runtime.Context(model, n_ctx=512, n_batch=64, n_threads=2) as ctx:
        comp = Compressor(Spy(sinks=2, window=4), 0.5)
        with comp.observe(ctx, prompt_end=len(tokens), labels=labels):
            ctx.decode(tokens, 0)
        comp.compress(ctx, labels, tokens=np.asarray(tokens, np.int32))
    assert seen and seen[0] and all(n == 1 for n in seen[0])
