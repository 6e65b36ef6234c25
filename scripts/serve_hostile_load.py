#!/usr/bin/env python3
"""`serve` under hostile and impatient clients, on 127.0.0.1: the load behind the server's
robustness targets, each scenario against a fresh server with the default model.

    cd scripts && python serve_hostile_load.py [--model M.gguf] [--bad 1000] [--threads 2]

1. departed: three clients send 20k-token prompts and hang up after 3 s; a fourth asks a short
   question. Printed: the fourth's time to answer (target <= 10 s), and /metrics' cancellations.
2. mixed: four good two-turn conversations run side by side (quiet), then again alongside `--bad`
   bad or oversized requests (invalid JSON, bad parameters, prompts over --max-prompt-tokens,
   local paths, oversized data URLs) sent by four threads. Printed: whether the good answers
   are identical, each good turn's time against its quiet time (target <= 2x), 5xx answers to
   requests a client must fix (target 0), and the server's RSS growth (target < 64 MiB).
3. files: /dev/zero, a FIFO and a 10 GiB sparse file named under --allowed-local-media: the time
   to refuse each (target < 1 s) and the RSS growth (target < 10 MiB).
4. sigterm: SIGTERM while a long prompt prefills: the time to exit (target <= 5 s).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from flowmm_edge.models import default_model

FILLER = "The archive keeps its records in numbered boxes, and each box holds letters from one year. "
GOOD = [("What is the capital of France? Answer in one word.", "And of Italy? One word."),
        ("What is 2 + 3? Answer with a number.", "And 4 + 4?"),
        ("Name a primary colour. One word.", "Name another one."),
        ("Which planet is closest to the Sun? One word.", "And the largest one?")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@contextlib.contextmanager
def server(args, *flags):
    port = free_port()
    cmd = [sys.executable, "-m", "flowmm_edge", "serve", "-m", str(args.model), "--port", str(port),
           "-c", "4096", "-np", "2", "-n", "16", "-t", str(args.threads), *flags]
    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: nobody reads it while the load runs
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(proc.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"the server exited: {log.read()}")
                time.sleep(0.1)
        yield proc
    finally:
        log.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def chat(url: str, messages: list, timeout: float = 600, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"messages": messages, "temperature": 0, **kw},
                      timeout=timeout)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


def departed(args) -> None:
    long_text = FILLER * (20000 // 18)
    with server(args, "--max-prompt-tokens", "32768") as s:
        def leave():
            with contextlib.suppress(httpx.TimeoutException):
                chat(s.url, [{"role": "user", "content": long_text}], timeout=3)
        threads = [threading.Thread(target=leave) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join()
        t0 = time.monotonic()
        r = chat(s.url, [{"role": "user", "content": "What is 2 + 2? Answer with a number."}])
        took = time.monotonic() - t0
        answer = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else f"HTTP {r.status_code}: {r.text}"
        print(f"departed: the fourth client's answer {answer!r} in {took:.1f} s "
              f"after three 20k-token clients left (target <= 10 s); cancelled "
              f"{metric(s.url, 'flowmm_requests_cancelled_total'):.0f}, prompt tokens decoded "
              f"{metric(s.url, 'flowmm_prompt_tokens_total'):.0f}")


def _bad_requests(url: str, n: int, tmp: Path, results: list, nice: int = 0) -> None:
    if nice:  # this load generator shares the server's cores; --bad-nice keeps its own CPU out of the figure
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    huge = base64.b64encode(b"\x89PNG" + b"\0" * (21 * 2 ** 20)).decode()
    oversized = FILLER * 2000
    kinds = [
        lambda: httpx.post(url + "/v1/chat/completions", content=b"{not json", timeout=60),
        lambda: chat(url, [{"role": "user", "content": "hi"}], timeout=60, temperature=-1),
        lambda: chat(url, [{"role": "robot", "content": "hi"}], timeout=60),
        lambda: chat(url, [{"role": "user", "content": oversized}], timeout=60),
        lambda: chat(url, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}],
                     timeout=60),
        lambda: chat(url, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp / "x")}}]}],
                     timeout=60),
        lambda: chat(url, [{"role": "user", "content": "hi"}], timeout=60, max_tokens=0),
    ]
    for i in range(n):
        if i % 100 == 50:  # now and then an oversized data URL: 28 MiB of body
            r = chat(url, [{"role": "user", "content": [{"type": "image_url",
                                                         "image_url": {"url": "data:image/png;base64," + huge}}]}],
                     timeout=60)
        else:
            r = kinds[i % len(kinds)]()
        results.append(r.status_code)


def _good(url: str, k: int, out: dict) -> None:
    first, second = GOOD[k]
    msgs = [{"role": "user", "content": first}]
    times, answers = [], []
    for question in (first, second):
        if question is second:
            msgs += [{"role": "assistant", "content": answers[-1]}, {"role": "user", "content": second}]
        t = time.monotonic()
        r = chat(url, msgs)
        times.append(time.monotonic() - t)
        answers.append(r.json()["choices"][0]["message"]["content"])
    out[k] = (answers, times)


def mixed(args) -> None:
    with server(args) as s, tempfile.TemporaryDirectory() as tmp:
        quiet: dict = {}  # the same four conversations side by side, with nothing else on the server
        threads = [threading.Thread(target=_good, args=(s.url, k, quiet)) for k in range(len(GOOD))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rss0 = rss_mib(s.pid)
        loaded: dict = {}
        codes: list = []
        bad = [threading.Thread(target=_bad_requests, args=(s.url, args.bad // 4, Path(tmp), codes, args.bad_nice))
               for _ in range(4)]
        good = [threading.Thread(target=_good, args=(s.url, k, loaded)) for k in range(len(GOOD))]
        for t in bad + good:
            t.start()
        for t in bad + good:
            t.join()
        grew = rss_mib(s.pid) - rss0
        same = all(quiet[k][0] == loaded[k][0] for k in quiet)
        ratios = [lt / qt for k in quiet for qt, lt in zip(quiet[k][1], loaded[k][1])]
        print(f"mixed: {len(codes)} bad requests, {sum(c >= 500 for c in codes)} answered 5xx (target 0), codes "
              f"{sorted(set(codes))}; good answers identical to the quiet run: {same}; good turns "
              f"{min(ratios):.2f}-{max(ratios):.2f}x their quiet time (target <= 2x; the four side by side "
              f"both times); RSS grew {grew:.1f} MiB (target < 64)")


def files(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        os.mkfifo(d / "fifo.png")
        with open(d / "sparse.png", "wb") as f:
            f.truncate(10 * 2 ** 30)
        (d / "zero.png").symlink_to("/dev/zero")
        with server(args, "--allowed-local-media", tmp) as s:
            rss0 = rss_mib(s.pid)
            for name in ("fifo.png", "sparse.png", "zero.png", "/dev/zero"):
                t = time.monotonic()
                r = chat(s.url, [{"role": "user", "content": [{"type": "image_url",
                                                               "image_url": {"url": str(d / name)}}]}], timeout=30)
                print(f"files: {name}: {r.status_code} in {time.monotonic() - t:.3f} s (target < 1 s): "
                      f"{r.json()['error']['message']}")
            print(f"files: RSS grew {rss_mib(s.pid) - rss0:.1f} MiB (target < 10)")


def sigterm(args) -> None:
    with server(args, "--max-prompt-tokens", "32768") as s:
        t = threading.Thread(target=lambda: _quietly(chat, s.url, [{"role": "user", "content": FILLER * 1000}]),
                             daemon=True)
        t.start()
        time.sleep(5)  # the prefill is under way
        t0 = time.monotonic()
        s.send_signal(signal.SIGTERM)
        s.wait(timeout=60)
        print(f"sigterm: exited {time.monotonic() - t0:.2f} s after SIGTERM during an 18k-token prefill (target <= 5 s)")


def _quietly(fn, *a, **kw):
    with contextlib.suppress(Exception):
        fn(*a, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--bad", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bad-nice", type=int, default=0,
                    help="niceness of the threads sending the bad requests (Linux): the load generator shares the "
                         "server's cores, and its own CPU otherwise counts against the good turns")
    ap.add_argument("--only", default="departed,mixed,files,sigterm")
    args = ap.parse_args()
    args.model = Path(args.model) if args.model else default_model.ensure()
    for name in args.only.split(","):
        {"departed": departed, "mixed": mixed, "files": files, "sigterm": sigterm}[name](args)


if __name__ == "__main__":
    main()
