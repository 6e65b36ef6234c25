"""One scored answer of the eval: the row every mode (after, inside, followup) writes."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Row:
    mode: str
    task: str
    kind: str
    question: int    # index of the question in its task
    method: str
    budget: float
    n_prompt: int    # positions compressed: the context (after, followup) or context + question (inside)
    cells: int       # cells held after the compression
    answer: str
    score: float
    kl: float        # mean over the full answer's steps of KL(full || method), nats (nan in followup)
    top1: float      # share of those steps where both pick the same token (nan in followup)
