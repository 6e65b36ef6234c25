"""Every method's plan, built from real statistics of the tiny model, applies and decoding continues."""

from __future__ import annotations

import numpy as np
import pytest

import make_tiny_models as tm
from flowmm_edge import kv_cache, runtime
from flowmm_edge.attention_stats import AttentionStats
from flowmm_edge.methods import METHODS, Stats, TokenLayout

SPEC = tm.TINY.text
PROMPT = ("the secret key is red and the code is 1234 please tell me what color the cat is "
          "and how many dogs are here in the picture of the city")


@pytest.fixture(scope="module")
def prepared(tiny_models):
    with runtime.Model(tiny_models[0]) as model:
        tokens = model.tokenize(PROMPT)
        n = len(tokens)
        scores = {}
        for name, window in (("window_scores", 8), ("prompt_scores", None)):
            with runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, n_threads=2) as ctx:
                with AttentionStats(ctx, prompt_end=n, window=window) as stats:
                    ctx.decode(tokens, 0)
                scores[name] = np.stack([stats.column_scores(l, per_kv_head=True) for l in range(SPEC.n_layer)])
        yield model, tokens, Stats(**scores)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_plan_applies_and_decoding_continues(prepared, name):
    model, tokens, stats = prepared
    n = len(tokens)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2) as ctx:
        logits = ctx.decode(tokens, 0)
        cells, positions = kv_cache.seq_cells(ctx)
        layout = TokenLayout(positions=positions, labels=np.zeros(n, int))
        plan = METHODS[name](sinks=2, window=6)(layout, stats, SPEC.n_layer, SPEC.n_head_kv, 0.4)
        kv_cache.apply_plan(ctx, plan.to_cells(cells))
        slots = n if name == "full" else int(np.ceil(0.4 * n))
        assert kv_cache.used_bound(ctx) == slots
        assert np.array_equal(kv_cache.seq_cells(ctx)[1], plan.slot_pos)
        pos = n
        for _ in range(5):
            logits = ctx.decode([int(logits.argmax())], pos)
            assert np.isfinite(logits).all()
            pos += 1
