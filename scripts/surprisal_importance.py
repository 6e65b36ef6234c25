#!/usr/bin/env python3
"""Measurement (not a method that ships): FlowMM's predicted importance combined with token
surprisal, -log p(token | the tokens before), from the model's own logits over the prompt
(every position's logits: about 0.38 of a prefill's matrix work on the default model, whose
output layer is large beside its body; docs/METHOD.md, "Learned importance"). Surprisal keeps
more of the planted records of natural prose than the teacher does (0.27 of their tokens in the
top 10%, against 0.11); this asks whether it buys answers after compression.

    cd scripts && python surprisal_importance.py --rule min eval --question after --families ... --methods full,flowmm

Runs `python -m flowmm_edge eval` with every FlowMM's pivot score replaced by a combination of
its own (pooled, per layer and KV head) ranks and the pooled surprisal's ranks of the same cells:
`min`, a cell ranked by the better of the two (kept if either ranks it high, as FlowMM's `both`
importance combines two sources); `mean`, the average of the two ranks. The attention mass the
merge weighs values by is FlowMM's own. Compare with the same eval without this script (the
same seed gives the same contexts).
"""

from __future__ import annotations

import sys

import numpy as np

from flowmm_edge import cli
from flowmm_edge.evaluation import evaluate
from flowmm_edge.methods import flowmm
from flowmm_edge.methods.snapkv import avg_pool
from student_variants import surprisal

RULES = ("min", "mean")
_surprisal: dict[str, np.ndarray] = {}


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[1] != "--rule" or sys.argv[2] not in RULES:
        print(__doc__)
        return 2
    rule, argv = sys.argv[2], sys.argv[3:]
    prefill_init, flowmm_scores = evaluate.Prefill.__init__, flowmm.FlowMM.scores

    def init(self, ctx, p, comps):
        _surprisal["s"] = surprisal(ctx.model, evaluate.reconstruction.tokens_by_position(p.pieces).tolist(), 2)
        prefill_init(self, ctx, p, comps)

    def scores(self, stats, n_layer, n_head_kv, n):
        mass, importance = flowmm_scores(self, stats, n_layer, n_head_kv, n)
        s = _surprisal["s"][:n]  # (one merge of a fresh prefill: cells are positions)
        s = avg_pool(s, self.pool) if self.pool > 1 else s
        own = np.argsort(np.argsort(-importance, axis=-1, kind="stable"), axis=-1)
        theirs = np.argsort(np.argsort(-s, kind="stable"), kind="stable")[None, None, :]
        rank = np.minimum(own, theirs) if rule == "min" else (own + theirs) / 2
        return mass, (n - rank).astype(np.float64)

    evaluate.Prefill.__init__, flowmm.FlowMM.scores = init, scores
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
