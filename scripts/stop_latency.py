#!/usr/bin/env python3
"""How long a new turn waits for the background merge it stops, in `chat`'s own code path.

    cd scripts && python stop_latency.py [-m MODEL] [--rounds 5] [--threads 2]

A document turn is answered; each round then waits while the merge after the reply runs (the
repeat pass, for a model with no predictor: a renamed copy of -m is used, so it learns), stops it
as a new turn would (`Conversation.stop_background_merge`), and prints the time that took, before
the short turn is sent and answered. The repeat pass stops inside the decode it is running
(Context.interrupt); before that it finished its chunk of up to 512 tokens first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from flowmm_edge.app.session import Session
from flowmm_edge.models import default_model

from bench_common import unseen_copy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    doc = " ".join(f"Item {i} is stored in box {i * 37 % 101} of room {i % 7}." for i in range(150))
    with tempfile.TemporaryDirectory() as tmp:
        model = unseen_copy(args.model or default_model.ensure(), Path(tmp))
        waits = []
        with Session(model, method="flowmm", budget=1024, n_ctx=4096, n_threads=args.threads, max_reply=8) as s:
            s.add_user_turn(doc)
            list(s.reply())
            for i in range(args.rounds):
                time.sleep(1.5 + 0.37 * i)  # the user reads; the merge is inside its repeat pass
                running = s.merging_in_background()
                t0 = time.perf_counter()
                s.stop_background_merge()
                waits.append(time.perf_counter() - t0)
                print(f"round {i + 1}: the merge was {'running' if running else 'done'}; stopping it took "
                      f"{1000 * waits[-1]:.1f} ms", flush=True)
                s.add_user_turn(f"Which box holds item {i}?")
                list(s.reply())
    print(f"median {1000 * statistics.median(waits):.1f} ms, largest {1000 * max(waits):.1f} ms over {len(waits)} rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
