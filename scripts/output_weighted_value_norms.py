#!/usr/bin/env python3
"""Measurement (not what ships): KVzip+'s exact correction, |W_o v| in place of |v|. For each KV
head, the root mean square over its query heads h of |W_o[h] v|, with W_o[h] the columns of
the layer's attention output weight that read head h (dequantized from the GGUF with gguf-py):
sqrt(v^T G v), G the mean of W_o[h]^T W_o[h]. Computed on the host from the cache's V rows, in
place of flowmm_kv_value_norms, then the CLI runs with it:

    cd scripts && python output_weighted_value_norms.py eval --question after ... --methods full,flowmm:value_norm=true

Compare with the same eval without this script (the same seed gives the same contexts).
"""

from __future__ import annotations

import sys

import gguf
import numpy as np
from gguf.quants import dequantize

from flowmm_edge import cli
from flowmm_edge.bindings import kv_cache
from flowmm_edge.models import default_model


def output_grams(path: str) -> dict[int, list[np.ndarray]]:
    """Per layer, per KV head: G = mean over the head's query heads of W_o[h]^T W_o[h]."""
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_head = int(reader.fields[f"{arch}.attention.head_count"].parts[-1][0])
    n_head_kv = int(reader.fields[f"{arch}.attention.head_count_kv"].parts[-1][0])
    grams = {}
    for t in reader.tensors:
        if t.name.endswith("attn_output.weight"):
            w = dequantize(t.data, t.tensor_type).astype(np.float64)  # [n_embd out, n_head * head_dim in]
            hd, gqa = w.shape[1] // n_head, n_head // n_head_kv
            blocks = [w[:, h * hd:(h + 1) * hd] for h in range(n_head)]
            grams[int(t.name.split(".")[1])] = [sum(b.T @ b for b in blocks[g * gqa:(g + 1) * gqa]) / gqa
                                                for g in range(n_head_kv)]
    return grams


def main() -> int:
    grams = output_grams(str(default_model.ensure()))

    def weighted_norms(ctx, layer, seq_id=0):
        cells, _ = kv_cache.seq_cells(ctx, seq_id)
        out = []
        for g, gram in enumerate(grams[layer]):
            v = kv_cache.read_rows(ctx, layer, g, cells, "v", seq_id).astype(np.float64)
            out.append(np.sqrt(np.maximum(np.einsum("nd,de,ne->n", v, gram, v), 0.0)))
        return np.array(out, np.float32)

    kv_cache.value_norms = weighted_norms
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
