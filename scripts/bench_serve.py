#!/usr/bin/env python3
"""K concurrent multi-turn conversations against `serve`, with FlowMM and with the full cache, in
the same KV memory (the same --ctx): how many conversations stay live, throughput, time to first
token, and whether the answers keep each conversation's fact.

    .venv/bin/python scripts/bench_serve.py [--conversations 16] [--ctx 2048] [--budget 64]
                                            [--methods flowmm,full,llama-server]
                                            [--markdown docs/runs/bench-serve.md --json docs/runs/bench-serve.json]
    .venv/bin/python scripts/bench_serve.py --streams 1,2,4,8 [--stream-tokens 64] [--peer] [--rounds 5]

With --streams, instead: K concurrent streams of --stream-tokens tokens each (ignore_eos) for each
K, one server of -np max(K): aggregate and per-stream tokens/s, time to first token p50/p95 and
peak RSS; --peer runs stock llama-server (scripts/build_llama_server.py, the same pinned source
built for this CPU) with the same model, -c, -np and -t beside it in the same run; --rounds N
measures each K N times with the servers alternating, and reports medians and each round's ratio.

Each conversation opens with a document of about --doc-tokens tokens holding one planted fact
(the suite's single-number family, flowmm_edge/evaluation/ruler_tasks.py: "the special magic
number for X is N" in filler text), asks --turns - 2 short questions, then asks for the number. Clients resend the whole history each turn, as OpenAI clients do. A conversation
is *live* at its last turn if its slot still held its history, so only the new turn was
decoded (`usage.prompt_tokens_details.cached_tokens` over half the prompt); one that was evicted
is prefilled again from the history it resends. The K conversations go in rounds, as K users
chatting at once: every conversation sends its turn k (all at the same time, each in its own
slot, -np K) before any sends turn k + 1. The server runs one worker thread, so prefills queue
and replies stream side by side. "resident at the end" counts the slots that still hold cells.
`llama-server` among --methods runs stock llama-server (scripts/build_llama_server.py) at the same
--ctx, with as many slots as can each hold a whole conversation (a slot holds at most -c / -np
cells; its requests wait for a free slot): the memory comparison at equal KV. By default
llama-server also keeps idle slots' prompts in host memory (--cache-ram, 8 GiB) and restores them;
`--peer-args "--cache-ram 0"` compares the KV buffers alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from flowmm_edge.evaluation import ruler_tasks

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def run_config(args, method: str) -> dict:
    if method == "llama-server":  # the peer at the same KV memory: as many slots as can hold a conversation
        proc, url = start_llama_server(args, peer_slots(args), args.ctx)
    else:
        name, _, recall = method.partition("+recall")  # flowmm+recall96: serve --recall 96
        proc, url = start_server(args, ["-c", str(args.ctx), "-np", str(args.conversations), "--method", name,
                                        "--budget", str(args.budget), "-n", str(args.max_tokens),
                                        *(["--recall", recall] if recall else []),
                                        *(["--policy", args.policy] if args.policy else [])])
    row = {"errors": ["the run did not finish"]}
    try:
        row = {**converse(args, url, method, proc.pid), "server_log": proc.log_path}
        return row
    finally:
        stop(proc, keep_log=bool(row["errors"]))


def peer_slots(args) -> int:
    """llama-server's slots in --ctx cells: as many as can each hold a whole conversation (its
    document, the turns and replies), since a slot cannot hold more than its share."""
    return max(1, args.ctx // (args.doc_tokens + 64 * args.turns + args.max_tokens * args.turns))


def converse(args, url: str, method: str, proc_pid: int | None = None) -> dict:
    tasks = ruler_tasks.generate(families=("single-number",), lengths=(args.doc_tokens,),
                                 per_family=args.conversations, seed=args.seed)
    convs = [{"name": t.id, "doc": "".join(s.text for s in t.segments), "question": t.questions[0].text,
              "answers": t.questions[0].answers} for t in tasks]
    ttft, live, answered, errors, finals = [], [], [], [], []
    lock = threading.Lock()
    rounds = threading.Barrier(len(convs))
    deadline = time.monotonic() + args.time_limit

    def turn(history: list, text: str) -> tuple[str, float, dict]:
        history.append({"role": "user", "content": text})
        body = {"messages": history, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        t0, first, content, usage = time.monotonic(), None, [], {}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=args.time_limit) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if not chunk["choices"]:  # the usage chunk
                    usage = chunk["usage"]
                    continue
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    first = first or time.monotonic() - t0
                    content.append(delta)
        history.append({"role": "assistant", "content": "".join(content)})
        return "".join(content), first if first is not None else time.monotonic() - t0, usage

    def talk(c: dict) -> None:
        history: list = []
        questions = [c["doc"]]
        questions += [f"Name one thing the text mentions (question {k + 1})." for k in range(args.turns - 2)]
        questions += [c["question"] + " Answer with the number only."]
        try:
            for k, q in enumerate(questions):
                rounds.wait(timeout=args.time_limit)
                if time.monotonic() > deadline:
                    return
                answer, t_first, usage = turn(history, q)
                with lock:
                    ttft.append(t_first)
                    if k == len(questions) - 1:
                        # live: the slot still held the history, so only the new turn was decoded
                        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                        live.append(cached > usage.get("prompt_tokens", 0) / 2)
                        answered.append(any(a in answer for a in c["answers"]))
                        finals.append((c["name"], answer, usage.get("prompt_tokens", 0), cached))
        except threading.BrokenBarrierError:  # another conversation failed (its error is listed)
            return
        except Exception as e:
            with lock:
                errors.append(f"{c['name']}: {e}")
            rounds.abort()  # the others must not wait for this one

    metrics0 = httpx.get(url + "/metrics").text
    t0 = time.monotonic()
    threads = [threading.Thread(target=talk, args=(c,)) for c in convs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    metrics1 = httpx.get(url + "/metrics").text
    generated = metric(metrics1, "flowmm_tokens_predicted_total") - metric(metrics0, "flowmm_tokens_predicted_total")
    prompt = metric(metrics1, "flowmm_prompt_tokens_total") - metric(metrics0, "flowmm_prompt_tokens_total")
    reused = metric(metrics1, "flowmm_prompt_tokens_reused_total") - metric(metrics0, "flowmm_prompt_tokens_reused_total")
    q = statistics.quantiles(ttft, n=20) if len(ttft) >= 2 else [ttft[0]] * 19 if ttft else [0.0] * 19
    rss = peak_rss_mib(proc_pid) if proc_pid else 0.0
    return {"method": method, "conversations": args.conversations, "ctx": args.ctx, "peak_rss_mib": rss,
            "slots": peer_slots(args) if method == "llama-server" else args.conversations,
            "budget_cells": args.budget if method != "full" else None, "wall_s": wall,
            "live_at_last_turn": sum(live), "facts_kept": sum(answered), "answered": len(answered),
            "last_turns": sorted(finals),  # (conversation, answer, prompt tokens, cached tokens)
            "tokens_per_s": generated / wall if wall else 0.0, "prompt_tokens": prompt, "prompt_tokens_reused": reused,
            "evictions": metric(metrics1, "flowmm_evictions_total"),
            "importance": next((st for st in ("learning", "predicted", "repeat")
                                if metric(metrics1, f'flowmm_importance_state{{state="{st}"}}') == 1), None),
            "learned_tokens": metric(metrics1, "flowmm_importance_learned_tokens"),
            "merges": sum(metric(metrics1, f'flowmm_merges_total{{schedule="{w}"}}')
                          - metric(metrics0, f'flowmm_merges_total{{schedule="{w}"}}') for w in ("foreground", "background")),
            "resident_at_end": len([m for m in re.findall(r'^flowmm_kv_slot_cells\{slot="\d+"\} ([0-9.]+)$', metrics1,
                                                          re.MULTILINE) if float(m) > 0]),
            "cells_used_at_end": metric(metrics1, "flowmm_kv_cells_used"), "ttft_p50_s": statistics.median(ttft) if ttft else 0.0,
            "ttft_p95_s": q[18], "errors": errors}


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def stop(proc, keep_log: bool) -> None:
    """End a server `launch` started; its stderr file is removed unless `keep_log` (a run with errors)."""
    proc.terminate()
    proc.wait(timeout=30)
    if not keep_log:
        Path(proc.log_path).unlink(missing_ok=True)


def launch(cmd: list[str], name: str):
    """Start a server on the loopback port in `cmd`'s --port; returns (process, url) once /health answers."""
    port = cmd[cmd.index("--port") + 1]
    # the server's stderr goes to a file: a pipe nobody reads fills at 64 KiB and then blocks the
    # server mid-run (every later request would seem to hang); the file's tail explains a failure
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-serve-{name.replace(' ', '-')}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log_path = log.name
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{name} did not come up")


def start_server(args, extra: list[str]):
    """`serve` on a free loopback port."""
    return launch([sys.executable, "-m", "flowmm_edge", "serve", "--port", str(free_port()), *extra,
                   *(["-m", args.model] if args.model else []), *(["-t", str(args.threads)] if args.threads else [])],
                  "the server")


def start_llama_server(args, n_slots: int, ctx: int | None = None):
    """Stock llama-server (scripts/build_llama_server.py) with the same model, -c, -np and -t."""
    import build_llama_server
    from flowmm_edge.models import default_model

    binary = build_llama_server.build(jobs=os.cpu_count() or 2)
    return launch([str(binary), "-m", str(args.model or default_model.ensure()), "--host", "127.0.0.1",
                   "--port", str(free_port()), "-c", str(ctx or args.stream_ctx), "-np", str(n_slots),
                   *args.peer_args.split(),
                   *(["-t", str(args.threads)] if args.threads else [])], "llama-server")


def streams(args, servers: tuple[str, ...] = ("flowmm-edge",)) -> list[dict]:
    """K streams at once (K in --streams), each a short prompt and --stream-tokens tokens
    (ignore_eos), in one server of -np max(K) -c --stream-ctx: aggregate and per-stream decode
    tokens/s (from each stream's first to its last token), time to first token p50/p95, peak RSS.
    `servers`: flowmm-edge's serve (the full cache: nothing to merge in these short streams) and/or
    stock llama-server with the same model and settings, all started first and measured in turn,
    --rounds times for each K (alternating, so that a busy moment of the machine falls on both);
    each figure is the median over the rounds, and `rounds_tok_s` keeps every round's aggregate."""
    ks = [int(k) for k in args.streams.split(",")]
    procs = {}
    try:
        for server in servers:
            if server == "llama-server":
                procs[server] = start_llama_server(args, max(ks))
            else:
                procs[server] = start_server(args, ["-c", str(args.stream_ctx), "-np", str(max(ks)), "--method", "full",
                                                    "-n", str(args.stream_tokens)])

        def one(url: str, k: int, res: list, tokens: int | None = None):
            body = {"messages": [{"role": "user", "content": f"Count slowly from {k} upwards, one number a line."}],
                    "max_tokens": tokens or args.stream_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            t0, first, last, n, pieces = time.monotonic(), None, None, 0, 0
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=args.time_limit) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                        first = first or time.monotonic()
                        last = time.monotonic()
                        pieces += 1
            n = n or pieces
            res.append({"ttft": first - t0, "tokens": n, "span": last - first, "start": first, "end": last})

        def concurrent(url: str, k: int) -> dict:
            res: list = []
            threads = [threading.Thread(target=one, args=(url, i, res)) for i in range(k)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = max(r["end"] for r in res) - min(r["start"] for r in res)
            ttft = sorted(r["ttft"] for r in res)
            return {"aggregate_tok_s": sum(r["tokens"] - 1 for r in res) / wall,
                    "per_stream_tok_s": statistics.mean((r["tokens"] - 1) / r["span"] for r in res),
                    "ttft_p50_s": statistics.median(ttft),
                    "ttft_p95_s": statistics.quantiles(ttft, n=20)[18] if len(ttft) >= 2 else ttft[0]}

        for server in servers:
            one(procs[server][1], 0, [])  # warm up
        runs: dict = {}
        for k in ks:
            for _ in range(args.rounds):
                for server in servers:
                    runs.setdefault((server, k), []).append(concurrent(procs[server][1], k))
                    print(f"[bench_serve] {server}, {k} streams: {runs[server, k][-1]['aggregate_tok_s']:.1f} tok/s "
                          "in all", file=sys.stderr)
        out = []
        for server in servers:
            url = procs[server][1]
            # latency under load: a short request (8 tokens) alone, then while 3 long streams run
            alone, loaded = [], []
            for i in range(3):
                one(url, 100 + i, alone, 8)
                background: list = []
                threads = [threading.Thread(target=one, args=(url, 200 + j, background, 4 * args.stream_tokens))
                           for j in range(3)]
                for t in threads:
                    t.start()
                time.sleep(1.0)  # the three are streaming
                one(url, 300 + i, loaded, 8)
                for t in threads:
                    t.join()
            rss = peak_rss_mib(procs[server][0].pid)
            for k in ks:
                got = runs[server, k]
                row = {key: statistics.median(g[key] for g in got) for key in got[0]}
                out.append({"server": server, "streams": k, **row,
                            "rounds_tok_s": [g["aggregate_tok_s"] for g in got], "peak_rss_mib": rss,
                            "short_ttft_alone_s": statistics.median(r["ttft"] for r in alone),
                            "short_ttft_under_3_s": statistics.median(r["ttft"] for r in loaded)})
    finally:
        for proc, _ in procs.values():
            stop(proc, keep_log=False)
    return out


def streams_markdown(rows: list[dict]) -> str:
    ones = {r["server"]: r["aggregate_tok_s"] for r in rows if r["streams"] == 1}
    peer = {r["streams"]: r["aggregate_tok_s"] for r in rows if r["server"] == "llama-server"}
    ratio = lambda a, b: f"{a / b:.2f}x" if b else "—"  # noqa: E731
    lines = ["| server | concurrent streams | aggregate tok/s | x one stream | x llama-server | per-stream tok/s | "
             "TTFT p50 s | TTFT p95 s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        agg = r["aggregate_tok_s"]
        lines.append(f"| {r['server']} | {r['streams']} | {agg:.1f} | {ratio(agg, ones.get(r['server']))} | "
                     f"{ratio(agg, peer.get(r['streams']))} | {r['per_stream_tok_s']:.1f} | {r['ttft_p50_s']:.2f} | "
                     f"{r['ttft_p95_s']:.2f} | {r['peak_rss_mib']:.0f} |")
    rounds = {(r["server"], r["streams"]): r["rounds_tok_s"] for r in rows}
    if len(next(iter(rounds.values()), [])) > 1 and any(r["server"] == "llama-server" for r in rows):
        lines.append("\nx llama-server, round by round (each round measures both, one after the other):")
        for k in dict.fromkeys(r["streams"] for r in rows):
            ours, theirs = rounds.get(("flowmm-edge", k)), rounds.get(("llama-server", k))
            if ours and theirs:
                each = sorted(a / b for a, b in zip(ours, theirs))
                lines.append(f"- {k} streams: median {statistics.median(each):.2f}x, range {each[0]:.2f}-{each[-1]:.2f}x "
                             f"over {len(each)} rounds")
    for server in dict.fromkeys(r["server"] for r in rows):
        r = next(x for x in rows if x["server"] == server)
        lines.append(f"\n{server}: a short request's first token {r['short_ttft_alone_s']:.2f} s alone, "
                     f"{r['short_ttft_under_3_s']:.2f} s while 3 streams run "
                     f"({r['short_ttft_under_3_s'] / r['short_ttft_alone_s']:.2f}x; median of 3)")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    head = ("| server / method | conversations | slots | KV cells (--ctx) | budget cells | live at the last turn | "
            "resident at the end | facts kept | tokens/s | TTFT p50 s | TTFT p95 s | prompt tokens decoded | reused | "
            "evictions | merges | peak RSS MiB | errors | wall s |")
    lines = [head, "|" + "---|" * 18]
    for r in rows:
        lines.append(f"| {r['method']} | {r['conversations']} | {r.get('slots', r['conversations'])} | {r['ctx']} | "
                     f"{r['budget_cells'] or '—'} | "
                     f"{r['live_at_last_turn']} | {r['resident_at_end']} | {r['facts_kept']}/{r['answered']} | "
                     f"{r['tokens_per_s']:.1f} | "
                     f"{r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | {r['prompt_tokens']:.0f} | "
                     f"{r['prompt_tokens_reused']:.0f} | {r['evictions']:.0f} | {r.get('merges', 0):.0f} | "
                     f"{r.get('peak_rss_mib', 0):.0f} | "
                     f"{len(r['errors'])} | {r['wall_s']:.0f} |")
    for r in rows:
        if r.get("importance"):
            lines.append(f"\n{r['method']}: importance scored at the end by {r['importance']}"
                         + (f", {r['learned_tokens']:.0f} tokens learned from" if r["importance"] == "learning" else ""))
    a = rows[0]
    for b in rows[1:]:
        def ratio(key):
            return f"{a[key] / b[key]:.1f}x" if b[key] else ("∞ (it kept none)" if a[key] else "—")
        lines.append(f"\n{a['method']} / {b['method']} at the same KV memory: live at the last turn "
                     f"{ratio('live_at_last_turn')}, facts kept {ratio('facts_kept')}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="text model GGUF (default: the embedded model)")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=2048, help="KV cells shared by all conversations")
    ap.add_argument("--budget", type=int, default=64, help="cells each FlowMM conversation keeps after a merge")
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--methods", default="flowmm,full",
                    help="serve's --method for each run (METHOD+recallN: with serve --recall N); 'llama-server' runs stock "
                         "llama-server at the same --ctx "
                         "with as many slots as can each hold a whole conversation")
    ap.add_argument("--time-limit", type=float, default=900, help="seconds per configuration")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", help="serve's --policy for FlowMM's runs (default: serve's own, auto)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--streams", default="", help="instead: K concurrent streams for each K listed (1,2,4,8)")
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument("--stream-ctx", type=int, default=4096)
    ap.add_argument("--peer", action="store_true", help="with --streams: stock llama-server beside it in the same run "
                                                        "(built once by scripts/build_llama_server.py)")
    ap.add_argument("--rounds", type=int, default=1, help="with --streams: measure each K this many times, the "
                                                          "servers alternating; figures are medians")
    ap.add_argument("--peer-args", default="", help="more llama-server flags, e.g. '--cache-ram 0' (its host-memory "
                                                    "prompt cache off: the KV buffer alone)")
    args = ap.parse_args()
    if args.streams:
        rows = streams(args, ("flowmm-edge", "llama-server") if args.peer else ("flowmm-edge",))
        table = streams_markdown(rows)
        print(table)
        if args.markdown:
            args.markdown.write_text(table + "\n")
        return 0
    rows = []
    for method in args.methods.split(","):
        print(f"[bench_serve] {method}: {args.conversations} conversations in {args.ctx} cells", file=sys.stderr)
        rows.append(run_config(args, method))
        for e in rows[-1]["errors"]:
            print(f"[bench_serve]   error: {e}", file=sys.stderr)
        if rows[-1]["errors"]:
            print(f"[bench_serve]   the server's log: {rows[-1]['server_log']}", file=sys.stderr)
    table = markdown(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json), "markdown": str(args.markdown)},
                                         "rows": rows}, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
