"""What recall quotes (compression/recall.py), read off the selection alone, no model run: for
generated tasks with every position forgotten, per family, how many quoted sentences hold an
answer and how many do not, split into those the question matched and those reached through a
name (a link); and, for any text file, how many of its sentences a link would join for names of
1, 2 and 3 tokens or more (the rule's NAME_TOKENS), to see what following links costs in prose.

    cd scripts && python recall_selection.py --families single-number,multi-value,variable-tracking \\
        --per-family 8 --seed 21 --length 2048 --limit 96
    cd scripts && python recall_selection.py --text ../docs/METHOD.md /usr/share/common-licenses/GPL-3
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from bench_common import open_model
from flowmm_edge.compression import recall
from flowmm_edge.evaluation import ruler_tasks


def families(model, args) -> None:
    count = lambda t: len(model.tokenize(t, add_special=False))  # noqa: E731
    tally: dict[str, Counter] = {}
    for task in ruler_tasks.generate(args.families.split(","), (args.length,), args.per_family, args.seed, count):
        text = "".join(s.text for s in task.segments if s.kind == "text")
        tokens = np.array(model.tokenize(text, add_special=False, parse_special=False))
        for q in task.questions:
            got = recall.choose(tokens, np.ones(len(tokens), bool), model.tokenize(q.text, add_special=False),
                                args.limit, model.token_to_piece)
            t = tally.setdefault(task.kind, Counter())
            t["questions"] += 1
            said = ""
            for e in got:
                s = model.detokenize([int(x) for x in tokens[e.start:e.end]]).lower()
                said += s
                kind = "matched" if e.phrases else "linked"
                t[f"{kind} with an answer" if any(a.lower() in s for a in q.answers) else f"{kind} without"] += 1
            t["every answer quoted"] += all(a.lower() in said for a in q.answers)
    cols = ["questions", "matched with an answer", "matched without", "linked with an answer", "linked without",
            "every answer quoted"]
    print("| family | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for fam, t in tally.items():
        print(f"| {fam} | " + " | ".join(str(t[c]) for c in cols) + " |")


def prose(model, args) -> None:
    print("| text | tokens | sentences | " + " | ".join(f"joined, names of ≥ {k} tokens" for k in (1, 2, 3))
          + " |\n|---|---|---|---|---|---|")
    for path in args.text:
        tokens = np.array(model.tokenize(open(path, encoding="utf-8").read(), add_special=False,
                                         parse_special=False))
        text = recall._Text(model.token_to_piece)  # the rule's own tokens' text and sentence cut
        starts = sorted({recall._sentence(tokens, i, text)[0] for i in range(len(tokens))})
        which = np.searchsorted(starts, np.arange(len(tokens)), side="right") - 1  # sentence of each position
        shares = []
        for k in (1, 2, 3):
            found = recall._names(tokens, text, min_tokens=k)
            joined = {int(which[p]) for at in found.values() if len(at) == 2 and which[at[0]] != which[at[1]]
                      for p in at}
            shares.append(f"{len(joined) / len(starts):.2f}")
        print(f"| {path} | {len(tokens)} | {len(starts)} | " + " | ".join(shares) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="text model GGUF (default: the embedded default model)")
    ap.add_argument("--families", default=",".join(ruler_tasks.FAMILIES))
    ap.add_argument("--per-family", type=int, default=8)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=recall.DEFAULT_TOKENS, help="tokens a turn may re-read")
    ap.add_argument("--text", nargs="*", default=None, help="text files: the share of sentences links join")
    args = ap.parse_args()
    _, model = open_model(args)
    with model:
        prose(model, args) if args.text else families(model, args)


if __name__ == "__main__":
    main()
