"""Self-distillation: a model with no importance predictor learns one from its own conversations.

    learner = ImportanceLearner(model_path, pairing, n_layer, n_head_kv, head_dim)
    ... each merge that runs the repeat pass: learner.observe(ctx, seq_id, scored, new_positions) ...
    policy = learner.ready()          # a Policy with the predictor once the fit is good, else None

The teacher is the repeat pass (reconstruction.py) that the merges of a model without a
predictor run anyway, after the reply; the student is the ridge predictor of
importance_predictor.py, fitted as `calibrate --distill` fits it (distillation.fit), but from
moments accumulated as the conversations go (`RidgeMoments`), so memory stays a few
[features x features] matrices per (layer, KV head) whatever the number of tokens seen.

Every HOLD_OUT_EVERY-th observed span is held back (its keys and teacher scores kept, up to
HELD_BACK_TOKENS) and scores the fit: the mean Spearman rank correlation between the student and
the teacher over the held-back spans (distillation.fit's measure). The fit is *good*, and the
policy is written, once at least MIN_TOKENS have been seen in MIN_DOCUMENTS spans and the held-back
correlation reaches GOOD_SPEARMAN.

Only spans the repeat pass scored on a sequence that was never merged are learned from: a
conversation's text up to its first merge. That is the teacher `calibrate --distill` fits, a
document repeated against its own whole cache. Measured on a renamed copy of the default model
(scripts/learning_curve.py; docs/RESULTS.md, "Self-distillation: what the student learns from"):
a student fitted on 6,209 tokens of one long chat, its later turns each repeated against the turns
merged before them, answered 0.21 / 0.68 after compression at 10 / 20%; one fitted on 6,269 tokens
of turns that each began a conversation answered 0.70 / 0.91 (the shipped predictor 0.71 / 0.78,
full 0.94). Both ranked their held-back spans alike (0.81 / 0.80), so the rank correlation alone
did not show it. The bar is MIN_TOKENS, where the good student stood (6,144 tokens; at 4,179
tokens it answered 0.44 at 10%), with GOOD_SPEARMAN a floor under it, 0.75. The held-back
correlation does not tell a good student from a poor one: 0.802 at 4,179 tokens answered 0.44 at
10%, 0.795 at 7,090 tokens 0.85 (the shipped predictor 0.76 on the same contexts), and along one chat
it moves more when a third span is held back (0.796 -> 0.809) than with 3,000 more tokens fitted
(0.792 -> 0.796; docs/RESULTS.md, "The learning bar: tokens, not the rank correlation"). Students
of 6k tokens or more ranked 0.79-0.83 on both models measured; 0.75 only refuses a fit that
barely ranks like its teacher (a model whose keys do not predict the score). A long chat therefore learns
from its first turn only, and keeps its teacher (the repeat pass, after the replies) until more
conversations have taught the student; `serve` learns from every conversation's start.

The policy goes to `policy_dir()` (FLOWMM_POLICY_DIR, default the user cache's `policies/`),
named by the model's fingerprint, so `policy.choose("auto", model)` finds it the next time, and
a copy of a model whose header differs in one string is unseen and learns afresh.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path

import numpy as np

from .. import paths
from ..bindings import kv_cache
from ..methods.flowmm import PREDICTED
from ..compression.compressor import rope_geometry, sequence_near_copies
from ..methods.importance_predictor import (LOG_FLOOR, NEAR_COPIES, ImportancePredictor, distance_to_end, features,
                                            n_features, spearman, top_recall, unrope)
from .distillation import RIDGE

MIN_TOKENS = 6144        # tokens observed before a fit may count as good (measured: RESULTS.md)
MIN_DOCUMENTS = 4        # spans observed (a merge's newly repeated text is one)
GOOD_SPEARMAN = 0.75     # held-back rank correlation a fit needs as well (a floor; measured: RESULTS.md)
FIT_EVERY = 1024         # tokens observed between two fits
HOLD_OUT_EVERY = 4       # every 4th span is held back to score the fit
HELD_BACK_TOKENS = 4096  # at most this many held-back tokens kept (their keys, float16)
MIN_SPAN = 32            # spans shorter than this are not observed (too few ranks to compare)


def policy_dir() -> Path:
    env = os.environ.get("FLOWMM_POLICY_DIR")
    return Path(env).expanduser() if env else paths.cache_dir() / "policies"


def learned_path(fingerprint: dict) -> Path:
    return policy_dir() / f"{fingerprint['architecture']}-{fingerprint['gguf_header_sha256'][:16]}.json"


class RidgeMoments:
    """The sums a standardised ridge regression needs (importance_predictor.fit_ridge), kept per
    (layer, KV head): n, sum x, sum x x^T, sum y, sum x y, in float64."""

    def __init__(self, n_layer: int, n_head: int, n_feat: int):
        self.n = np.zeros((n_layer, n_head))
        self.sx = np.zeros((n_layer, n_head, n_feat))
        self.sxx = np.zeros((n_layer, n_head, n_feat, n_feat))
        self.sy = np.zeros((n_layer, n_head))
        self.sxy = np.zeros((n_layer, n_head, n_feat))

    def add(self, layer: int, head: int, x: np.ndarray, y: np.ndarray) -> None:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        self.n[layer, head] += len(y)
        self.sx[layer, head] += x.sum(0)
        self.sxx[layer, head] += x.T @ x
        self.sy[layer, head] += y.sum()
        self.sxy[layer, head] += x.T @ y

    def solve(self, layer: int, head: int, ridge: float = RIDGE) -> tuple[np.ndarray, float]:
        """fit_ridge's (w, b) from the moments: the same closed form, with z = (x - mu) / sd."""
        n = self.n[layer, head]
        mu = self.sx[layer, head] / n
        var = np.maximum(np.diag(self.sxx[layer, head]) / n - mu * mu, 0.0)
        sd = np.sqrt(var) + 1e-6
        ym = self.sy[layer, head] / n
        ztz = (self.sxx[layer, head] - n * np.outer(mu, mu)) / np.outer(sd, sd)
        zty = (self.sxy[layer, head] - mu * self.sy[layer, head]) / sd
        w = np.linalg.solve(ztz + ridge * n * np.eye(len(mu)), zty) / sd
        return w, float(ym - mu @ w)


@dataclasses.dataclass
class Progress:
    n_tokens: int = 0
    n_documents: int = 0
    held_back_tokens: int = 0
    spearman: float | None = None  # the latest fit's held-back rank correlation
    skipped_tokens: int = 0        # repeated on a sequence merged before: not learned from

    def describe(self) -> str:
        """One line for a user: how far the learning has come."""
        rank = "" if self.spearman is None else f", held-back rank correlation {self.spearman:.2f}, {GOOD_SPEARMAN:.2f} needed"
        starts = "conversation start" + ("" if self.n_documents == 1 else "s")
        return (f"learning importance from {self.n_tokens:,} of at least {MIN_TOKENS:,} tokens "
                f"({self.n_documents} {starts}{rank})")


class ImportanceLearner:
    def __init__(self, fingerprint: dict, pairing: str, n_layer: int, n_head_kv: int, head_dim_k: int, rope=None,
                 near_copies: dict | None = None):
        """`rope` (methods.base.RopeGeometry): the keys are turned back by it at their positions
        and the cells' distances to the sequence's end are a feature, and the predictor is
        `relative`; None: keys as cached. `near_copies` (a predictor's parameters; with `rope`
        only): each cell's near-copies in its sequence is one more feature."""
        if near_copies is not None and rope is None:
            raise ValueError("a near-copies learner must be relative (take a rope)")
        self.fingerprint, self.pairing, self.rope, self.near_copies = fingerprint, pairing, rope, near_copies
        self.moments = RidgeMoments(n_layer, n_head_kv, n_features(head_dim_k, rope is not None, near_copies is not None))
        self.held_k: list[np.ndarray] = []        # [n_layer, n_head_kv, n, d] float16 per held-back span
        self.held_distance: list[np.ndarray | None] = []  # [n] per held-back span (relative)
        self.held_near: list[np.ndarray | None] = []      # [n_layer, n_head_kv, n] per held-back span (near-copies)
        self.held_teacher: list[np.ndarray] = []  # [n_layer, n_head_kv, n]
        self.rho: list[np.ndarray] = []           # rho^l each learning conversation measured (sequence_compressor)
        self.progress = Progress()
        self._since_fit = 0
        self.predictor: ImportancePredictor | None = None

    @classmethod
    def for_context(cls, fingerprint: dict, ctx, pairing: str) -> "ImportanceLearner":
        lay = kv_cache.layout(ctx)
        return cls(fingerprint, pairing, lay.n_layer, lay.n_head_kv, lay.head_dim_k, rope_geometry(ctx.model),
                   NEAR_COPIES)

    # -- what the merges feed ----------------------------------------------------------------------

    def observe(self, ctx, seq_id: int, scored, positions: np.ndarray) -> None:
        """Learn from the repeat pass's scores (`scored`, reconstruction.PositionScores) of the
        cells at `positions` (the text it repeated for the first time), read from the cache
        before the merge changes it."""
        positions = np.asarray(positions)
        if self.predictor is not None or len(positions) < MIN_SPAN:
            return
        cells, pos = kv_cache.seq_cells(ctx, seq_id)
        if len(pos) < ctx.next_pos(seq_id):  # merged before: not calibrate's teacher (the module docstring)
            self.progress.skipped_tokens += len(positions)
            return
        by_pos = dict(zip(pos.tolist(), cells.tolist()))
        positions = np.asarray([p for p in positions.tolist() if p in by_pos], np.int64)
        if len(positions) < MIN_SPAN:
            return
        at = np.asarray([by_pos[p] for p in positions.tolist()], np.int32)
        teacher = scored.at(positions).astype(np.float32)  # [n_layer, n_head_kv, n]
        n_layer, n_head = teacher.shape[:2]
        k = np.stack([np.stack([kv_cache.read_rows(ctx, l, h, at, "k", seq_id) for h in range(n_head)])
                      for l in range(n_layer)])
        distance = near = None
        if self.rope is not None:
            k = unrope(k, positions, self.rope)
            distance = distance_to_end(positions, ctx.next_pos(seq_id))
        if self.near_copies is not None:  # against the whole sequence, as a merge computes it
            index = {c: i for i, c in enumerate(cells.tolist())}
            near = sequence_near_copies(ctx, self.near_copies, seq_id)[..., [index[c] for c in at.tolist()]]
        self.add(k, teacher, distance, near)

    def add(self, k: np.ndarray, teacher: np.ndarray, distance: np.ndarray | None = None,
            near: np.ndarray | None = None) -> None:
        """One span: keys k [n_layer, n_head_kv, n, d] and the teacher's scores [n_layer, n_head_kv, n];
        where the learner has a `rope`, the keys turned back by it and each cell's `distance` [n]
        to the sequence's last position; where it has `near_copies`, each cell's `near`
        [n_layer, n_head_kv, n] in its whole sequence."""
        if (distance is None) != (self.rope is None):
            raise ValueError("a relative learner takes each cell's distance to the end, and only it")
        if (near is None) != (self.near_copies is None):
            raise ValueError("a near-copies learner takes each cell's near-copies, and only it")
        p = self.progress
        held = p.n_documents % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 and p.held_back_tokens < HELD_BACK_TOKENS
        n_layer, n_head = teacher.shape[:2]
        if held:
            self.held_k.append(k.astype(np.float16))
            self.held_distance.append(distance)
            self.held_near.append(None if near is None else near.astype(np.float32))
            self.held_teacher.append(teacher)
            p.held_back_tokens += teacher.shape[-1]
        else:
            for l in range(n_layer):
                for h in range(n_head):
                    self.moments.add(l, h, features(k[l, h].astype(np.float32), self.pairing, distance,
                                                    None if near is None else near[l, h]),
                                     np.log(teacher[l, h].astype(np.float64) + LOG_FLOOR))
            p.n_tokens += teacher.shape[-1]
            self._since_fit += teacher.shape[-1]
        p.n_documents += 1

    def add_rho(self, rho) -> None:
        """rho^l a learning conversation measured on its first turn of two modalities
        (SequenceCompressor decides which turn that is: text alone has no cross-modal flow)."""
        self.rho.append(np.asarray(rho, np.float64))

    # -- the fit -----------------------------------------------------------------------------------

    def fit(self) -> tuple[ImportancePredictor, float | None]:
        """The predictor from every span not held back, and its held-back rank correlation (None
        while nothing is held back)."""
        n_layer, n_head = self.moments.n.shape
        weights = np.zeros((n_layer, n_head, self.moments.sx.shape[-1]), np.float32)
        bias = np.zeros((n_layer, n_head), np.float32)
        for l in range(n_layer):
            for h in range(n_head):
                w, b = self.moments.solve(l, h)
                weights[l, h], bias[l, h] = w, b
        predictor = ImportancePredictor(self.pairing, weights, bias, relative=self.rope is not None,
                                        near_copies=self.near_copies)
        rank = self.held_back_spearman(predictor)
        p = self.progress
        info = {"teacher": "reconstruction (the repeat pass of this model's own conversations)",
                "corpus": "self-distillation", "n_documents": p.n_documents, "n_tokens": p.n_tokens,
                "held_back_tokens": p.held_back_tokens,
                "held_back_spearman_mean": None if rank is None else round(rank, 4), "ridge": RIDGE}
        return dataclasses.replace(predictor, info=info), rank

    def held_back_spearman(self, predictor: ImportancePredictor) -> float | None:
        """`predictor`'s mean Spearman rank correlation with the teacher over the held-back spans,
        every (layer, KV head) alike (None while nothing is held back)."""
        return self._held_back_mean(predictor, spearman)

    def held_back_top_recall(self, predictor: ImportancePredictor, share: float = 0.1) -> float | None:
        """The mean share of the teacher's top `share` of each held-back span that `predictor`
        also ranks in its top `share` (importance_predictor.top_recall; None while nothing is held
        back)."""
        return self._held_back_mean(predictor, lambda pred, teacher: top_recall(pred, teacher, share))

    def _held_back_mean(self, predictor: ImportancePredictor, measure) -> float | None:
        if not self.held_k:
            return None
        n_layer, n_head = self.held_teacher[0].shape[:2]
        takes_near = predictor.near_copies is not None  # a predictor without the input ignores it
        return float(np.mean([measure(predictor.predict(l, h, k[l, h].astype(np.float32), dist,
                                                        near[l, h] if takes_near else None), t[l, h])
                              for k, t, dist, near in zip(self.held_k, self.held_teacher, self.held_distance,
                                                          self.held_near)
                              for l in range(n_layer) for h in range(n_head)]))

    def ready(self):
        """A Policy with the learned predictor once the fit is good (computed every FIT_EVERY
        tokens), else None."""
        p = self.progress
        if self.predictor is not None or self._since_fit < FIT_EVERY or p.n_tokens < MIN_TOKENS \
                or p.n_documents < MIN_DOCUMENTS:
            return None
        self._since_fit = 0
        predictor, rank = self.fit()
        p.spearman = rank
        if rank is None or rank < GOOD_SPEARMAN:
            return None
        self.predictor = predictor
        return self.policy(predictor, rank)

    def policy(self, predictor: ImportancePredictor, rank: float):
        """The policy of a fitted predictor: FlowMM's defaults scoring with it, rho averaged over
        the learning merges' windows, and what it was learned from."""
        from .calibration_pass import METHOD_DEFAULTS, THETA
        from .policy import Policy

        p = self.progress

        # rho^l only from conversations that held more than one modality; none: measured per conversation
        rho = [float(np.clip(r, 0, 1)) for r in np.mean(self.rho, 0)] if self.rho else None
        return Policy(model=self.fingerprint, theta=THETA, rho=rho,
                      method=dict(METHOD_DEFAULTS, **PREDICTED),
                      calibration={"source": "self-distillation", "n_tokens": p.n_tokens,
                                   "n_documents": p.n_documents, "held_back_spearman": round(rank, 4),
                                   "rho_from_conversations": len(self.rho),
                                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                      predictor=predictor)
