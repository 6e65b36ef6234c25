"""PNG plots of eval and bench results (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_scores(summary: list[dict], path) -> None:
    """Score against budget, one line per method; the full cache as a horizontal line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    full = [s["score"] for s in summary if s["method"] == "full"]
    for method in sorted({s["method"] for s in summary} - {"full"}):
        pts = sorted((s["budget"], s["score"]) for s in summary if s["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    if full:
        ax.axhline(full[0], color="black", linestyle="--", label="full cache")
    modes = sorted({s.get("mode", "") for s in summary} - {""})
    if modes:
        ax.set_title("question " + ", ".join(modes) + " (eval --question)", fontsize=9)
    _finish(fig, path, [(ax, "KV budget (share of the prompt's cells)", "mean task score")])


def plot_bench(rows, path) -> None:
    """KV memory and decode speed against context length (full per KV type and flash-attention
    setting, each method at 10% and 20%), and the seconds each part of a merge takes against
    context length (prefill, statistics, plan, apply; each merging method at f16, its smallest
    budget), so that how each cost grows with the context shows."""
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    series = sorted({(r.method, r.kv_type, r.budget, r.flash_attn, r.build) for r in rows})
    for method, kv, budget, fa, build in series:
        pts = sorted((r.n_ctx, r.kv_bytes / 2 ** 20, r.decode_tok_s) for r in rows
                     if (r.method, r.kv_type, r.budget, r.flash_attn, r.build) == (method, kv, budget, fa, build))
        if method != "full" and budget not in (0.1, 0.2):
            continue
        label = (f"{method} {kv}" + (f" fa {fa}" if method == "full" else f" {budget:.0%}")
                 + ("" if build == "patched" else f", {build.split()[0]}"))
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        b.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    for method in sorted({r.method for r in rows} - {"full"}):
        mine = [r for r in rows if r.method == method and r.kv_type == "f16"]
        if not mine:
            continue
        low = min(r.budget for r in mine)
        pts = sorted((r.n_ctx, r) for r in mine if r.budget == low)
        xs = [p[0] for p in pts]
        for part, get, style in (("prefill", lambda r: r.n_ctx / r.prefill_tok_s, ":"), ("stats", lambda r: r.stats_s, "-"),
                                 ("plan", lambda r: r.plan_s, "--"), ("apply", lambda r: r.apply_s, "-.")):
            if method != sorted({r.method for r in rows} - {"full"})[0] and part == "prefill":
                continue  # one prefill line: it is the same for every method
            c.plot(xs, [max(get(p[1]), 1e-3) for p in pts], style, marker="o",
                   label=part if part == "prefill" else f"{method} {part} ({low:.0%})")
    c.set_yscale("log")
    c.legend(fontsize=6)
    _finish(fig, path, [(a, "context (tokens)", "KV memory held (MiB)"), (b, "context (tokens)", "decode tok/s after the merge"),
                        (c, "context (tokens)", "seconds")])


def _finish(fig, path, axes) -> None:
    for ax, xlabel, ylabel in axes:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
