"""Run every native path on the tiny model twice, with the KV cache in this process's memory and
with all layers (and their cache) on an RPC device, and print what each run returned (a JSON
line). Run by tests/test_rpc_backend.py in a process of its own: a registered RPC device stays in
llama.cpp's registry for the process's life.

    python tests/rpc_client.py HOST:PORT TEXT_GGUF
"""

from __future__ import annotations

import json
import sys

import numpy as np

from flowmm_edge.bindings import kv_cache, rpc, runtime
from flowmm_edge.methods import METHODS
from flowmm_edge.methods.compression import Compressor
from flowmm_edge.methods.flowmm import FlowMM
from flowmm_edge.methods.importance_predictor import ImportancePredictor, n_features

PROMPT = "the secret key is red and the code is 1234 please tell me what color the cat is " * 6


def run(model_path: str, n_gpu_layers: int) -> dict:
    out: dict = {}
    with runtime.Model(model_path, n_gpu_layers=n_gpu_layers) as m:
        tokens = m.tokenize(PROMPT)
        labels = np.zeros(len(tokens) + 8, np.int32)
        with runtime.Context(m, n_ctx=512, n_batch=64, n_threads=2) as ctx:
            lay = kv_cache.layout(ctx)
            rng = np.random.default_rng(0)
            pred = ImportancePredictor("adjacent", rng.normal(size=(lay.n_layer, lay.n_head_kv, n_features(lay.head_dim_k))),
                                       rng.normal(size=(lay.n_layer, lay.n_head_kv)))
            out["logits"] = ctx.decode(tokens, 0).tolist()
            cells, _ = kv_cache.seq_cells(ctx)
            out["k_rows"] = kv_cache.read_rows(ctx, 1, 0, cells, "k").tolist()
            out["v_rows"] = kv_cache.read_rows(ctx, 1, 1, cells, "v").tolist()
            out["predicted"] = pred.scores(ctx).tolist()
            best, cos = kv_cache.match_keys(ctx, 1, np.stack([cells[10:40]] * lay.n_head_kv),
                                            np.stack([cells[:10]] * lay.n_head_kv),
                                            np.zeros((lay.n_head_kv, 30), np.int32), np.ones((lay.n_head_kv, 1, 10), bool))
            out["match_best"], out["match_cos"] = best.tolist(), cos.tolist()
            bias = rng.normal(size=(lay.n_layer, lay.n_head_kv, len(cells))).astype(np.float32)
            kv_cache.set_slot_bias(ctx, bias)
            out["bias_logits"] = ctx.decode([tokens[1]], len(tokens)).tolist()
            out["bias_back"] = kv_cache.get_slot_bias(ctx)[..., :len(cells)].tolist()
            kv_cache.clear_slot_bias(ctx)
            for name, method in [("snapkv", METHODS["snapkv"](sinks=2, window=8)), ("flowmm", FlowMM(sinks=2, window=8))]:
                ctx.clear()
                comp = Compressor(method, 0.4)
                with comp.observe(ctx, prompt_end=len(tokens), labels=labels):
                    ctx.decode(tokens, 0)
                report = comp.compress(ctx, labels, tokens=np.asarray(tokens, np.int32))
                out[f"{name}_cells"] = report.cells_after
                out[f"{name}_logits"] = ctx.decode([tokens[0]], len(tokens)).tolist()
                out[f"{name}_bias"] = np.nan_to_num(kv_cache.get_slot_bias(ctx), neginf=-1e30).tolist()
                state = ctx.state()
                out[f"{name}_state_bytes"] = len(state)
            with runtime.Context(m, n_ctx=512, n_batch=64, n_threads=2) as other:  # load the last state elsewhere
                other.set_state(state)
                out["loaded_logits"] = other.decode([tokens[2]], len(tokens) + 1).tolist()
            out["state_sha"] = __import__("hashlib").sha256(state).hexdigest()
    return out


def main() -> None:
    endpoint, model_path = sys.argv[1], sys.argv[2]
    host = run(model_path, 0)
    rpc.add_server(endpoint)
    remote = run(model_path, 99)
    print(json.dumps({"host": host, "rpc": remote}))


if __name__ == "__main__":
    main()
