"""`bench`: KV memory and speed of every method side by side, measured in one run.

For each context length: one prompt (filler text, its middle half labelled "image"), decoded
once per KV type; its llama.cpp state is kept and restored for each method and budget, so all
rows share the identical prefill. Per row: KV bytes held (cells in use x bytes per cell of the
KV type), prefill tok/s, seconds spent gathering the method's statistics and merging, decode
tok/s for `n_decode` greedy tokens after the merge, and the process's resident memory. A
method that needs reconstruction scores pays for its repeat-the-context pass (one more prefill of
the prompt's text) in the stats seconds.
Ratios are to full f16 at the same length.
"""

from __future__ import annotations

import dataclasses
import resource
import time

import numpy as np
from tqdm import tqdm

from ..models import gguf_file
from ..bindings import kv_cache, runtime
from ..methods import reconstruction
from ..bindings.attention_stats import AttentionStats
from ..methods.compression import Compressor
from .evaluate import make_method
from ..methods.base import PROMPT_SCORES, RECONSTRUCTION_SCORES


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
    merge_s: float
    decode_tok_s: float
    rss_mib: float
    kv_ratio: float = 1.0      # kv_bytes / full f16 at this length
    decode_speedup: float = 1.0


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
        combos=(("flowmm", "q8_0"),), n_decode=32, n_threads=None, progress=True, flash_attn="auto") -> list[BenchRow]:
    facts = gguf_file.read_text_model(model_path)
    rows: list[BenchRow] = []
    with runtime.Model(model_path) as model:
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
                rows.append(BenchRow(L, "full", kv, 1.0, L, L * bpc, prefill, 0.0, 0.0,
                                     _decode_speed(ctx, logits0, L, n_decode), _rss_mib()))
                names = [m for m in methods if kv == "f16"] + [m for m, k in combos if k == kv]
                all_rows, all_rows_s = None, 0.0
                for name in names:
                    method, rho = make_method(name)
                    if PROMPT_SCORES in method.needs and all_rows is None:  # whole-prompt statistics: one more prefill
                        ctx.clear()
                        t = time.perf_counter()
                        with AttentionStats(ctx) as all_rows:
                            ctx.decode(tokens, 0)
                        all_rows_s = max(0.0, time.perf_counter() - t - L / prefill)
                    for budget in budgets:
                        ctx.set_state(state)
                        comp = Compressor(method, budget, rho=rho)
                        t = time.perf_counter()
                        replayed = comp.replay(ctx, tokens, L, labels, whole_prompt=all_rows)
                        if PROMPT_SCORES in method.needs:
                            stats_s = all_rows_s
                        else:
                            stats_s = 0.0 if replayed is None else time.perf_counter() - t
                        if RECONSTRUCTION_SCORES in method.needs:
                            t = time.perf_counter()
                            comp.use_reconstruction(reconstruction.reconstruction_scores(
                                ctx, np.asarray(tokens, np.int32), reconstruction.repeat_prefix(model)))
                            stats_s += time.perf_counter() - t
                        logits = logits0 if replayed is None else replayed
                        t = time.perf_counter()
                        report = comp.compress(ctx, labels)
                        merge_s = time.perf_counter() - t
                        cells = kv_cache.used_bound(ctx)
                        rows.append(BenchRow(L, name, kv, float(budget), report.cells_after, report.cells_after * bpc,
                                             prefill, stats_s, merge_s, _decode_speed(ctx, logits, L, n_decode),
                                             _rss_mib()))
                        assert cells == report.cells_after
    for r in rows:
        base = next(b for b in rows if b.n_ctx == r.n_ctx and b.method == "full" and b.kv_type == "f16")
        r.kv_ratio = r.kv_bytes / base.kv_bytes
        r.decode_speedup = r.decode_tok_s / base.decode_tok_s
    return rows


def markdown(rows: list[BenchRow]) -> str:
    lines = ["| context | method | KV | budget | cells | KV memory | vs full f16 | prefill tok/s | stats s | merge s | "
             "decode tok/s | decode vs full | RSS MiB |", "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r.n_ctx} | {r.method} | {r.kv_type} | {r.budget:.2f} | {r.cells} | {r.kv_bytes / 2**20:.2f} MiB | "
                     f"{r.kv_ratio:.1%} | {r.prefill_tok_s:.1f} | {r.stats_s:.2f} | {r.merge_s:.2f} | "
                     f"{r.decode_tok_s:.1f} | {r.decode_speedup:.2f}x | {r.rss_mib:.0f} |")
    return "\n".join(lines)
