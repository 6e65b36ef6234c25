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
    """KV memory and decode speed against context length: full (per KV type) and each method at each budget."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    series = sorted({(r.method, r.kv_type, r.budget) for r in rows})
    for method, kv, budget in series:
        pts = sorted((r.n_ctx, r.kv_bytes / 2 ** 20, r.decode_tok_s) for r in rows
                     if (r.method, r.kv_type, r.budget) == (method, kv, budget))
        if method != "full" and budget not in (0.1, 0.2):
            continue
        label = f"{method} {kv}" + ("" if method == "full" else f" {budget:.0%}")
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        b.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    _finish(fig, path, [(a, "context (tokens)", "KV memory held (MiB)"), (b, "context (tokens)", "decode tok/s after the merge")])


def _finish(fig, path, axes) -> None:
    for ax, xlabel, ylabel in axes:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
