"""The difference between two eval runs on the same contexts, with its 95% interval by a bootstrap
that resamples whole contexts and keeps each context's pair together (scoring.paired_interval).

Each side is one or more `eval --json` files; `FILE:PREFIX` puts PREFIX before that file's task
ids, so that runs of several seeds (whose ids repeat) can be joined and matched to one run that
already names them so (eval's ids are `family-length-index`). Only contexts both sides scored count.

    python scripts/paired_difference.py --a docs/runs/eval-hidden-tail-followup-idle-20.json \
        --b docs/runs/eval-hidden-tail-after-10.json:s21- docs/runs/eval-idle-gap-after-seed22.json:s22- \
        --budgets 0.1,0.2 --by-family
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowmm_edge.evaluation import scoring  # noqa: E402


def read_rows(files: list[str]) -> list[dict]:
    """The rows of `eval --json` files, each task id with its file's PREFIX (FILE[:PREFIX])."""
    rows = []
    for spec in files:
        path, _, prefix = spec.partition(":")
        for row in json.loads(Path(path).read_text())["rows"]:
            rows.append({**row, "task": row["task"] if row["task"].startswith(prefix) else prefix + row["task"]})
    return rows


def scores(rows: list[dict], method: str, budget: float, families: set[str] | None,
           excluded: set[str]) -> dict[str, list[float]]:
    """Scores by task id of `method` at `budget` (the full cache at 1.0 whatever `budget` says)."""
    want = 1.0 if method == "full" else budget
    by_task: dict[str, list[float]] = {}
    for row in rows:
        if row["method"] != method or abs(row["budget"] - want) > 1e-9:
            continue
        if (families is not None and row["kind"] not in families) or row["kind"] in excluded:
            continue
        by_task.setdefault(row["task"], []).append(float(row["score"]))
    return by_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", nargs="+", required=True, help="the first run's eval --json files (FILE[:PREFIX])")
    ap.add_argument("--b", nargs="+", required=True, help="the second run's; the difference is b less a")
    ap.add_argument("--method-a", default="flowmm")
    ap.add_argument("--method-b", default=None, help="default: --method-a")
    ap.add_argument("--budgets", default="0.1,0.2")
    ap.add_argument("--families", default=None, help="only these (comma-separated)")
    ap.add_argument("--exclude-families", default="", help="all but these (comma-separated)")
    ap.add_argument("--by-family", action="store_true", help="also one line per family")
    args = ap.parse_args()
    method_b = args.method_b or args.method_a
    families = None if args.families is None else set(args.families.split(","))
    excluded = set(filter(None, args.exclude_families.split(",")))
    rows_a, rows_b = read_rows(args.a), read_rows(args.b)

    def line(budget: float, label: str, fams: set[str] | None) -> None:
        a = scores(rows_a, args.method_a, budget, fams, excluded)
        b = scores(rows_b, method_b, budget, fams, excluded)
        common = sorted(set(a) & set(b))
        if not common:
            print(f"| {budget:.0%} | {label} | 0 | | | |")
            return
        diff, lo, hi = scoring.paired_interval([a[t] for t in common], [b[t] for t in common])
        mean_a = sum(sum(a[t]) for t in common) / sum(len(a[t]) for t in common)
        mean_b = sum(sum(b[t]) for t in common) / sum(len(b[t]) for t in common)
        print(f"| {budget:.0%} | {label} | {len(common)} | {mean_a:.3f} | {mean_b:.3f} | {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] |")

    print(f"| budget | family | contexts | a: {args.method_a} | b: {method_b} | b - a [95%] |")
    print("|---|---|---|---|---|---|")
    for budget in (float(x) for x in args.budgets.split(",")):
        line(budget, "all" if families is None else ",".join(sorted(families)), families)
        if args.by_family:
            for fam in sorted(k for k in {r["kind"] for r in rows_a} - excluded if families is None or k in families):
                line(budget, fam, {fam})


if __name__ == "__main__":
    main()
