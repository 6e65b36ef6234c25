"""FlowMM on the real default model: a long context with a planted fact, compressed to 20% of
its cells after the prefill, still answers correctly (greedy, the model's chatml template)."""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.compression import reconstruction
from flowmm_edge.compression.compressor import Compressor
from flowmm_edge.methods.flowmm import FlowMM
from flowmm_edge.bindings.prompt import ModalityLabels, Segment, feed, prepare

FILL = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]


def _segments(fact: str, fact_modality: str, seed: int):
    rng = np.random.default_rng(seed)

    def filler(k):
        return " ".join(rng.choice(FILL) for _ in range(k))

    return [Segment("text", "<|im_start|>system\nYou are a helpful assistant. Answer briefly.<|im_end|>\n"
                            "<|im_start|>user\nRead the notes and the picture description, then answer.\n"),
            Segment("text", filler(60) + "\n"),
            Segment("text", "Picture: " + filler(50) + f" {fact} " + filler(50) + "\n", modality=fact_modality),
            Segment("text", filler(60) + "\nWhat is the secret passkey? Answer with the number only.<|im_end|>\n"
                                         "<|im_start|>assistant\n")]


@pytest.mark.parametrize("passkey,modality,seed", [
    ("48213", "image", 0),
    pytest.param("90417", "text", 1, marks=pytest.mark.slow),
    pytest.param("26730", "image", 2, marks=pytest.mark.slow),
])
def test_flowmm_at_20_percent_keeps_a_planted_fact(default_model_path, passkey, modality, seed):
    with runtime.Model(default_model_path) as model:
        p = prepare(model, _segments(f"The secret passkey is {passkey}.", modality, seed), ModalityLabels())
        n = p.n_pos
        assert n > 1000
        with runtime.Context(model, n_ctx=n + reconstruction.ROOM, n_batch=512,
                             n_threads=2) as ctx:
            comp = Compressor(FlowMM(), 0.2)
            with comp.observe(ctx, prompt_end=n, labels=p.labels):
                logits = feed(ctx, p, 0)
            report = comp.compress(ctx, p.labels, tokens=reconstruction.tokens_by_position(p.pieces))
            assert kv_cache.used_bound(ctx) == report.cells_after == int(np.ceil(0.2 * n))
            assert report.rho_source == ("prompt" if modality == "image" else "one modality")
            answer = model.detokenize(ctx.greedy(logits, n, 10)[0])
    assert passkey in answer
