"""A chat through `Session` on the default model with its glyph projector: a document turn with a
page image, merged by FlowMM (the shipped predictor) before the next turn, then a question about
the image. Prints what it said (a JSON line). Run by tests/test_rpc_backend.py in a process of its
own, on the host and with the layers on RPC servers.

    python tests/rpc_session.py MODEL MMPROJ [HOST:PORT[,HOST:PORT] [TENSOR_SPLIT]]
"""

from __future__ import annotations

import json
import sys

from flowmm_edge.app.session import Session
from flowmm_edge.bindings import runtime
from flowmm_edge.models import glyph

CODE = "4815162"
PAGE = (f"Notes from the harbour office. The tide came in early on Monday. The locker code is {CODE}. "
        "The ferry left at noon and the gulls followed it out past the breakwater.")
DOCUMENT = ("Here is a scanned page from the office, and some notes. "
            + "The market opened late because of the rain, and the baker sold out of bread by ten. " * 6)
QUESTION = "What is the locker code on the scanned page? Answer with the number only."


def main() -> None:
    model, mmproj = sys.argv[1], sys.argv[2]
    servers = sys.argv[3] if len(sys.argv) > 3 else None
    split = sys.argv[4] if len(sys.argv) > 4 else None
    runtime.quiet_native_logs()
    with runtime.Model(model) as m:
        page = glyph.render(PAGE, mmproj, m)
    placement = dict(rpc_servers=servers, n_gpu_layers=99, tensor_split=split) if servers else {}
    with Session(model, mmproj, method="flowmm", budget="160", n_ctx=1024, n_threads=2, max_reply=16,
                 schedule="blocking", **placement) as s:
        first = s.chat(DOCUMENT, images=[page])
        cells_after_merge = s.cells()
        answer = s.chat(QUESTION)
        print(json.dumps({"first": first, "answer": answer, "cells_after_merge": cells_after_merge,
                          "merges": s.stats.merges, "cells": s.cells()}))


if __name__ == "__main__":
    main()
