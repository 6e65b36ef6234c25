"""Run every native path on the tiny model twice, with the KV cache in this process's memory and
with all layers (and their cache) on an RPC device, and print what each run returned (a JSON
line). Run by tests/test_rpc_backend.py in a process of its own: a registered RPC device stays in
llama.cpp's registry for the process's life.

    python tests/rpc_client.py HOST:PORT TEXT_GGUF MMPROJ_GGUF
    python tests/rpc_client.py gpu TEXT_GGUF MMPROJ_GGUF     # the build's own GPU (CUDA, Metal)

With `gpu` no RPC server is added: -ngl 99 puts the layers on the device the build has
(scripts/gpu_equality.py compares that run with the host's).

Beyond the native entry points: a press on a llama_cpp.Llama of one's own, and two conversations
of one engine (two slots of one context, images included) whose turns merge (FlowMM, blocking
schedule), with the layers on the same device as the entry points' run.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from flowmm_edge.app.conversation import Conversation
from flowmm_edge.app.engine import Engine
from flowmm_edge.bindings import images, kv_cache, rpc, runtime
from flowmm_edge.bindings.attention_stats import AttentionStats
from flowmm_edge.methods import METHODS
from flowmm_edge.compression.compressor import Compressor, predicted_scores
from flowmm_edge.methods.flowmm import FlowMM
from flowmm_edge.methods.importance_predictor import ImportancePredictor, n_features

PROMPT = "the secret key is red and the code is 1234 please tell me what color the cat is " * 6


A_TURNS = ["the secret key is red and the code is 1234 " * 4, "what is the code", "and the key"]
B_TURNS = ["dogs are here in the picture of the city " * 4, "how many dogs", "what city is it"]


def press_run(model_path: str, n_gpu_layers: int) -> dict:
    from llama_cpp import Llama
    from flowmm_edge.press import FlowMMPress

    llm = Llama(model_path=model_path, n_ctx=256, n_batch=64, n_gpu_layers=n_gpu_layers, verbose=False, seed=0)
    try:
        with FlowMMPress(compression_ratio=0.5, window=8, sinks=2).attach(llm) as ap:
            text = llm.create_completion(PROMPT * 2, max_tokens=8, temperature=0)["choices"][0]["text"]
            return {"press_text": text, "press_compressions": ap.compressions, "press_cells": ap.cells()}
    finally:
        llm.close()


def engine_run(model_path: str, mmproj: str, n_gpu_layers: int) -> dict:
    with Engine(model_path, mmproj, method="flowmm", budget=64, policy="none", n_ctx=1024, n_slots=2, max_reply=6,
                n_threads=2, temperature=0.0, schedule="blocking", n_gpu_layers=n_gpu_layers) as engine:
        a, b = Conversation(engine), Conversation(engine)
        replies = []
        for k, (ta, tb) in enumerate(zip(A_TURNS, B_TURNS)):
            replies.append(a.chat(ta, images=[images.pattern(k)] if k == 0 else []))
            replies.append(b.chat(tb))
        return {"slot_replies": replies, "slot_merges": [a.stats.merges, b.stats.merges],
                "slot_cells": [a.cells(), b.cells()]}


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
            out["value_norms"] = kv_cache.value_norms(ctx, 2).tolist()
            out["predicted"] = predicted_scores(pred, ctx).tolist()
            relative = ImportancePredictor(  # keys turned back by RoPE at -pos on the device, and the distance
                "adjacent", rng.normal(size=(lay.n_layer, lay.n_head_kv, n_features(lay.head_dim_k, relative=True))),
                rng.normal(size=(lay.n_layer, lay.n_head_kv)), relative=True)
            out["predicted_relative"] = predicted_scores(relative, ctx).tolist()
            near = ImportancePredictor(  # and near-copies: [reference x block] cosines on the device, sampled 1 in 2
                "adjacent", rng.normal(size=(lay.n_layer, lay.n_head_kv, n_features(lay.head_dim_k, True, True))),
                rng.normal(size=(lay.n_layer, lay.n_head_kv)), relative=True,
                near_copies={"beta": 20.0, "max_reference": len(cells) // 2})
            out["predicted_near_copies"] = predicted_scores(near, ctx).tolist()
            best, cos = kv_cache.match_keys(ctx, 1, np.stack([cells[10:40]] * lay.n_head_kv),
                                            np.stack([cells[:10]] * lay.n_head_kv),
                                            np.zeros((lay.n_head_kv, 30), np.int32), np.ones((lay.n_head_kv, 1, 10), bool))
            out["match_best"], out["match_cos"] = best.tolist(), cos.tolist()
            bias = rng.normal(size=(lay.n_layer, lay.n_head_kv, len(cells))).astype(np.float32)
            kv_cache.set_slot_bias(ctx, bias)
            out["bias_logits"] = ctx.decode([tokens[1]], len(tokens)).tolist()
            out["bias_back"] = kv_cache.get_slot_bias(ctx)[..., :len(cells)].tolist()
            kv_cache.clear_slot_bias(ctx)
            ctx.clear()
            with AttentionStats(ctx, prompt_end=len(tokens), window=8) as stats:
                ctx.decode(tokens, 0)
            out["query_means"] = np.stack([stats.query_mean(l) for l in range(lay.n_layer)]).tolist()
            for name, method in [("snapkv", METHODS["snapkv"](sinks=2, window=8)), ("flowmm", FlowMM(sinks=2, window=8)),
                                 ("expected_attention", METHODS["expected_attention"](sinks=2, window=8))]:
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
    endpoint, model_path, mmproj = sys.argv[1], sys.argv[2], sys.argv[3]
    host = {**run(model_path, 0), **press_run(model_path, 0), **engine_run(model_path, mmproj, 0)}
    if endpoint != "gpu":
        rpc.add_server(endpoint)
    remote = {**run(model_path, 99), **press_run(model_path, 99), **engine_run(model_path, mmproj, 99)}
    print(json.dumps({"host": host, "rpc": remote}))


if __name__ == "__main__":
    main()
