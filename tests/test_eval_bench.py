"""`eval` and `bench` end to end on the tiny model, and the state restore they rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO
from flowmm_edge import evaluation, runtime, tasks
from flowmm_edge.prompt import ModalityLabels, feed, prepare


def test_state_restore_gives_the_logits_of_a_fresh_prefill(tiny_models):
    text, _ = tiny_models
    task = tasks.builtin_suite((256,), 1)[1]
    with runtime.Model(text) as model:
        p = prepare(model, evaluation.wrap(model, task), ModalityLabels(), add_bos=True)
        with runtime.Context(model, n_ctx=p.n_pos + 32, n_threads=2) as ctx:
            first = feed(ctx, p, 0)
            state = ctx.state()
            ctx.greedy(first, p.n_pos, 8)  # the cache moves on
            ctx.set_state(state)
            after_restore = ctx.decode([5], p.n_pos)
        with runtime.Context(model, n_ctx=p.n_pos + 32, n_threads=2) as fresh:
            np.testing.assert_array_equal(feed(fresh, p, 0), first)
            np.testing.assert_array_equal(fresh.decode([5], p.n_pos), after_restore)
        p.close()


def test_eval_rows_agree_with_an_independent_run(tiny_models):
    """The 'full' row is the plain greedy answer of a fresh prefill; every method's cells match its budget."""
    text, _ = tiny_models
    task = tasks.builtin_suite((256,), 1)[0]
    with runtime.Model(text) as model:
        rows = evaluation.evaluate_task(model, task, ["snapkv", "flowmm"], [0.25, 0.5], n_threads=2, max_answer=6)
        p = prepare(model, evaluation.wrap(model, task), ModalityLabels(), add_bos=True)
        with runtime.Context(model, n_ctx=p.n_pos + 16, n_threads=2) as ctx:
            want = model.detokenize(ctx.greedy(feed(ctx, p, 0), p.n_pos, 6)[0])
        p.close()
    full = rows[0]
    assert (full.method, full.answer, full.kl, full.top1) == ("full", want, 0.0, 1.0)
    for r in rows[1:]:
        assert r.cells == int(np.ceil(r.budget * r.n_prompt)) and r.kl >= 0 and 0 <= r.top1 <= 1
    # a method that keeps everything is exactly the full cache: KL 0 and full agreement
    with runtime.Model(text) as model:
        same = evaluation.evaluate_task(model, task, ["snapkv"], [1.0], n_threads=2, max_answer=6)[1]
    assert same.kl < 1e-6 and same.top1 == 1.0 and same.answer == full.answer


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flowmm_edge", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)


def test_eval_and_bench_commands_on_the_tiny_model(tmp_path):
    proc = _cli("eval", "--model", "tiny", "--lengths", "256", "--per-kind", "1", "--methods", "flowmm,snapkv",
                "--budgets", "0.2,0.5", "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "e.json").read_text())
    assert len(data["rows"]) == 4 * (1 + 2 * 2)
    assert {(s["method"], s["budget"]) for s in data["summary"]} == {("full", 1.0), ("flowmm", 0.2), ("flowmm", 0.5),
                                                                      ("snapkv", 0.2), ("snapkv", 0.5)}
    assert "| flowmm | 0.20 |" in proc.stdout and (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert "estimated from each prompt" in proc.stderr
    proc = _cli("bench", "--model", "tiny", "--lengths", "256,512", "--budgets", "0.2,0.5", "--methods", "snapkv,flowmm",
                "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    # per length: full x 3 KV types, 2 methods x 2 budgets at f16, flowmm x q8_0 x 2 budgets
    assert len(rows) == 2 * (3 + 4 + 2)
    for r in rows:
        per_cell = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}[r["kv_type"]] * 4 * 2 * 2 * 32
        assert r["kv_bytes"] == round(per_cell) * r["cells"]
        if r["method"] != "full":
            assert r["cells"] == int(np.ceil(r["budget"] * r["n_ctx"]))
    q8 = next(r for r in rows if (r["method"], r["kv_type"], r["budget"], r["n_ctx"]) == ("flowmm", "q8_0", 0.2, 512))
    assert abs(q8["kv_ratio"] - 0.2 * 34 / 64) < 0.01
    bad = _cli("eval", "--model", "tiny", "--budgets", "1.5")
    assert bad.returncode == 1 and "budgets must be ratios" in bad.stderr
    bad = _cli("eval", "--model", "tiny", "--tasks", str(tmp_path / "none.jsonl"))
    assert bad.returncode == 1 and "cannot read the task file" in bad.stderr
