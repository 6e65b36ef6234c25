"""What the benchmark scripts share: the common arguments, the model, the long prompt."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from flowmm_edge.models import default_model, gguf_file
from flowmm_edge.bindings import runtime

FILLER = "the quick brown fox jumps over the lazy dog while the secret code stays 4711 "


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="text model GGUF (default: the embedded default model)")
    ap.add_argument("--ctx", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--threads", type=int, default=None)


def open_model(args: argparse.Namespace) -> tuple[Path, runtime.Model]:
    runtime.quiet_native_logs()
    path = Path(args.model) if args.model else default_model.ensure()
    return path, runtime.Model(path)


def prompt_tokens(model: runtime.Model, n: int) -> list[int]:
    """A long plain-text prompt of n tokens (BOS first)."""
    text = FILLER * (n // 8 + 16)
    return model.tokenize(text.strip())[:n]


def unseen_copy(src: Path, folder: Path) -> Path:
    """`folder`/copy.gguf: `src` with one header string changed, so no shipped or learned policy
    matches it and FlowMM learns its predictor as for any model a user brings; what it learns
    goes to `folder`/policies (FLOWMM_POLICY_DIR), kept nowhere else."""
    os.environ["FLOWMM_POLICY_DIR"] = str(folder / "policies")
    return gguf_file.renamed_copy(src, folder / "copy.gguf")


def pivots_after_merge(model: runtime.Model, task, method: str, budget: float, policy, threads: int,
                       projector=None):
    """One merge of an eval task's context, as `eval --question after` merges it: (the context's
    token pieces by position, their text, each piece's first character in it, kept [n_layer,
    n_head_kv, n_pos]: which cells are among the pivots of each (layer, KV head)). `projector`:
    the mmproj of a task with images (their cells' pieces are empty)."""
    import numpy as np

    from flowmm_edge.bindings.prompt import ModalityLabels, prepare
    from flowmm_edge.evaluation import evaluate
    from flowmm_edge.methods import flowmm

    captured = {}
    choose = flowmm.top_by_score

    def spy(scores, protected, slots):  # the pivots of the merge's plan, [n_layer, n_head_kv, slots]
        captured["pivots"] = choose(scores, protected, slots)
        return captured["pivots"]

    context, _ = evaluate.wrap(model, task)
    p = prepare(model, context, ModalityLabels(), projector, add_bos=True)
    flowmm.top_by_score = spy
    try:
        tokens = evaluate.reconstruction.tokens_by_position(p.pieces)
        pieces = [model.detokenize([int(t)]) if t >= 0 else "" for t in tokens]
        comps = evaluate.compressions([method], [budget], policy)
        with runtime.Context(model, n_ctx=p.n_pos + evaluate.room_for(comps, 64), n_threads=threads) as ctx:
            evaluate.Prefill(ctx, p, comps).compress(comps[0][2])
    finally:
        flowmm.top_by_score = choose
        p.close()
    if "pivots" not in captured:
        raise SystemExit(f"{method}: not a FlowMM method, so its pivots were not captured")
    pivots = captured["pivots"]
    kept = np.zeros(pivots.shape[:2] + (len(tokens),), bool)
    np.put_along_axis(kept, pivots, True, axis=-1)
    return pieces, "".join(pieces), np.cumsum([0] + [len(x) for x in pieces])[:-1], kept
