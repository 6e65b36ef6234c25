"""`eval`: answer quality of each method against the full cache, in the ways a question meets a
compressed cache (`MODES`):

  after     (default) the context is prefilled and compressed, the observation window being the
            end of the context, as the chat compresses at the end of a user turn; then each
            question (with its answer prefix) is decoded over the compressed cache and answered.
            The questions about one context share its prefill and, per method and budget, one
            compression: the question's cells are dropped again before the next question.
  inside    the question ends the prompt that is compressed, so the observation window holds it
            (the protocol of SnapKV's and LOOK-M's papers). One prefill per question.
  followup  through the chat's own `Session` (see `followup`).

Every method sees the identical prefill (llama.cpp's sequence state is restored per method and
budget). Per question:
  - the method's greedy answer is scored with the question's metric;
  - the full cache's answer is teacher-forced through the method's cache and the next-token
    distributions are compared with the full cache's: KL(full || method) and top-1 agreement,
    fidelity independent of the metric. Both sides are computed the same way (one batch over the
    answer), so a method that keeps every cell scores KL 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..compression import recall, reconstruction
from ..bindings import kv_cache, runtime
from ..bindings.attention_stats import AttentionStats
from ..methods.base import PROMPT_SCORES
from ..compression.sequence_compressor import SequenceCompressor
from ..bindings.prompt import ModalityLabels, Prepared, Segment, feed, prepare
from ..app.session import DEFAULT_SYSTEM
from . import scoring
from ..errors import FlowMMError
from .rows import Row
from .tasks import Task

MODES = ("after", "inside", "followup", "followup-idle")
PLACEHOLDER = "\x01FLOWMM\x01"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def wrap(model: runtime.Model, task: Task) -> tuple[list[Segment], list[list[Segment]]]:
    """The task in the model's chat template: the context ([head] segments) and, per question,
    what follows it ("\\n" question [tail] answer prefix)."""
    return [Segment("text", _template(model)[0]), *task.segments], [question_segments(model, q) for q in task.questions]


def _template(model: runtime.Model) -> tuple[str, str]:
    text = model.format_chat([("system", DEFAULT_SYSTEM), ("user", PLACEHOLDER)], add_assistant=True)
    head, _, tail = text.partition(PLACEHOLDER)
    return head, tail


def question_segments(model: runtime.Model, q, quoted: str = "") -> list[Segment]:
    """What follows the context for question `q`: "\\n", the recalled excerpts (`quoted`, as chat
    puts them before a turn's text), the question, the template's tail and the answer prefix."""
    return [Segment("text", "\n" + quoted + q.text + _template(model)[1] + q.answer_prefix)]


def recalled(ctx, model: runtime.Model, tokens_by_pos: np.ndarray, question: str, limit: int) -> str:
    """The excerpts a question re-reads from what the merge folded away (chat's rule,
    compression/recall.py), as the text put before it; '' if none."""
    return recall.for_turn(tokens_by_pos, kv_cache.seq_cells(ctx)[1], question, limit, model)[0]


def _answer(ctx, logits, pos: int, max_tokens: int, forced: list[int] | None = None):
    """The greedy answer from `logits` (those before position `pos`), and the log-distributions
    before each token of `forced` (default: that answer) fed in one batch. The cache is left
    ending before `pos`, as it was."""
    tokens, _ = ctx.greedy(logits, pos, max_tokens)
    ctx.truncate(pos)
    forced = tokens if forced is None else forced
    dists = [_log_softmax(logits)] if forced else []
    if len(forced) > 1:
        dists += [_log_softmax(r) for r in ctx.decode(forced[:-1], pos, all_logits=True)]
        ctx.truncate(pos)
    return tokens, dists


def _fidelity(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    if not ref:
        return 0.0, 1.0
    kl = float(np.mean([np.sum(np.exp(a) * (a - b)) for a, b in zip(ref, got)]))
    return kl, float(np.mean([a.argmax() == b.argmax() for a, b in zip(ref, got)]))


def compressions(methods: list[str], budgets: list[float], policy, n_prompt: int | None = None,
                 recall_tokens: int = 0) -> list[tuple[str, float, SequenceCompressor]]:
    """(name, budget, SequenceCompressor) for every method but full at every budget; with
    `recall_tokens`, each merges to budget·n_prompt less them (`merge_cells`)."""
    return [(name, float(budget), SequenceCompressor(name, merge_cells(float(budget), n_prompt, recall_tokens)
                                                     if recall_tokens else float(budget), policy))
            for name in methods if name != "full" for budget in budgets]


def merge_cells(budget: float, n_prompt: int, recall_tokens: int) -> int:
    """eval's rule with recall: a merge keeps budget·n_prompt cells less what a question may
    re-read, so the cache that answers holds no more than the budget, as without recall."""
    cells = math.ceil(budget * n_prompt) - recall_tokens
    if cells < 1:
        raise FlowMMError(f"--recall {recall_tokens} leaves no cells of a {budget:.0%} budget of {n_prompt} positions")
    return cells


def method_label(name: str, recall_tokens: int) -> str:
    """A compressed method's name in the rows: with recall, '+recallN' after it."""
    return f"{name}+recall{recall_tokens}" if recall_tokens else name


def _trailing_text_tokens(pieces) -> list[int]:
    """The text tokens that end the prompt, up to the last image (the window is re-decoded from them)."""
    out: list[int] = []
    for piece in reversed(pieces):
        if not isinstance(piece, list):
            break
        out = piece + out
    return out


class Prefill:
    """A prompt decoded once (with whole-prompt statistics on if a method needs them), its
    reconstruction scores if a method needs them (one pass shared by all), and its llama.cpp
    state, to restore before each method compresses it."""

    def __init__(self, ctx, p: Prepared, comps: list):
        self.ctx, self.p, self.n = ctx, p, p.n_pos
        self.labels = p.labels
        self.rows = None
        if any(PROMPT_SCORES in seq.needs for _, _, seq in comps):
            with AttentionStats(ctx, labels=p.labels, n_labels=max(2, int(p.labels.max()) + 1)) as self.rows:
                self.logits = feed(ctx, p, 0)
        else:
            self.logits = feed(ctx, p, 0)
        self.tokens = reconstruction.tokens_by_position(p.pieces)
        self.repeats = reconstruction.RepeatedScores()  # one repeat pass, shared by every method that needs it
        repeaters = [seq for _, _, seq in comps if seq.repeats_context]
        if repeaters:
            self.repeats.update(ctx, self.tokens, images=reconstruction.images_by_position(p.pieces),
                                kept_tail=min(seq.kept_tail for seq in repeaters))
        self.state = ctx.state()
        self.tail = _trailing_text_tokens(p.pieces)

    def compress(self, seq: SequenceCompressor):
        """Restore the prefill, compress it; returns (logits after the prompt, report)."""
        self.ctx.set_state(self.state)
        seq.share_scores(self.repeats)
        replayed = seq.replay(self.ctx, self.tail, self.n, self.labels, whole_prompt=self.rows)
        report = seq.merge(self.ctx, self.tokens, self.labels)
        return (self.logits if replayed is None else replayed), report


def room_for(comps, room: int) -> int:
    """Free cells a context needs after the prompt: `room`, or a reconstruction chunk if more."""
    if any(seq.repeats_context for _, _, seq in comps):
        return max(room, reconstruction.ROOM)
    return room


def _after(model, task, methods, budgets, policy, ctx_args, projector, recall_tokens: int = 0) -> list[Row]:
    labels = ModalityLabels()
    context, questions = wrap(model, task)
    p = prepare(model, context, labels, projector, add_bos=True)
    try:
        q_tokens = [sum(prepare(model, q, labels).pieces, []) for q in questions]
        n = p.n_pos
        # (with recall: its quote, up to recall_tokens and the newlines between its excerpts)
        room = max(len(t) for t in q_tokens) + recall_tokens + max(q.max_tokens for q in task.questions) + 16
        rows, refs = [], []
        comps = compressions(methods, budgets, policy, n, recall_tokens)
        with runtime.Context(model, n_ctx=n + room_for(comps, room), **ctx_args) as ctx:
            pre = Prefill(ctx, p, comps)

            def ask(k: int, forced=None, quoted: str = ""):
                toks = q_tokens[k] if not quoted else sum(
                    prepare(model, question_segments(model, task.questions[k], quoted), labels).pieces, [])
                out = _answer(ctx, ctx.decode(toks, n), n + len(toks), task.questions[k].max_tokens, forced)
                ctx.truncate(n)  # the question goes: the next one sees the same cache
                return out

            for k, q in enumerate(task.questions):
                tokens, dists = ask(k)
                refs.append((tokens, dists))
                answer = model.detokenize(tokens)
                rows.append(Row("after", task.id, task.kind, k, "full", 1.0, n, n, answer,
                                q.score(answer), 0.0, 1.0))
            for name, budget, comp in comps:
                _, report = pre.compress(comp)
                for k, q in enumerate(task.questions):
                    quoted = recalled(ctx, model, pre.tokens, q.text, recall_tokens) if recall_tokens else ""
                    tokens, got = ask(k, forced=refs[k][0], quoted=quoted)
                    answer = model.detokenize(tokens)
                    extra = len(model.tokenize(quoted, add_special=False)) if quoted else 0
                    rows.append(Row("after", task.id, task.kind, k, method_label(name, recall_tokens), budget, n,
                                    report.cells_after + extra, answer, q.score(answer), *_fidelity(refs[k][1], got)))
    finally:
        p.close()
    return rows


def _inside(model, task, methods, budgets, policy, ctx_args, projector) -> list[Row]:
    labels = ModalityLabels()
    context, questions = wrap(model, task)
    p = prepare(model, context, labels, projector, add_bos=True)
    try:
        qs = [prepare(model, q, labels) for q in questions]
        room = max(q.n_pos for q in qs) + max(q.max_tokens for q in task.questions) + 8
        rows, comps = [], compressions(methods, budgets, policy)
        with runtime.Context(model, n_ctx=p.n_pos + room_for(comps, room), **ctx_args) as ctx:
            for k, (q, qp) in enumerate(zip(task.questions, qs)):
                ctx.clear()
                whole = Prepared(p.pieces + qp.pieces, np.concatenate([p.labels, qp.labels]))
                pre = Prefill(ctx, whole, comps)
                n = pre.n
                ref_tokens, ref = _answer(ctx, pre.logits, n, q.max_tokens)
                answer = model.detokenize(ref_tokens)
                rows.append(Row("inside", task.id, task.kind, k, "full", 1.0, n, n, answer,
                                q.score(answer), 0.0, 1.0))
                for name, budget, comp in comps:
                    logits, report = pre.compress(comp)
                    tokens, got = _answer(ctx, logits, n, q.max_tokens, forced=ref_tokens)
                    answer = model.detokenize(tokens)
                    rows.append(Row("inside", task.id, task.kind, k, name, budget, n, report.cells_after, answer,
                                    q.score(answer), *_fidelity(ref, got)))
    finally:
        p.close()
    return rows


def evaluate_task(model: runtime.Model, task: Task, methods: list[str], budgets: list[float], policy=None,
                  kv_type: str = "f16", n_threads: int | None = None, projector=None, mode: str = "after",
                  flash_attn="auto", recall_tokens: int = 0) -> list[Row]:
    """Rows for the full cache and every (method, budget), one per question; mode "after" or "inside"
    (followup runs through `followup.evaluate_task`, which needs a model path). `recall_tokens`
    (after only): each question re-reads what it names (`recalled`)."""
    if mode not in ("after", "inside"):
        raise ValueError(f"mode {mode!r}: evaluate_task runs 'after' and 'inside'")
    ctx_args = dict(n_batch=512, kv_type=kv_type, n_threads=n_threads, flash_attn=flash_attn)
    if mode == "after":
        return _after(model, task, methods, budgets, policy, ctx_args, projector, recall_tokens)
    if recall_tokens:
        raise FlowMMError("--recall: with the question inside the compressed prompt there is nothing to re-read")
    return _inside(model, task, methods, budgets, policy, ctx_args, projector)


def summarize(rows: list[Row], by_family: bool = False) -> list[dict]:
    """Per (mode, method, budget), and per family too with by_family: mean score, score relative
    to the full cache on the same questions, KL, top-1 agreement and cells kept."""
    def family(r):
        return r.kind or "-" if by_family else "all"

    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.mode, family(r), r.method, r.budget), []).append(r)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2] != "full", k[3], k[2])):
        rs = groups[key]
        full = groups.get((key[0], key[1], "full", 1.0), [])
        full_mean = float(np.mean([r.score for r in full])) if full else float("nan")
        mean = float(np.mean([r.score for r in rs]))
        by_context: dict[str, list[float]] = {}
        for r in rs:
            by_context.setdefault(r.task, []).append(r.score)
        lo, hi = scoring.context_interval(list(by_context.values()))
        out.append({"mode": key[0], "family": key[1], "method": key[2], "budget": key[3], "questions": len(rs),
                    "contexts": len(by_context), "score": mean, "score_lo": lo, "score_hi": hi, "vs_full": mean / full_mean if full_mean else float("nan"),
                    "kl": float(np.mean([r.kl for r in rs])), "top1": float(np.mean([r.top1 for r in rs])),
                    "cells": float(np.mean([r.cells / r.n_prompt for r in rs]))})
    return out


def markdown(summary: list[dict]) -> str:
    """One row per (mode, family, method, budget)."""
    lines = ["| mode | family | method | budget | questions | score [95% interval] | vs full | KL (nats) | top-1 | "
             "cells kept |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['mode']} | {s['family']} | {s['method']} | {s['budget']:.2f} | {s['questions']} | "
                     f"{s['score']:.3f} {interval(s)} | {s['vs_full']:.2f} | {s['kl']:.3f} | {s['top1']:.2f} | {s['cells']:.0%} |")
    return "\n".join(lines)


def score_grid(summary: list[dict], mode: str, family: str = "all") -> str:
    """Mean score, methods down and budgets across, for one mode and family (the full cache first)."""
    sel = [s for s in summary if s["mode"] == mode and s["family"] == family]
    budgets = sorted({s["budget"] for s in sel if s["method"] != "full"})
    methods = sorted({s["method"] for s in sel}, key=lambda m: (m != "full", m))
    cell = {(s["method"], s["budget"]): f"{s['score']:.2f} {interval(s)}" for s in sel}
    lines = [f"| {mode} · {family} | " + " | ".join(f"{b:.0%}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for m in methods:
        vals = [cell.get((m, 1.0 if m == "full" else b)) for b in budgets]
        lines.append(f"| {m} | " + " | ".join("—" if v is None else v for v in vals) + " |")
    return "\n".join(lines)


def interval(s: dict) -> str:
    """A summary cell's 95% interval over its contexts, as [lo–hi] ('' for rows written before it)."""
    return f"[{s['score_lo']:.2f}–{s['score_hi']:.2f}]" if "score_lo" in s else ""


def family_grid(summary: list[dict], mode: str, budget: float) -> str:
    """Mean score at one budget, families down and methods across (the full cache first)."""
    sel = [s for s in summary if s["mode"] == mode and s["family"] != "all"]
    methods = sorted({s["method"] for s in sel}, key=lambda m: (m != "full", m))
    cell = {(s["family"], s["method"]): s["score"] for s in sel if s["budget"] == (1.0 if s["method"] == "full" else budget)}
    lines = [f"| {mode} · {budget:.0%} | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for family in sorted({s["family"] for s in sel}):
        vals = [cell.get((family, m)) for m in methods]
        lines.append(f"| {family} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def run(model_path, tasks: list[Task], methods: list[str], budgets: list[float], policy=None, kv_type="f16",
        n_threads=None, json_out: str | Path | None = None, progress: bool = True, mmproj=None,
        mode: str = "after", flash_attn="auto", placement: dict | None = None,
        idle_teacher: bool = False, recall_tokens: int = 0) -> list[Row]:
    """All tasks in one mode; results so far are written to json_out after every task, so Ctrl-C keeps them.
    `placement`: runtime.Model's n_gpu_layers / tensor_split."""
    placement = placement or {}
    rows: list[Row] = []
    if mode in ("followup", "followup-idle"):
        from . import followup

        def one(task):
            return followup.evaluate_task(model_path, task, methods, budgets, policy, kv_type, n_threads, mmproj,
                                          flash_attn, placement, idle=mode == "followup-idle",
                                          idle_teacher=idle_teacher, recall_tokens=recall_tokens)
        model = projector = None
    else:
        model = runtime.Model(model_path, **placement)
        projector = None
        if mmproj:
            from ..bindings.multimodal import Projector

            projector = Projector(mmproj, model, n_threads=n_threads or 2)

        def one(task):
            return evaluate_task(model, task, methods, budgets, policy, kv_type, n_threads, projector, mode, flash_attn,
                                 recall_tokens)
    try:
        for task in tqdm(tasks, desc=f"eval ({mode})", unit="task", disable=not progress):
            rows += one(task)
            if json_out:
                Path(json_out).write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in rows],
                                                      "summary": summarize(rows) + summarize(rows, by_family=True)},
                                                     indent=1))
    except KeyboardInterrupt:
        print(f"\ninterrupted after {len({r.task for r in rows})} tasks; results so far kept")
    finally:
        for h in (projector, model):
            if h is not None:
                h.close()
    return rows
