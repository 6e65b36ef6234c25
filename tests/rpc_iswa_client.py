"""The iSWA paths (Gemma 3: the full-attention layers' cache is the one merged) run twice, with
the KV cache in this process's memory and with every layer and both caches on an RPC device;
prints what each run returned (a JSON line). Run by tests/test_rpc_backend.py in a process of its
own, as rpc_client.py is.

    python tests/rpc_iswa_client.py HOST:PORT GEMMA3_GGUF
"""

from __future__ import annotations

import json
import sys

import numpy as np

from flowmm_edge.bindings import kv_cache, rpc, runtime
from flowmm_edge.bindings.attention_stats import AttentionStats

TEXT = ("In the harbour town the ferry leaves at seven and the museum opens at nine. "
        "Maria keeps the key to the lighthouse in a blue box under the stairs. ")


def run(model_path: str, n_gpu_layers: int) -> dict:
    out = {}
    # no weight repacking on the host: the RPC server's CPU backend multiplies the plain Q4_K
    # layout, and the repacked kernels would round a real model's products differently
    with runtime.Model(model_path, n_gpu_layers=n_gpu_layers, repack=False) as m, \
            runtime.Context(m, n_ctx=1024, n_batch=256, n_threads=2) as ctx:
        tokens = m.tokenize(TEXT * 40)[:672]
        n = len(tokens)
        with AttentionStats(ctx, prompt_end=n, window=8) as stats:
            ctx.decode(tokens, 0)
        lay = kv_cache.layout(ctx)
        cells, pos = kv_cache.seq_cells(ctx)
        out["column_scores"] = np.stack([stats.column_scores(l) for l in range(lay.n_layer)]).tolist()
        out["k_rows"] = np.stack([kv_cache.read_rows(ctx, l, 0, cells[::37], "k") for l in range(lay.n_layer)]).tolist()
        out["value_norms"] = np.stack([kv_cache.value_norms(ctx, l) for l in range(lay.n_layer)]).tolist()
        keep = np.setdiff1d(np.arange(n), np.arange(20, 120))
        plan = kv_cache.MergePlan.keep(np.broadcast_to(cells[keep], (lay.n_layer, lay.n_head_kv, len(keep))), pos[keep])
        kv_cache.apply_plan(ctx, plan)
        bias = np.zeros((lay.n_layer, lay.n_head_kv, len(keep)), np.float32)
        bias[..., 200:260] = -np.inf
        kv_cache.set_slot_bias(ctx, bias)
        probe = m.tokenize(" Where is the key?", add_special=False)
        out["merged_logits"] = [ctx.decode([t], n + i).tolist() for i, t in enumerate(probe[:3])]
        out["n_layer"] = lay.n_layer
    return out


def main() -> None:
    endpoint, model_path = sys.argv[1], sys.argv[2]
    host = run(model_path, 0)
    rpc.add_server(endpoint)
    remote = run(model_path, 99)
    print(json.dumps({"host": host, "rpc": remote}))


if __name__ == "__main__":
    main()
