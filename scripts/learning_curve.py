#!/usr/bin/env python3
"""How fast a model with no predictor learns one from its own chat (self-distillation,
flowmm_edge/calibration/self_distillation.py), in the chat's own code path.

    cd scripts && python learning_curve.py [-m MODEL] [--turns 24] [--turn-tokens 1024] [--threads 2]
                                           [--markdown ../docs/runs/learning-curve.md]

The model is a copy of -m (default: the embedded model) with one header string changed, so no
shipped or learned policy matches it: it learns like any model a user brings. A Session chats
with it: each turn begins a new conversation (the learner takes a conversation's text up to its
first merge, self_distillation.py) with a document of --turn-tokens tokens from the distillation
corpus, past the part `calibrate --distill 16` fitted the shipped predictor on; the reply is one
token and the merge after it runs the repeat pass, which feeds the learner. After each turn the
script fits the student (as the learner does) and prints the held-back rank correlation with the
teacher and the top-10% recall (the share of the teacher's top 10% the student also ranks in its
top 10%), and beside them the same measures for the shipped predictor of the original model on
the same held-back spans (same weights, same keys), when there is one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


from flowmm_edge.app.session import Session
from flowmm_edge.calibration import distillation
from flowmm_edge.calibration import policy as policy_mod
from flowmm_edge.calibration import self_distillation
from flowmm_edge.models import default_model

from bench_common import unseen_copy

SHIPPED_CORPUS_TOKENS = 16 * 2048  # what calibrate --distill 16 cut from the corpus for the shipped predictor


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--turns", type=int, default=24)
    ap.add_argument("--turn-tokens", type=int, default=1024)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--save", type=Path, help="folder to keep the renamed copy (copy.gguf) and the policy the chat "
                                              "switches to (learned.json; the last fit if none was good), for eval")
    ap.add_argument("--compare", type=Path, help="the policy whose predictor is scored beside the student (default: "
                                                 "the model's shipped one); only one of the student's kind (relative "
                                                 "or raw k) can be scored on its held-back keys")
    args = ap.parse_args()
    src = args.model or default_model.ensure()
    shipped = policy_mod.load(args.compare) if args.compare else policy_mod.shipped_for(src)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = unseen_copy(src, Path(tmp))
        good = self_distillation.GOOD_SPEARMAN
        self_distillation.GOOD_SPEARMAN = 2.0  # never switch: the curve goes on past the point the chat would
        with Session(model, method="flowmm", budget=512, n_ctx=args.turn_tokens * 2 + 1024, max_reply=1,
                     n_threads=args.threads) as s:
            s.background = False
            learner = s.engine.learner
            assert learner is not None, "the copy found a policy: it must be unseen"
            if shipped is not None and shipped.predictor is not None and \
                    (shipped.predictor.relative != (learner.rope is not None)
                     or (shipped.predictor.near_copies is not None and learner.near_copies is None)):
                shipped = None  # its features are of other keys than the held-back ones
            skip = SHIPPED_CORPUS_TOKENS // args.turn_tokens + 1
            docs = distillation.documents(s.model, skip + args.turns, args.turn_tokens)[skip:]
            t_start = time.perf_counter()
            for turn, doc in enumerate(docs, 1):
                t0 = time.perf_counter()
                s.reset()  # a new conversation: the learner takes its text up to its first merge
                s.add_user_turn(s.model.detokenize(doc.tokens[1:]))
                list(s.reply())
                s.merge()
                p = learner.progress
                student = learner.fit()[0] if p.n_tokens and learner.held_k else None
                row = {"turn": turn, "tokens_seen": p.n_tokens, "spans": p.n_documents,
                       "held_back_tokens": p.held_back_tokens,
                       "student_spearman": learner.held_back_spearman(student) if student else None,
                       "shipped_spearman": learner.held_back_spearman(shipped.predictor) if shipped else None,
                       "student_top10": learner.held_back_top_recall(student) if student else None,
                       "shipped_top10": learner.held_back_top_recall(shipped.predictor) if shipped else None,
                       "turn_s": time.perf_counter() - t0}
                rows.append(row)
                if args.save and student is not None and not (args.save / "learned.json").exists() and \
                        p.n_tokens >= self_distillation.MIN_TOKENS and row["student_spearman"] >= good:
                    args.save.mkdir(parents=True, exist_ok=True)
                    learner.policy(student, row["student_spearman"]).save(args.save / "learned.json")
                    shutil.copy(model, args.save / "copy.gguf")
                fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
                print(f"turn {turn:3d}: {p.n_tokens:6d} tokens seen, {p.n_documents} spans; held-back Spearman "
                      f"student {fmt(row['student_spearman'])}, shipped {fmt(row['shipped_spearman'])}; top-10% "
                      f"recall student {fmt(row['student_top10'])}, shipped {fmt(row['shipped_top10'])} "
                      f"({row['turn_s']:.1f} s)", flush=True)
            if args.save and not (args.save / "learned.json").exists() and learner.held_k:
                student = learner.fit()[0]  # never good enough inside these turns: the last fit, for eval
                args.save.mkdir(parents=True, exist_ok=True)
                learner.policy(student, learner.held_back_spearman(student)).save(args.save / "learned.json")
                shutil.copy(model, args.save / "copy.gguf")
            total = time.perf_counter() - t_start
    first = next((r for r in rows if r["tokens_seen"] >= self_distillation.MIN_TOKENS
                  and (r["student_spearman"] or -1) >= good), None)
    lines = [f"Self-distillation learning curve: a renamed copy of `{Path(src).name}`, {args.turn_tokens}-token "
             f"document turns, threads {args.threads}, {total:.0f} s in all. Held-back: every "
             f"{self_distillation.HOLD_OUT_EVERY}th span. The chat switches to the student at the first fit "
             f"with >= {self_distillation.MIN_TOKENS} tokens and Spearman >= {good}: "
             f"{'turn ' + str(first['turn']) if first else 'not within these turns'}.", "",
             "| turn | tokens seen (fit) | spans | held-back tokens | student Spearman | shipped predictor Spearman "
             "| student top-10% recall | shipped top-10% recall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {r['turn']} | {r['tokens_seen']} | {r['spans']} | {r['held_back_tokens']} | "
                     f"{fmt(r['student_spearman'])} | {fmt(r['shipped_spearman'])} | {fmt(r['student_top10'])} | "
                     f"{fmt(r['shipped_top10'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
