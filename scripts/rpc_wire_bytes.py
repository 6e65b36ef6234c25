#!/usr/bin/env python3
"""What crosses the wire when the layers and their KV cache live on llama.cpp RPC servers.

    cd scripts && python rpc_wire_bytes.py --ctx 4096 --budget 0.1 [--servers 2] [--threads 2]

Starts `--servers` RPC servers on loopback (this package's `rpc.serve`, llama.cpp's rpc-server),
each behind a byte-counting TCP proxy, and loads the model with every layer on them (-ngl 99,
split evenly with --tensor-split when there are two). Then, counting the bytes each way and the
round trips (a reply after a request, per connection) at the proxies:

- load: the weights going to the servers;
- prefill: `--ctx` tokens decoded into the cache on the servers;
- merge: FlowMM (the package's policy for the model: predicted importance) down to `--budget`;
  the target is that it moves O(cells x heads) floats, never the cache;
- decode: `--decode` tokens after the merge, per token.

Each phase is put against the cache's own size (cells x KV bytes per cell, from the GGUF) and
priced on a LAN from the measured bytes and round trips at `--gbps` and `--rtt-ms`.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import numpy as np

from bench_common import add_common_args, prompt_tokens


# ggml-rpc's commands (enum rpc_cmd in the pinned ggml-rpc.cpp); each request is [cmd u8][size u64][payload]
RPC_COMMANDS = ["alloc_buffer", "get_alignment", "get_max_size", "buffer_get_base", "free_buffer", "buffer_clear",
                "set_tensor", "set_tensor_hash", "get_tensor", "copy_tensor", "graph_compute", "get_device_memory",
                "init_tensor", "get_alloc_size", "hello", "device_count", "graph_recompute", "memset_tensor"]


class RequestParser:
    """Splits the client-to-server stream into ggml-rpc requests and adds up bytes per command."""

    def __init__(self, by_command: dict):
        self.by_command, self.header, self.left, self.cmd = by_command, b"", 0, None

    def feed(self, data: bytes) -> None:
        while data:
            if self.left:
                take = min(self.left, len(data))
                self.by_command[self.cmd] = self.by_command.get(self.cmd, 0) + take
                self.left -= take
                data = data[take:]
                continue
            need = 9 - len(self.header)
            self.header += data[:need]
            data = data[need:]
            if len(self.header) == 9:
                code, size = self.header[0], int.from_bytes(self.header[1:], "little")
                self.cmd = RPC_COMMANDS[code] if code < len(RPC_COMMANDS) else f"cmd{code}"
                self.by_command[self.cmd] = self.by_command.get(self.cmd, 0) + 9
                self.header, self.left = b"", size


class CountingProxy:
    """127.0.0.1:port -> upstream, counting bytes each way, request/reply turns, and the bytes
    of each ggml-rpc command sent."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.sent = self.received = self.round_trips = 0
        self.by_command: dict[str, int] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.sent, self.received, self.round_trips

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(self.upstream)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            state = {"last": None, "parser": RequestParser(self.by_command)}
            threading.Thread(target=self._pump, args=(client, server, True, state), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, state), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool, state: dict) -> None:
        try:
            while data := src.recv(1 << 20):
                with self.lock:
                    if to_server:
                        self.sent += len(data)
                        state["parser"].feed(data)
                    else:
                        self.received += len(data)
                        if state["last"] == "request":
                            self.round_trips += 1
                    state["last"] = "request" if to_server else "reply"
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--servers", type=int, default=1, choices=[1, 2])
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--gbps", type=float, default=1.0, help="LAN bandwidth to price the bytes at (default 1 Gb/s)")
    ap.add_argument("--rtt-ms", type=float, default=0.5, help="LAN round-trip time per request (default 0.5 ms)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from flowmm_edge.bindings import kv_cache, rpc, runtime
    from flowmm_edge.calibration import policy as policy_mod
    from flowmm_edge.compression.sequence_compressor import SequenceCompressor
    from flowmm_edge.models import default_model, gguf_file

    runtime.quiet_native_logs()
    threads = args.threads or 2
    servers, proxies = [], []
    try:
        for _ in range(args.servers):
            port = free_port()
            servers.append(rpc.spawn_local(port, threads))
            proxies.append(CountingProxy(("127.0.0.1", port)))
        rpc.add_servers([f"127.0.0.1:{p.port}" for p in proxies])

        def total() -> np.ndarray:
            # ggml-rpc sends set_tensor and graph_compute without waiting for a reply, so a call can
            # return before the proxy has read its bytes: wait until the counters are still
            # (the client is idle here), so each phase is charged what it sent
            last, still = None, 0
            while still < 3:
                now = np.sum([p.snapshot() for p in proxies], axis=0)
                still = still + 1 if last is not None and np.array_equal(now, last) else 0
                last = now
                time.sleep(0.02)
            return last

        parts: dict[str, np.ndarray] = {}  # the merge's bytes by native entry point

        def counted(owner, name: str, label: str) -> None:
            fn = getattr(owner, name)

            def wrapper(*a, **k):
                before = total()
                try:
                    return fn(*a, **k)
                finally:
                    parts[label] = parts.get(label, 0) + (total() - before)
            setattr(owner, name, wrapper)

        from flowmm_edge.methods import importance_predictor
        for owner, name, label in [(importance_predictor.ImportancePredictor, "scores", "importance (predictor graph)"),
                                   (kv_cache, "match_keys", "key matching"), (kv_cache, "apply_plan", "apply the plan"),
                                   (kv_cache, "set_slot_bias", "slot bias")]:
            counted(owner, name, label)

        path = args.model or default_model.ensure()
        facts = gguf_file.read_text_model(path)
        phases, t0 = {}, total()
        start = time.perf_counter()
        model = runtime.Model(path, n_gpu_layers=99, tensor_split=[1.0] * args.servers if args.servers > 1 else None)
        tokens = prompt_tokens(model, args.ctx)
        phases["load"] = (total() - t0, time.perf_counter() - start)
        pol = policy_mod.shipped_for(path)
        seq = SequenceCompressor("flowmm", args.budget, pol)
        labels = np.zeros(len(tokens) + args.decode + 8, np.int32)
        with runtime.Context(model, n_ctx=args.ctx + 512, n_batch=512, n_threads=threads) as ctx:
            t0, start = total(), time.perf_counter()
            with seq.observing(ctx, prompt_end=len(tokens), labels=labels):
                logits = ctx.decode(tokens, 0)
            phases["prefill"] = (total() - t0, time.perf_counter() - start)
            t0, start = total(), time.perf_counter()
            report = seq.merge(ctx, np.asarray(tokens, np.int32), labels)
            phases["merge"] = (total() - t0, time.perf_counter() - start)
            t0, start = total(), time.perf_counter()
            pos = ctx.next_pos()
            for _ in range(args.decode):
                tok = int(np.argmax(logits))
                logits = ctx.decode([tok], pos)
                pos += 1
            phases["decode"] = (total() - t0, time.perf_counter() - start)
            cells_after = len(kv_cache.seq_cells(ctx)[0]) - args.decode
        model.close()
    finally:
        for s in servers:
            s.kill()
            s.wait()

    cache_bytes = len(tokens) * facts.kv_bytes_per_token("f16")
    bw = args.gbps * 1e9 / 8
    rows = []
    for name, ((sent, received, trips), seconds) in phases.items():
        per = args.decode if name == "decode" else 1
        moved = sent + received
        rows.append({"phase": name, "sent_bytes": int(sent) / per, "received_bytes": int(received) / per,
                     "round_trips": int(trips) / per, "share_of_cache": moved / per / cache_bytes,
                     "loopback_s": seconds / per, "lan_s": moved / per / bw + trips / per * args.rtt_ms / 1e3})
    print(f"{facts.name}: {len(tokens)} tokens, cache {cache_bytes / 2**20:.1f} MiB (f16), merged to "
          f"{cells_after} cells with {report.method} ({getattr(seq.method, 'importance', '')}), "
          f"{args.servers} RPC server(s) on loopback; LAN priced at {args.gbps:g} Gb/s and {args.rtt_ms:g} ms a round trip")
    print("| phase | sent (client to servers) | received | round trips | moved / cache bytes | loopback s | LAN s (estimate) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        unit = " per token" if r["phase"] == "decode" else ""
        print(f"| {r['phase']}{unit} | {r['sent_bytes'] / 2**20:.3f} MiB | {r['received_bytes'] / 2**20:.3f} MiB | "
              f"{r['round_trips']:.0f} | {r['share_of_cache']:.2%} | {r['loopback_s']:.3f} | {r['lan_s']:.3f} |")
    print("\n| the merge's part | sent | received | round trips | moved / cache bytes |\n|---|---|---|---|---|")
    breakdown = []
    for label, (sent, received, trips) in parts.items():
        breakdown.append({"part": label, "sent_bytes": int(sent), "received_bytes": int(received), "round_trips": int(trips)})
        print(f"| {label} | {sent / 2**20:.3f} MiB | {received / 2**20:.3f} MiB | {trips} | "
              f"{(sent + received) / cache_bytes:.2%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ctx": len(tokens), "budget": args.budget, "servers": args.servers, "cache_bytes": cache_bytes,
                       "cells_after": cells_after, "gbps": args.gbps, "rtt_ms": args.rtt_ms, "rows": rows,
                       "merge_parts": breakdown}, f, indent=1)


if __name__ == "__main__":
    main()
