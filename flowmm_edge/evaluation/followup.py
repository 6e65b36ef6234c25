"""`eval --question followup`: the case chat users meet, through the chat's own `Session`.

Per task, method and budget, a fresh session: the context (its labelled spans and images) is the
first user turn and the model replies to it (at most FIRST_REPLY tokens, as a user would let it
acknowledge the document); then each question is a later user turn and its reply is scored. The
session merges after every turn exactly as `chat` does, so a question meets a cache compressed
before it was asked, and the later questions a cache merged again after the earlier turns.

`followup-idle` is the same conversation under chat's own reply-first schedule, with a pause
after each reply long enough for the idle merge to finish (with `idle_teacher`, that merge takes
the teacher, the repeat pass, where a predictor exists: app/merge_schedule.py), so each question
meets the cache the idle merge left. (Asked back to back instead, a
question that fits the free room is answered from the whole cache, and the merge after it
predicts: `followup` measures merges that must happen before the answer.)

The budget is a share of the context's positions (the first turn), as a cell count for the
session. The KV buffer holds the context and the turns after it without merging between
prefill chunks, so each method merges once per turn. No KL here: the replies before a question
differ per method, so the full cache's distributions are not a like-for-like reference.
"""

from __future__ import annotations

import itertools
import math
import time

from ..bindings import runtime
from . import evaluate
from .rows import Row
from ..methods import registry
from ..bindings.prompt import ModalityLabels, prepare
from ..app.session import Session
from .tasks import Task

FIRST_REPLY = 16      # pieces (about tokens) the model may say to the document before the first question
REPLY_SLACK = 32      # a chat reply may restate the question before answering: room beyond max_tokens
TURN_ROOM = 128       # cells per later turn for the question and its template
IDLE_WAIT_S = 600     # the longest pause followup-idle waits for an idle merge to finish


def _context_positions(model_path, task: Task, mmproj) -> int:
    """Positions the context takes (its text tokens and image positions)."""
    with runtime.Model(model_path) as model:
        projector = None
        if mmproj and any(s.kind == "image" for s in task.segments):
            from ..bindings.multimodal import Projector

            projector = Projector(mmproj, model)
        try:
            p = prepare(model, task.segments, ModalityLabels(), projector)
            p.close()
        finally:
            if projector is not None:
                projector.close()
    return p.n_pos


def _pause(s: Session) -> None:
    """The user reads and types: until the idle merge the reply started has finished."""
    t0 = time.monotonic()
    while s.merging_in_background() and time.monotonic() - t0 < IDLE_WAIT_S:
        time.sleep(0.05)


def evaluate_task(model_path, task: Task, methods: list[str], budgets: list[float], policy=None, kv_type="f16",
                  n_threads=None, mmproj=None, flash_attn="auto", placement: dict | None = None,
                  idle: bool = False, idle_teacher: bool = False, recall_tokens: int = 0) -> list[Row]:
    """`idle`: followup-idle (see the module docstring); `idle_teacher`: whether its idle merges
    take the teacher where a predictor exists (app/merge_schedule.py); `recall_tokens`: the
    session's recall (compression/recall.py), each compressed method's budget less it
    (evaluate.merge_cells)."""
    compressors = {m: registry.resolve(m, policy) for m in methods if m != "full"}  # unknown names fail here
    max_reply = max(q.max_tokens for q in task.questions) + REPLY_SLACK
    after_doc = FIRST_REPLY + len(task.questions) * (TURN_ROOM + recall_tokens + max_reply)
    n_ctx = _context_positions(model_path, task, mmproj) + 64 + after_doc  # 64: the template around the turn

    def converse(name: str, budget: float, budget_cells: int | None) -> list[Row]:
        method, rho = compressors.get(name, ("full", None))
        recall = recall_tokens if budget_cells else 0  # the full cache forgets nothing to re-read
        # blocking: every turn is merged before its answer, so each later question is asked over the
        # merged cache (the reply-first schedule would answer the current one from the whole cache)
        with Session(model_path, mmproj, method=method, budget=str(budget_cells or 1.0), n_ctx=n_ctx,
                     recall_tokens=recall,
                     schedule="reply_first" if idle else "blocking", idle_teacher=idle_teacher,
                     n_threads=n_threads, kv_type=kv_type, flash_attn=flash_attn, max_reply=max_reply, temperature=0.0,
                     **(placement or {}),
                     policy=policy if rho is not None else None) as s:
            n_doc = s.add_user_turn(segments=task.segments)
            reply = s.reply()
            for _ in itertools.islice(reply, FIRST_REPLY):
                pass
            reply.close()  # the reply stops there, as a user's Ctrl-C would stop it
            rows = []
            for k, q in enumerate(task.questions):
                if idle:
                    _pause(s)
                s.add_user_turn(q.text)
                cells = s.cells()
                answer = "".join(s.reply())
                rows.append(Row("followup-idle" if idle else "followup", task.id, task.kind, k,
                                evaluate.method_label(name, recall), budget, n_doc,
                                cells, answer, q.score(answer), math.nan, math.nan))
            return rows

    rows = converse("full", 1.0, None)
    n_doc = rows[0].n_prompt
    for name in compressors:
        for budget in budgets:
            rows += converse(name, float(budget), evaluate.merge_cells(float(budget), n_doc, recall_tokens))
    return rows
