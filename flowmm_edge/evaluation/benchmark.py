"""`bench`: KV memory and speed of every method side by side, measured in one run.

For each context length: one prompt (filler text, its middle half labelled "image"), decoded
once per KV type; its llama.cpp state is kept and restored for each method and budget, so all
rows share the identical prefill. The full f16 cache is also run with flash attention off (and
on): the faster of the two is the baseline every ratio is to, the full cache "at its fastest
setting". Per row: KV bytes held (cells in use x bytes per cell of the KV type), prefill tok/s,
the seconds the method's statistics add to a prefill (a prefill with them, less the plain one;
plus the repeat-the-context pass for reconstruction scores), plan seconds (reading keys, the
method's host code), apply seconds (the native merge graph), decode tok/s for `n_decode` greedy
tokens after the merge, and the process's resident memory. `targets` prints the performance issue's
ratios from the rows.

Against what a user would otherwise run: at each length, the stock (unpatched) llama.cpp of the
pinned version and this patched build with FlowMM off are each timed by llama_speed.py in a
process of its own (the same code for both; twice each in ABBA order, the faster of the two
kept), full f16 cache at the faster flash-attention setting; `targets` prints the patched/stock
ratio, which should be 1 within noise. The stock libllama is built by
`python scripts/build_native.py --stock`; without it those rows are left out and bench says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import paths
from ..errors import FlowMMError
from ..models import gguf_file
from ..bindings import kv_cache, native, runtime
from ..compression import reconstruction
from ..bindings.attention_stats import AttentionStats
from ..methods.base import PROMPT_SCORES
from ..compression.sequence_compressor import SequenceCompressor


@dataclasses.dataclass
class BenchRow:
    n_ctx: int
    method: str
    kv_type: str
    budget: float
    cells: int
    kv_bytes: int
    prefill_tok_s: float
    stats_s: float
    plan_s: float
    apply_s: float
    decode_tok_s: float
    rss_mib: float
    flash_attn: str = "auto"
    kv_ratio: float = 1.0      # kv_bytes / the fastest full f16 row's at this length
    decode_speedup: float = 1.0  # decode tok/s / the fastest full f16 row's
    build: str = "patched"     # the libllama: "patched" in this process, or STOCK / PATCHED_APART


# The builds timed apart by llama_speed.py, each in a process of its own
STOCK, PATCHED_APART = "stock (own process)", "patched (own process)"
LLAMA_SPEED = Path(__file__).with_name("llama_speed.py")


def stock_lib_dir() -> Path | None:
    """The stock libllama's folder (scripts/build_native.py --stock), or None when not built."""
    d = paths.stock_lib_dir(paths.default_backend())
    return d if (d / paths.LIBLLAMA).is_file() else None


def library_speed(lib_dir: Path, model_path, tokens: list[int], n_decode: int, flash_attn: str,
                  n_threads: int | None) -> dict:
    """Prefill and decode tok/s of the libllama in `lib_dir`, timed by llama_speed.py in a fresh process."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(list(map(int, tokens)), f)
    try:
        cmd = [sys.executable, str(LLAMA_SPEED), "--lib", str(lib_dir), "--model", str(model_path), "--tokens", f.name,
               "--n-decode", str(n_decode), "--fa", flash_attn, "--threads", str(n_threads or os.cpu_count() or 1)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise FlowMMError(f"llama_speed.py on {lib_dir} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(f.name)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompt(model, n_tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = ["grass", "green", "sky", "blue", "river", "hill", "cloud", "stone", "bird", "tree"]
    tokens = model.tokenize(" ".join(rng.choice(words, n_tokens)), add_special=True)[:n_tokens]
    labels = np.zeros(n_tokens + 1024, np.int32)
    labels[n_tokens // 4: 3 * n_tokens // 4] = 1
    return tokens, labels


def _decode_speed(ctx, logits, pos, n):
    t = time.perf_counter()
    for _ in range(n):
        logits = ctx.decode([int(logits.argmax())], pos)
        pos += 1
    return n / (time.perf_counter() - t)


def run(model_path, lengths=(1024, 2048, 4096), budgets=(0.05, 0.1, 0.2, 0.35, 0.5),
        methods=("streaming", "h2o", "snapkv", "lookm", "flowmm"), kv_types=("f16", "q8_0", "q4_0"),
        combos=(("flowmm", "q8_0"),), n_decode=32, n_threads=None, progress=True, flash_attn="auto",
        stock_lib: Path | None | str = "auto", policy=None, placement: dict | None = None) -> list[BenchRow]:
    """`stock_lib`: the folder of the stock libllama; "auto": stock_lib_dir(); None: no stock rows.
    `policy`: FlowMM's (its rho and, if it has one, its importance predictor). `placement`:
    runtime.Model's n_gpu_layers / tensor_split (the stock rows run on the host whatever it says)."""
    facts = gguf_file.read_text_model(model_path)
    rows: list[BenchRow] = []
    stock = stock_lib_dir() if stock_lib == "auto" else stock_lib
    if stock is None and stock_lib == "auto" and progress:
        print("bench: the stock llama.cpp is not built (python scripts/build_native.py --stock): "
              "its rows and the patched/stock ratio are left out", file=sys.stderr)
    with runtime.Model(model_path, **(placement or {})) as model:
        todo = [(L, kv) for L in lengths for kv in kv_types]
        for L, kv in tqdm(todo, desc="bench", unit="config", disable=not progress):
            tokens, labels = _prompt(model, L)
            bpc = facts.kv_bytes_per_token(kv)
            room = max(n_decode + 8, reconstruction.ROOM)
            with runtime.Context(model, n_ctx=L + room, n_batch=512, kv_type=kv, n_threads=n_threads,
                                  flash_attn=flash_attn) as ctx:
                t = time.perf_counter()
                logits0 = ctx.decode(tokens, 0)
                prefill = L / (time.perf_counter() - t)
                state = ctx.state()
                rows.append(BenchRow(L, "full", kv, 1.0, L, L * bpc, prefill, 0.0, 0.0, 0.0,
                                     _decode_speed(ctx, logits0, L, n_decode), _rss_mib(), flash_attn))
                if kv == "f16":  # the full cache with flash attention the other way: which is faster here?
                    other = "off" if flash_attn != "off" else "on"
                    with runtime.Context(model, n_ctx=L + room, n_batch=512, kv_type=kv, n_threads=n_threads,
                                          flash_attn=other) as ctx2:
                        t = time.perf_counter()
                        lg = ctx2.decode(tokens, 0)
                        rows.append(BenchRow(L, "full", kv, 1.0, L, L * bpc, L / (time.perf_counter() - t), 0.0,
                                             0.0, 0.0, _decode_speed(ctx2, lg, L, n_decode), _rss_mib(), other))
                    if stock is not None:  # stock against patched, FlowMM off, each timed apart by the same code
                        fa = fastest_full(rows, L).flash_attn
                        # ABBA order, best of two each: a 2-core machine's run-to-run noise (about 10%
                        # measured here) is larger than the difference being asked about
                        best, modules = {}, set()
                        libs = {PATCHED_APART: Path(native.lib_path).parent, STOCK: stock}
                        for build in (PATCHED_APART, STOCK, STOCK, PATCHED_APART):
                            sp = library_speed(libs[build], model_path, tokens, n_decode, fa, n_threads)
                            modules.add(json.dumps(sp["backends"], sort_keys=True))
                            prev = best.get(build, sp)
                            best[build] = {k: max(prev[k], sp[k]) for k in ("prefill_tok_s", "decode_tok_s")}
                        for build in (PATCHED_APART, STOCK):
                            rows.append(BenchRow(L, "full", kv, 1.0, L, L * bpc, best[build]["prefill_tok_s"], 0.0, 0.0,
                                                 0.0, best[build]["decode_tok_s"], _rss_mib(), fa, build=build))
                        if len(modules) > 1:
                            print(f"bench: warning: the two builds loaded different ggml modules ({' vs '.join(modules)})",
                                  file=sys.stderr)
                names = [m for m in methods if kv == "f16"] + [m for m, k in combos if k == kv]
                all_rows, all_rows_s = None, 0.0
                for name in names:
                    observer = SequenceCompressor(name, 1.0, policy)  # an unknown name fails here
                    needs = observer.needs
                    if PROMPT_SCORES in needs and all_rows is None:  # whole-prompt statistics: one more prefill
                        ctx.clear()
                        t = time.perf_counter()
                        with AttentionStats(ctx) as all_rows:
                            ctx.decode(tokens, 0)
                        all_rows_s = max(0.0, time.perf_counter() - t - L / prefill)
                    window_s = 0.0
                    if PROMPT_SCORES not in needs and observer.needs_observation:
                        # what the observation window's statistics add to a prefill: the prefill with them,
                        # less the plain one (the replays below only re-gather them for each budget)
                        ctx.clear()
                        t = time.perf_counter()
                        with observer.observing(ctx, prompt_end=L, labels=labels):
                            ctx.decode(tokens, 0)
                        window_s = max(0.0, time.perf_counter() - t - L / prefill)
                    # the repeat pass does not depend on the budget: once per method, shared by its budgets
                    repeats, recon_s = reconstruction.RepeatedScores(), 0.0
                    if observer.repeats_context:
                        ctx.set_state(state)
                        t = time.perf_counter()
                        repeats.update(ctx, np.asarray(tokens, np.int32), kept_tail=observer.kept_tail)
                        recon_s = time.perf_counter() - t
                    for budget in budgets:
                        ctx.set_state(state)
                        seq = SequenceCompressor(name, float(budget), policy)
                        seq.share_scores(repeats)
                        replayed = seq.replay(ctx, tokens, L, labels, whole_prompt=all_rows)
                        stats_s = (all_rows_s if PROMPT_SCORES in needs else window_s) + recon_s
                        logits = logits0 if replayed is None else replayed
                        report = seq.merge(ctx, np.asarray(tokens, np.int32), labels)
                        cells = kv_cache.used_bound(ctx)
                        rows.append(BenchRow(L, name, kv, float(budget), report.cells_after, report.cells_after * bpc,
                                             prefill, stats_s, report.plan_s, report.apply_s,
                                             _decode_speed(ctx, logits, L, n_decode), _rss_mib(), flash_attn))
                        assert cells == report.cells_after
    for r in rows:
        base = fastest_full(rows, r.n_ctx)
        r.kv_ratio = r.kv_bytes / base.kv_bytes
        r.decode_speedup = r.decode_tok_s / base.decode_tok_s
    return rows


def fastest_full(rows: list[BenchRow], n_ctx: int) -> BenchRow:
    """The full f16 row that decodes fastest at this length (flash attention on or off, either build)."""
    return max((b for b in rows if b.n_ctx == n_ctx and b.method == "full" and b.kv_type == "f16"),
               key=lambda b: b.decode_tok_s)


def targets(rows: list[BenchRow], decode_budget: float = 0.1, decode_at: int = 8192) -> list[str]:
    """The performance issue's targets as ratios measured in this run, per length and budget of
    FlowMM at f16: statistics + plan + apply against the prefill (<= 5%), plan + apply against
    SnapKV's (<= 3x), decode against the fastest full cache (>= 2.5x at `decode_at` tokens and
    `decode_budget`)."""
    out = []
    for f in sorted((r for r in rows if (r.method, r.kv_type) == ("flowmm", "f16")), key=lambda r: (r.n_ctx, r.budget)):
        L, budget = f.n_ctx, f.budget
        sk = [r for r in rows if (r.n_ctx, r.method, r.kv_type, r.budget) == (L, "snapkv", "f16", budget)]
        prefill_s = L / f.prefill_tok_s
        cost = f.stats_s + f.plan_s + f.apply_s
        line = (f"{L} tokens, flowmm {budget:.0%}: statistics + plan + apply {cost:.2f} s = {cost / prefill_s:.1%} "
                f"of the {prefill_s:.1f} s prefill (target <= 5%)")
        if sk:
            s = sk[0]
            line += (f"; plan + apply {f.plan_s + f.apply_s:.2f} s vs snapkv {s.plan_s + s.apply_s:.2f} s = "
                     f"{(f.plan_s + f.apply_s) / max(s.plan_s + s.apply_s, 1e-9):.1f}x (target <= 3x)")
        base = fastest_full(rows, L)
        line += (f"; decode {f.decode_tok_s:.1f} tok/s vs the fastest full ({base.flash_attn}) "
                 f"{base.decode_tok_s:.1f} = {f.decode_speedup:.2f}x"
                 + (" (target >= 2.5x)" if (L, budget) == (decode_at, decode_budget) else ""))
        out.append(line)
    for L in sorted({r.n_ctx for r in rows}):
        apart = {r.build: r for r in rows if r.n_ctx == L and r.build in (STOCK, PATCHED_APART)}
        if len(apart) == 2:
            p, s = apart[PATCHED_APART], apart[STOCK]
            out.append(f"{L} tokens, full f16 (fa {s.flash_attn}), patched build with FlowMM off vs stock llama.cpp, "
                       f"each in its own process: prefill {p.prefill_tok_s:.1f} vs {s.prefill_tok_s:.1f} tok/s = "
                       f"{p.prefill_tok_s / s.prefill_tok_s:.3f}x, decode {p.decode_tok_s:.1f} vs {s.decode_tok_s:.1f} "
                       f"tok/s = {p.decode_tok_s / s.decode_tok_s:.3f}x (target: 1 within noise)")
    return out


def markdown(rows: list[BenchRow]) -> str:
    lines = ["| context | method | build | KV | FA | budget | cells | KV memory | vs full f16 | prefill tok/s | stats s | "
             "plan s | apply s | decode tok/s | decode vs fastest full | RSS MiB |", "|" + "---|" * 16]
    for r in rows:
        budget = "—" if r.method == "full" else f"{r.budget:.2f}"
        lines.append(f"| {r.n_ctx} | {r.method} | {r.build} | {r.kv_type} | {r.flash_attn} | {budget} | {r.cells} | "
                     f"{r.kv_bytes / 2**20:.2f} MiB | {r.kv_ratio:.1%} | {r.prefill_tok_s:.1f} | {r.stats_s:.2f} | "
                     f"{r.plan_s:.2f} | {r.apply_s:.2f} | {r.decode_tok_s:.1f} | {r.decode_speedup:.2f}x | "
                     f"{r.rss_mib:.0f} |")
    return "\n".join(lines)
