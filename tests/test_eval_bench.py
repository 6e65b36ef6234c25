"""`eval` and `bench` end to end on the tiny model, through the command line (the eval modes
themselves: tests/test_eval_modes.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

import numpy as np

from conftest import REPO
from flowmm_edge import paths
from flowmm_edge.bindings import native, runtime
from flowmm_edge.evaluation import benchmark


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flowmm_edge", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)


def test_eval_and_bench_commands_on_the_tiny_model(tmp_path):
    proc = _cli("eval", "--model", "tiny", "--lengths", "256", "--per-kind", "1", "--families", "single-number,multi-key",
                "--methods", "flowmm,snapkv", "--budgets", "0.2,0.5", "--json", str(tmp_path / "e.json"),
                "--plot", str(tmp_path / "e.png"), "--quiet", "--by-family", "--markdown", str(tmp_path / "e.md"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "e.json").read_text())
    # 3 questions (multi-key asks two), each: full + 2 methods x 2 budgets, all in the default mode
    assert len(data["rows"]) == 3 * (1 + 2 * 2) and {r["mode"] for r in data["rows"]} == {"after"}
    assert {(s["method"], s["budget"]) for s in data["summary"] if s["family"] == "all"} == {
        ("full", 1.0), ("flowmm", 0.2), ("flowmm", 0.5), ("snapkv", 0.2), ("snapkv", 0.5)}
    assert {s["family"] for s in data["summary"]} == {"all", "single-number", "multi-key"}
    assert "| after | all | flowmm | 0.20 |" in proc.stdout and "| after · 50% | full | flowmm | snapkv |" in proc.stdout
    assert "| multi-key |" in proc.stdout and (tmp_path / "e.md").read_text().count("| after · ") == 3
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert "estimated from each prompt" in proc.stderr
    proc = _cli("eval", "--model", "tiny", "--suite", "builtin", "--lengths", "256", "--per-kind", "1", "--methods",
                "snapkv", "--budgets", "0.5", "--question", "inside", "--json", str(tmp_path / "i.json"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "i.json").read_text())["rows"]
    assert len(rows) == 4 * 2 and {r["mode"] for r in rows} == {"inside"}
    # a user's own tasks: one with two questions about its context, one in the single-question form
    seg = [{"type": "text", "text": "Ann is 4 and Bo is 7. " * 20}, {"type": "text", "text": "Cy is 9.", "modality": "image"}]
    (tmp_path / "own.jsonl").write_text(
        json.dumps({"id": "two", "segments": seg, "questions": [{"question": "Ann?", "answers": ["4"], "max_tokens": 4},
                                                                  {"question": "Cy?", "answers": ["9"], "max_tokens": 4}]})
        + "\n" + json.dumps({"id": "one", "segments": seg, "question": "Bo?", "answers": ["7"], "max_tokens": 4}) + "\n")
    for mode in ("after", "inside"):
        proc = _cli("eval", "--model", "tiny", "--tasks", str(tmp_path / "own.jsonl"), "--methods", "snapkv",
                    "--budgets", "0.5", "--question", mode, "--json", str(tmp_path / "own.json"), "--quiet")
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = json.loads((tmp_path / "own.json").read_text())["rows"]
        assert [(r["task"], r["question"], r["method"]) for r in rows] == [
            ("two", 0, "full"), ("two", 1, "full"), ("two", 0, "snapkv"), ("two", 1, "snapkv"),
            ("one", 0, "full"), ("one", 0, "snapkv")] if mode == "after" else [
            ("two", 0, "full"), ("two", 0, "snapkv"), ("two", 1, "full"), ("two", 1, "snapkv"),
            ("one", 0, "full"), ("one", 0, "snapkv")]
        assert {r["mode"] for r in rows} == {mode}
    bad = _cli("eval", "--model", "tiny", "--families", "single-number,haystack")
    assert bad.returncode == 1 and "unknown task family 'haystack'" in bad.stderr
    # the patched library stands in for the stock one: what is checked is that both are timed apart
    proc = _cli("bench", "--model", "tiny", "--lengths", "256,512", "--budgets", "0.2,0.5", "--methods", "snapkv,flowmm",
                "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"), "--quiet",
                "--stock-lib", str(paths.installed_native_lib_dir()))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    # per length: full x 3 KV types, full f16 with flash attention the other way, full f16 timed apart
    # for the stock and the patched library, 2 methods x 2 budgets at f16, flowmm x q8_0 x 2 budgets
    assert len(rows) == 2 * (4 + 2 + 4 + 2)
    for L in (256, 512):
        full16 = [r for r in rows if (r["n_ctx"], r["method"], r["kv_type"]) == (L, "full", "f16")]
        here = [r for r in full16 if r["build"] == "patched"]
        assert sorted(r["flash_attn"] for r in here) == ["auto", "off"]
        fastest_here = max(here, key=lambda r: r["decode_tok_s"])
        apart = sorted((r["build"], r["flash_attn"]) for r in full16 if r["build"] != "patched")
        assert apart == [("patched (own process)", fastest_here["flash_attn"]), ("stock (own process)", fastest_here["flash_attn"])]
        fastest = max(full16, key=lambda r: r["decode_tok_s"])
        assert fastest["decode_speedup"] == 1.0
        for r in rows:
            if r["n_ctx"] == L:
                assert abs(r["decode_speedup"] - r["decode_tok_s"] / fastest["decode_tok_s"]) < 1e-9
                assert r["plan_s"] >= 0 and r["apply_s"] >= 0 and (r["method"] == "full") == (r["apply_s"] == 0)
    assert "statistics + plan + apply" in proc.stdout and "vs snapkv" in proc.stdout
    assert proc.stdout.count("patched build with FlowMM off vs stock llama.cpp") == 2
    bad = _cli("bench", "--model", "tiny", "--stock-lib", str(tmp_path))
    assert bad.returncode == 2 and f"{tmp_path} holds no libllama" in bad.stderr
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


def test_llama_speed_decodes_what_this_process_decodes(model, tiny_models):
    """llama_speed.py, run apart on this build's library through llama-cpp-python alone (as bench
    runs it on the stock one), greedily decodes the tokens this process's own decode loop does:
    it timed the model, not an empty loop."""
    tokens = model.tokenize("the grass is green and the sky is blue " * 12)
    with runtime.Context(model, n_ctx=len(tokens) + 64, n_threads=2, flash_attn="off") as ctx:
        logits, pos, want = ctx.decode(tokens, 0), len(tokens), []
        for _ in range(8):
            want.append(int(logits.argmax()))
            logits = ctx.decode([want[-1]], pos)
            pos += 1
    got = benchmark.library_speed(paths.installed_native_lib_dir(), tiny_models[0], tokens, 8, "off", 2)
    assert got["tokens"] == want
    assert got["prefill_tok_s"] > 0 and got["decode_tok_s"] > 0
    assert Path(got["lib"]).resolve().parent == paths.installed_native_lib_dir().resolve()
    assert got["backends"]["CPU"] == os.path.basename(native.loaded_backends["CPU"])  # the variant this process runs
