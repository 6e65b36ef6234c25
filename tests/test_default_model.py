"""The embedded default model: assembled from PyPI, verified, and it answers."""

from __future__ import annotations

import hashlib

import pytest

from flowmm_edge.models import gguf_file
from flowmm_edge.bindings import runtime

EXPECTED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def test_default_model_assembles_and_its_sha256_matches(default_model_path):
    assert default_model_path.stat().st_size == 491_400_064
    h = hashlib.sha256()
    with open(default_model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == EXPECTED_SHA256


def test_default_model_facts(default_model_path):
    m = gguf_file.read_text_model(default_model_path)
    assert (m.architecture, m.n_layer, m.n_head, m.n_head_kv, m.head_dim_k) == ("qwen2", 24, 14, 2, 64)
    assert m.supported


def _greedy_chat(path, question: str, max_tokens: int = 24) -> str:
    """Greedy decoding with the model's own chat template (qwen2 chatml)."""
    prompt = (f"<|im_start|>system\nYou are a helpful assistant. Answer briefly.<|im_end|>\n"
              f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    with runtime.Model(path) as model, runtime.Context(model, n_ctx=512, n_threads=2) as ctx:
        tokens = model.tokenize(prompt, add_special=False)
        return model.detokenize(ctx.greedy(ctx.decode(tokens, 0), len(tokens), max_tokens)[0])


@pytest.mark.parametrize("question,answer", [
    ("What is the capital of France? Answer with one word.", "paris"),
    pytest.param("How many days are in a week? Answer with a number.", "7", marks=pytest.mark.slow),
    pytest.param("Which Python keyword defines a function? Answer with the keyword only.", "def", marks=pytest.mark.slow),
    pytest.param("What is the largest ocean on Earth? One word.", "pacific", marks=pytest.mark.slow),
])
def test_default_model_answers_a_short_factual_prompt(default_model_path, question, answer):
    assert answer in _greedy_chat(default_model_path, question).lower()
