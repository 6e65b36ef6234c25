#!/usr/bin/env python3
"""What a short turn costs on a long cache: `Conversation.add_user_turn` (the path of `chat`,
`Session` and `serve`: template, bookkeeping, what it keeps to put the cache back on failure)
against the bare `llama_decode` of the same tokens at the same position, side by side, with the
peak RSS each adds (VmHWM, reset before each turn through /proc/self/clear_refs; Linux only).

    cd scripts && python short_turn_cost.py [--model M.gguf] [--length 6000] [--turns 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import llama_cpp

from flowmm_edge.app.conversation import Conversation
from flowmm_edge.app.engine import Engine
from flowmm_edge.models import default_model


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def reset_peak() -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_mib()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="GGUF (default: the embedded model)")
    ap.add_argument("--length", type=int, default=6000, help="tokens in the cache before the short turns")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = args.model or default_model.ensure(lambda *a: None)
    with Engine(path, method="full", n_ctx=args.length + 1024, n_slots=2, max_reply=4, n_threads=args.threads) as e:
        conv = Conversation(e)
        conv.chat("the cat sat on the mat and " * (args.length // 7))
        bare_seq = 1  # the same cells shared with a second sequence (llama.cpp's seq_cp), decoded without the conversation's path
        rows = []
        for k in range(args.turns):
            text = f"what did the cat do {k}?"
            e.ctx.clear(bare_seq)
            llama_cpp.llama_memory_seq_cp(llama_cpp.llama_get_memory(e.ctx.ptr), conv.seq_id, bare_seq, -1, -1)
            tokens = e.model.tokenize(e.template.render(e.model, conv.messages + [("user", text)], add_assistant=True)
                                      [len(conv.cached_text):], add_special=False, parse_special=True)
            h0 = reset_peak()
            t = time.perf_counter()
            e.ctx.decode(tokens, conv.pos, bare_seq)
            bare, bare_mib = time.perf_counter() - t, peak_mib() - h0
            e.ctx.clear(bare_seq)
            h0 = reset_peak()
            t = time.perf_counter()
            conv.add_user_turn(text)
            turn, turn_mib = time.perf_counter() - t, peak_mib() - h0
            stream = conv.reply_stream(2)
            stream.next_token()
            stream.close()
            rows.append((turn, bare, turn_mib, bare_mib))
            print(f"cache of {conv.pos} positions, a turn of {len(tokens)} tokens: {turn:.3f} s (bare decode {bare:.3f} s, "
                  f"{turn / bare:.2f}x), peak RSS +{turn_mib:.0f} MiB (bare +{bare_mib:.0f} MiB)")
        med = [statistics.median(r[i] for r in rows) for i in range(4)]
        print(f"median: {med[0]:.3f} s against {med[1]:.3f} s ({med[0] / med[1]:.2f}x), peak RSS +{med[2]:.0f} against "
              f"+{med[3]:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
