"""flowmm_edge.models.gguf_file's header scan against gguf-py's GGUFReader (the reference)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from flowmm_edge.models import gguf_file


def _reference(path):
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes)) for t in r.tensors]
    return fields, tensors


@pytest.mark.parametrize("which", [0, 1])
def test_header_scan_equals_gguf_reader(tiny_models, which):
    path = tiny_models[which]
    header = gguf_file.open_gguf(path)
    fields, tensors = _reference(path)
    assert [(t.name, t.shape, t.tensor_type, t.data_offset, t.n_bytes) for t in header.tensors] == tensors
    assert header.fields.keys() == fields.keys()
    for key, want in fields.items():
        got = header.fields[key]
        if isinstance(got, gguf_file.SkippedArray):
            assert got.count == len(want) > gguf_file._KEEP_ARRAY
        elif isinstance(want, float) or (isinstance(want, list) and want and isinstance(want[0], float)):
            assert np.allclose(got, want)
        else:
            assert got == want, key


def test_real_model_facts_equal_gguf_reader(default_model_path):
    facts = gguf_file.read_text_model(default_model_path)
    r = gguf.GGUFReader(default_model_path)
    f = lambda k: r.fields[k].contents()  # noqa: E731
    assert facts.n_layer == f("qwen2.block_count") and facts.n_head_kv == f("qwen2.attention.head_count_kv")
    assert facts.n_params == sum(int(t.n_elements) for t in r.tensors)
