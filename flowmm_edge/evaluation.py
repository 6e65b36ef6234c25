"""`eval`: every method sees the identical prefill. Per task: decode the prompt once with the
full cache (whole-prompt statistics on), keep llama.cpp's sequence state, answer greedily; then
for each method and budget restore that state, re-decode the observation window with window
statistics (the same rows a single prefill would have observed), compress, and
  - score the method's own greedy answer with the task's metric;
  - teacher-force the full cache's answer and compare next-token distributions with the full
    cache's (KL(full || method), top-1 agreement): fidelity independent of the metric.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import runtime
from .attention_stats import AttentionStats
from .compression import Compressor
from .methods import METHODS
from .methods.base import MethodError
from .prompt import ModalityLabels, Segment, feed, prepare
from .scoring import score
from .tasks import Task

PLACEHOLDER = "\x01FLOWMM\x01"
SYSTEM = "You are a helpful assistant. Answer briefly."


@dataclasses.dataclass
class Row:
    task: str
    kind: str
    method: str
    budget: float
    n_prompt: int
    cells: int
    answer: str
    score: float
    kl: float        # mean over the full answer's steps of KL(full || method), nats
    top1: float      # share of those steps where both pick the same token


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def wrap(model: runtime.Model, task: Task) -> list[Segment]:
    """The task in the model's chat template: [head] segments [question] [tail]."""
    text = model.format_chat([("system", SYSTEM), ("user", PLACEHOLDER)], add_assistant=True)
    head, _, tail = text.partition(PLACEHOLDER)
    return [Segment("text", head), *task.segments, Segment("text", "\n" + task.question + tail)]


ABLATIONS = {"no-flow": dict(flow_guidance=False), "no-sensitivity": dict(sensitivity=False),
             "no-both": dict(flow_guidance=False, sensitivity=False)}


def make_method(name: str, policy=None):
    """(method, rho or None) for a name: a registered method, or flowmm:<ablation>."""
    if name == "flowmm" and policy is not None:
        return policy.flowmm(), np.asarray(policy.rho)
    base, _, variant = name.partition(":")
    if base not in METHODS or (variant and (base != "flowmm" or variant not in ABLATIONS)):
        known = sorted(METHODS) + [f"flowmm:{a}" for a in ABLATIONS]
        raise MethodError(f"unknown method {name!r} (one of {', '.join(known)})")
    return METHODS[base](**ABLATIONS.get(variant, {})), None


def evaluate_task(model: runtime.Model, task: Task, methods: list[str], budgets: list[float], policy=None,
                  kv_type: str = "f16", n_threads: int | None = None, max_answer: int = 16, projector=None) -> list[Row]:
    p = prepare(model, wrap(model, task), ModalityLabels(), projector, add_bos=True)
    n, labels = p.n_pos, p.labels
    rows = []
    try:
        with runtime.Context(model, n_ctx=n + max_answer + 8, n_batch=512, kv_type=kv_type, n_threads=n_threads) as ctx:
            with AttentionStats(ctx, labels=labels, n_labels=max(2, int(labels.max()) + 1)) as all_rows:
                logits0 = feed(ctx, p, 0)
            state = ctx.state()
            full_tokens, _ = ctx.greedy(logits0, n, max_answer)
            # the full cache's distributions along its own answer
            ctx.set_state(state)
            ref = _teacher_forced(ctx, logits0, full_tokens, n)
            full_answer = model.detokenize(full_tokens)
            rows.append(Row(task.id, task.kind, "full", 1.0, n, n, full_answer,
                            score(task.metric, full_answer, task.answers, task.choices), 0.0, 1.0))
            tail = _trailing_text_tokens(p.pieces)
            for name in methods:
                if name == "full":
                    continue
                method, rho = make_method(name, policy)
                for budget in budgets:
                    ctx.set_state(state)
                    comp = Compressor(method, budget, rho=rho)
                    replayed = comp.replay(ctx, tail, n, labels, whole_prompt=all_rows)
                    logits = logits0 if replayed is None else replayed
                    report = comp.compress(ctx, labels)
                    compressed = ctx.state()
                    got = _teacher_forced(ctx, logits, full_tokens, n)
                    kl = float(np.mean([np.sum(np.exp(a) * (a - b)) for a, b in zip(ref, got)])) if ref else 0.0
                    top1 = float(np.mean([a.argmax() == b.argmax() for a, b in zip(ref, got)])) if ref else 1.0
                    ctx.set_state(compressed)
                    answer = model.detokenize(ctx.greedy(logits, n, max_answer)[0])
                    rows.append(Row(task.id, task.kind, name, float(budget), n, report.cells_after, answer,
                                    score(task.metric, answer, task.answers, task.choices), kl, top1))
    finally:
        p.close()
    return rows


def _trailing_text_tokens(pieces) -> list[int]:
    """The text tokens that end the prompt, up to the last image (the window is re-decoded from them)."""
    out: list[int] = []
    for piece in reversed(pieces):
        if not isinstance(piece, list):
            break
        out = piece + out
    return out


def _teacher_forced(ctx, logits, tokens, pos) -> list[np.ndarray]:
    """Log-probabilities before each of `tokens` when they are fed one by one."""
    out = []
    for t in tokens:
        out.append(_log_softmax(logits))
        logits = ctx.decode([t], pos)
        pos += 1
    return out


def summarize(rows: list[Row]) -> list[dict]:
    """Mean score, score relative to full, KL and top-1 agreement per (method, budget)."""
    full = {r.task: r.score for r in rows if r.method == "full"}
    full_mean = np.mean(list(full.values())) if full else 0.0
    out = []
    for key in sorted({(r.method, r.budget) for r in rows}, key=lambda k: (k[0] != "full", k[1], k[0])):
        rs = [r for r in rows if (r.method, r.budget) == key]
        mean = float(np.mean([r.score for r in rs]))
        out.append({"method": key[0], "budget": key[1], "tasks": len(rs), "score": mean,
                    "vs_full": mean / full_mean if full_mean else float("nan"),
                    "kl": float(np.mean([r.kl for r in rs])), "top1": float(np.mean([r.top1 for r in rs])),
                    "cells": float(np.mean([r.cells / r.n_prompt for r in rs]))})
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| method | budget | tasks | score | vs full | KL (nats) | top-1 | cells kept |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {s['budget']:.2f} | {s['tasks']} | {s['score']:.3f} | {s['vs_full']:.2f} | "
                     f"{s['kl']:.3f} | {s['top1']:.2f} | {s['cells']:.0%} |")
    return "\n".join(lines)


def run(model_path, tasks: list[Task], methods: list[str], budgets: list[float], policy=None, kv_type="f16",
        n_threads=None, json_out: str | Path | None = None, progress: bool = True, mmproj=None) -> list[Row]:
    """All tasks; results so far are written to json_out after every task, so Ctrl-C keeps them."""
    rows: list[Row] = []
    with runtime.Model(model_path) as model:
        projector = None
        if mmproj:
            from .multimodal import Projector

            projector = Projector(mmproj, model, n_threads=n_threads or 2)
        try:
            for task in tqdm(tasks, desc="eval", unit="task", disable=not progress):
                rows += evaluate_task(model, task, methods, budgets, policy, kv_type, n_threads, projector=projector)
                if json_out:
                    Path(json_out).write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in rows],
                                                          "summary": summarize(rows)}, indent=1))
        except KeyboardInterrupt:
            print(f"\ninterrupted after {len({r.task for r in rows})} tasks; results so far kept")
        finally:
            if projector is not None:
                projector.close()
    return rows
