"""Running a method on a live llama.cpp context: ask only for the statistics it needs while the
prompt is decoded, turn them into `methods.Stats`, make the plan and apply it to the cache.

    comp = Compressor(METHODS["flowmm"](), budget=0.2, rho=policy.rho)   # rho optional
    with comp.observe(ctx, prompt_end=n, labels=labels_by_position):
        ctx.decode(tokens, 0)
    report = comp.compress(ctx, labels_by_position)

Observation windows are rows at the end of the prompt; whole-prompt scores are every row of
this prefill; predicted scores come from the cells' own keys when the plan is made (the method's
ImportancePredictor, on the cache's backend). Reconstruction scores (reconstruction.py) come from a repeat-the-context pass that
`compress` runs over the cells it is about to merge (it needs each position's token), or from
`use_reconstruction` (a SequenceCompressor's scores, kept across its merges and shared in eval and bench).
A slot keeps the attention bias (kv_cache.set_slot_bias) its first source carried before the
merge, plus the plan's gain (merge="mass"), so a bias survives and accumulates over later merges
(chunked prefill, every chat turn). Without a calibrated rho, FlowMM's rho^l is estimated from
the rows observed here (the observation window), and the report says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
from threadpoolctl import threadpool_limits

from ..bindings import kv_cache
from . import reconstruction
from ..bindings.attention_stats import AttentionStats
from ..bindings.native import llama_cpp
from ..methods.importance_predictor import rope_pairing
from ..methods.base import (KEY_SCORER, KEYS, MATCHER, PREDICTED_SCORES, PROMPT_SCORES, QUERY_MEANS, RECONSTRUCTION_SCORES, RHO, ROPE,
                   VALUE_NORMS, WINDOW_SCORES, Method, MethodError, RopeGeometry,
                   Stats, TokenLayout)


def predicted_scores(predictor, ctx, seq_id: int = 0) -> np.ndarray:
    """An ImportancePredictor's log score of every cell of the sequence, [n_layer, n_head_kv,
    n_cells] in kv_cache.seq_cells order, from the cache's own keys on the cache's backend (one
    small graph per layer; predictor.predict is its numpy reference)."""
    predictor.check_layout(kv_cache.layout(ctx))
    rope = rope_geometry(ctx.model) if predictor.relative else None
    scores = np.stack([kv_cache.predict_scores(ctx, l, predictor.key_weights(l), predictor.bias[l],
                                               predictor.rope_pairing, seq_id, relative=rope)
                       for l in range(predictor.n_layer)])
    if predictor.near_copies is not None:  # [n_head_kv, n] more floats back per layer: the near-copies term
        scores += predictor.weights[..., -1:] * sequence_near_copies(ctx, predictor.near_copies, seq_id)
    return scores


def sequence_near_copies(ctx, params: dict, seq_id: int = 0) -> np.ndarray:
    """The near-copies input (importance_predictor.near_copies) of every cell of the sequence,
    [n_layer, n_head_kv, n_cells] in kv_cache.seq_cells order, on the cache's backend; `params` as
    a predictor's `near_copies`."""
    rope = rope_geometry(ctx.model)
    return np.stack([kv_cache.near_copies(ctx, l, rope, params["beta"], params["max_reference"], seq_id)
                     for l in range(kv_cache.layout(ctx).n_layer)])


@dataclasses.dataclass
class Report:
    method: str
    cells_before: int
    cells_after: int
    rho_source: str  # "policy", "prompt" or "unused"
    rho: np.ndarray | None
    plan: object = None  # methods.Plan in cell indices of the cells before the merge (None: nothing applied)
    plan_s: float = 0.0   # seconds to read what the method needs from the cache (keys) and make the plan
    apply_s: float = 0.0  # seconds to apply it to the cache (the native merge graph) and set the bias


OBSERVED_SCORES = frozenset({WINDOW_SCORES, PROMPT_SCORES, QUERY_MEANS})  # what only an observed decode gives, rho aside


def one_modality(labels: np.ndarray) -> bool:
    """The positions hold one modality label (or none): rho then plans nothing."""
    return np.unique(labels).size <= 1


def rho_from_flow(flows: list[np.ndarray], text_label: int = 0) -> float:
    """rho^l (docs/METHOD.md, 'Cross-modal flow (rho)') from per-head flow matrices
    [n_head, n_labels, n_labels], summed over the given prompts first: mean over heads of
    (text->other + other->text) / all mass."""
    f = np.sum(flows, axis=0)
    text = np.zeros(f.shape[1], bool)
    text[text_label] = True
    cross = f[:, text][:, :, ~text].sum(axis=(1, 2)) + f[:, ~text][:, :, text].sum(axis=(1, 2))
    total = f.sum(axis=(1, 2))
    return float(np.mean(np.where(total > 0, cross / np.maximum(total, 1e-300), 0.0)))


def observed_at(stats: AttentionStats, positions: np.ndarray, n_layer: int) -> np.ndarray:
    """Column scores [n_layer, n_head_kv, len(positions)] of a stopped observation, by position: a
    cell decoded after it (a reply, when the merge comes after it) was never a column there, and
    takes its (layer, head)'s largest score, so a method ranks it with the most attended."""
    by_pos = np.argsort(stats.positions, kind="stable")
    idx = np.minimum(np.searchsorted(stats.positions, positions, sorter=by_pos), max(len(by_pos) - 1, 0))
    seen = stats.positions[by_pos[idx]] == positions if len(by_pos) else np.zeros(len(positions), bool)
    out = []
    for layer in range(n_layer):
        col = stats.column_scores(layer, per_kv_head=True)
        row = np.repeat(col.max(axis=1, initial=0)[:, None], len(positions), axis=1)
        row[:, seen] = col[:, by_pos[idx[seen]]]
        out.append(row)
    return np.stack(out)


def rope_geometry(model) -> RopeGeometry:
    """The model's RoPE from its GGUF metadata, with llama.cpp's defaults where a key is absent
    (freq_base 10000, every dimension of a head rotated)."""
    arch = model.meta("general.architecture") or ""
    key_length = model.meta(f"{arch}.attention.key_length")  # Gemma 3: 256, not n_embd / n_head = 160
    head_dim = int(key_length) if key_length else \
        llama_cpp.llama_model_n_embd(model.ptr) // llama_cpp.llama_model_n_head(model.ptr)
    base = model.meta(f"{arch}.rope.freq_base")  # with iSWA, the full-attention layers' (the merged ones)
    n_rot = model.meta(f"{arch}.rope.dimension_count")
    return RopeGeometry(freq_base=float(base) if base else 10000.0, n_rot=int(n_rot) if n_rot else head_dim,
                        pairing=rope_pairing(llama_cpp.llama_model_rope_type(model.ptr)),
                        freq_scale=float(llama_cpp.llama_model_rope_freq_scale_train(model.ptr)))


class Compressor:
    def __init__(self, method: Method, budget: float | int, rho: np.ndarray | None = None, rho_source: str = "policy"):
        """`rho`: per layer, from a policy (or `rho_source`, such as a conversation's measurement);
        None: measured from the prompt the merge observes."""
        needs = method.needs
        if WINDOW_SCORES in needs and PROMPT_SCORES in needs:
            raise MethodError(f"{method.name} needs both window and whole-prompt scores; one prefill gives one")
        self.method, self.budget = method, budget
        self.rho = None if rho is None else np.asarray(rho, dtype=np.float64)
        self.rho_source = rho_source
        self._stats: AttentionStats | None = None
        self._recon: reconstruction.PositionScores | None = None

    @property
    def needs_observation(self) -> bool:
        return bool(self.method.needs & OBSERVED_SCORES) or \
            (RHO in self.method.needs and self.rho is None)

    def observed_from(self, prompt_end: int) -> int:
        """The first position whose query rows `observe` reads, for a prompt ending at `prompt_end`:
        the window's start, 0 for whole-prompt scores, prompt_end if it reads none."""
        if not self.needs_observation:
            return prompt_end
        if PROMPT_SCORES in self.method.needs:
            return 0
        return prompt_end - min(self.method.window, prompt_end)

    def _observes(self, labels: np.ndarray, prompt_end: int) -> bool:
        """Whether a decode ending at `prompt_end` must be observed. Not when rho is all the method
        would read and the positions hold one modality: a merge of one modality plans the same in
        either mode, so rho changes nothing (and the statistics cost each turn's decode)."""
        if not self.needs_observation:
            return False
        return bool(self.method.needs & OBSERVED_SCORES) or \
            not one_modality(np.asarray(labels)[:prompt_end])

    @contextlib.contextmanager
    def observe(self, ctx, prompt_end: int, labels: np.ndarray, seq_id: int = 0):
        """Collect the method's statistics over the decode run inside the with-block."""
        if not self._observes(labels, prompt_end):
            self._stats = None
            yield None
            return
        window = None if PROMPT_SCORES in self.method.needs else prompt_end - self.observed_from(prompt_end)
        want_flow = RHO in self.method.needs and self.rho is None
        stats = AttentionStats(ctx, prompt_end=prompt_end, window=window, seq_id=seq_id,
                               labels=labels if want_flow else None,
                               n_labels=max(2, int(np.max(labels, initial=0)) + 1) if want_flow else None)
        try:
            yield stats
        finally:
            stats.stop()
        self._stats = stats

    def measured_rho(self) -> np.ndarray | None:
        """rho per layer from the flow observed (None if nothing was, or without labels)."""
        s = self._stats
        if s is None or RHO not in self.method.needs or self.rho is not None or not s.n_labels:
            return None
        return np.array([rho_from_flow([s.flow(l)]) for l in range(s.n_layer)])

    def use_observed(self, stats: AttentionStats) -> None:
        """Plan from statistics gathered elsewhere (a stopped AttentionStats over the same cells)."""
        self._stats = stats

    def with_method(self, method: Method) -> "Compressor":
        """The same budget, rho and observation, planned by another method (the teacher's
        importance in place of the predictor's, say): the statistics observed must serve it."""
        other = Compressor(method, self.budget, self.rho, self.rho_source)
        other._stats = self._stats
        return other

    def use_reconstruction(self, scores: reconstruction.PositionScores) -> None:
        """Plan from reconstruction scores computed elsewhere over the same positions."""
        self._recon = scores

    def replay(self, ctx, tail_tokens: list[int], prompt_end: int, labels: np.ndarray,
               whole_prompt: AttentionStats | None = None, seq_id: int = 0):
        """Gather the statistics on a cache already holding the prompt (a restored state):
        whole-prompt scores come from `whole_prompt` (observed over that prefill); window scores
        by dropping the last `window` tokens (`tail_tokens` ends the prompt) and decoding them
        again with statistics on, the very rows one prefill would have observed. Without
        `whole_prompt`, whole-prompt scores are those same re-decoded rows' (a cache whose prefill
        nobody observed). Returns the logits of that re-decode, or None if nothing was decoded."""
        if PROMPT_SCORES in self.method.needs and whole_prompt is not None:
            self.use_observed(whole_prompt)
            return None
        if not self._observes(labels, prompt_end):
            return None
        w = min(self.method.window, len(tail_tokens), prompt_end)
        ctx.truncate(prompt_end - w, seq_id)
        with self.observe(ctx, prompt_end=prompt_end, labels=labels, seq_id=seq_id):
            return ctx.decode(tail_tokens[-w:], prompt_end - w, seq_id)

    def compress(self, ctx, labels: np.ndarray, seq_id: int = 0, tokens: np.ndarray | None = None,
                 images: dict | None = None) -> Report:
        """Plan for the sequence's current cells and apply it; the cache is unchanged on error.
        `tokens` (the token at each position, -1 for image positions) and `images` (the images
        still held, by first position) feed the reconstruction pass of a method that needs one."""
        recon, self._recon = self._recon, None
        if RECONSTRUCTION_SCORES in self.method.needs and recon is None:
            if tokens is None:
                raise MethodError(f"{self.method.name} needs reconstruction scores: pass the tokens by position")
            recon = reconstruction.reconstruction_scores(ctx, tokens, reconstruction.repeat_prefix(ctx.model), seq_id,
                                                         images=images, kept_tail=self.method.window)
        t0 = time.perf_counter()
        cells, positions = kv_cache.seq_cells(ctx, seq_id)
        order = np.argsort(positions, kind="stable")  # cell order need not follow positions once a merge freed cells
        cells, positions = cells[order], positions[order]
        lay = kv_cache.layout(ctx)
        n_layer, n_head_kv = lay.n_layer, lay.n_head_kv
        needs, s = self.method.needs, self._stats
        stats = Stats()
        if needs & OBSERVED_SCORES and s is None:
            raise MethodError(f"{self.method.name} needs attention statistics: decode the prompt inside observe()")
        if needs & {WINDOW_SCORES, PROMPT_SCORES}:
            scores = observed_at(s, positions, n_layer)
            setattr(stats, WINDOW_SCORES if WINDOW_SCORES in needs else PROMPT_SCORES, scores)
        if QUERY_MEANS in needs:
            stats.query_means = np.stack([s.query_mean(l) for l in range(n_layer)])
        if ROPE in needs:
            stats.rope = rope_geometry(ctx.model)
        if KEY_SCORER in needs:  # linear in each key, on the cache's backend; [n_head_kv, n] floats come back
            pairing = rope_pairing(llama_cpp.llama_model_rope_type(ctx.model.ptr))

            def score_keys(layer, weights, bias):
                return kv_cache.predict_scores(ctx, layer, weights, bias, pairing, seq_id)[:, order]
            stats.key_scorer = score_keys
        if RECONSTRUCTION_SCORES in needs:
            stats.reconstruction_scores = recon.at(positions)
            if recon.hidden_from is not None:
                stats.unscored = positions >= recon.hidden_from
        if PREDICTED_SCORES in needs:  # one matrix product per layer on the cache's backend
            predicted = predicted_scores(self.method.predictor, ctx, seq_id)[..., order].astype(np.float64)
            stats.predicted_scores = np.exp(predicted, out=predicted)
        rho_source = "unused"
        if RHO in needs:
            if self.rho is not None:
                if self.rho.shape != (n_layer,):
                    raise MethodError(f"the policy has rho for {len(self.rho)} layers, the cache merges {n_layer}")
                stats.rho, rho_source = self.rho, self.rho_source
            elif (measured := self.measured_rho()) is not None:
                stats.rho, rho_source = measured, "prompt"
            elif one_modality(np.asarray(labels)[positions]):
                stats.rho, rho_source = np.ones(n_layer), "one modality"  # either mode plans the same
            else:
                raise MethodError(f"{self.method.name} needs rho: decode the prompt inside observe()")
        if KEYS in needs:
            stats.keys = np.stack([np.stack([kv_cache.read_rows(ctx, l, h, cells, "k", seq_id) for h in range(n_head_kv)])
                                   for l in range(n_layer)])
        if VALUE_NORMS in needs:  # on the cache's backend; [n_head_kv, n] floats per layer come back
            stats.value_norms = np.stack([kv_cache.value_norms(ctx, l, seq_id)[:, order] for l in range(n_layer)])
        if MATCHER in needs:  # keys compared on the cache's backend; only the best matches come back
            def match(layer, cand, piv, group, allowed):
                return kv_cache.match_keys(ctx, layer, cells[cand], cells[piv], group, allowed, seq_id)
            stats.matcher = match
        token_layout = TokenLayout(positions=positions, labels=np.asarray(labels)[positions])
        # One BLAS thread for the plan's small matrix products: numpy's OpenBLAS threads keep
        # spinning after a call and took the cores from llama.cpp's decode that follows (after a
        # FlowMM merge on 2 cores, the tiny model decoded 4-5x slower; docs/RESULTS.md).
        with threadpool_limits(limits=1, user_api="blas"):
            plan = self.method(token_layout, stats, n_layer, n_head_kv, self.budget)
        self._stats = None
        t1 = time.perf_counter()
        if plan.n_slots == len(cells) and plan.src.shape[3] == 1:  # keeps every cell as it is: nothing to do
            return Report(self.method.name, len(cells), len(cells), rho_source, stats.rho, plan_s=t1 - t0)
        prior = kv_cache.get_slot_bias(ctx, seq_id)[..., order]  # by position, like the plan's indices
        kv_cache.apply_plan(ctx, plan.to_cells(cells), seq_id)
        first = plan.src[..., 0]  # the merge dropped the bias: each slot takes its first source's again, plus its gain
        bias = np.where(first >= 0, np.take_along_axis(prior, np.maximum(first, 0), axis=-1), 0)
        if plan.bias_gain is not None:
            bias = bias + plan.bias_gain
        if np.any(bias != 0):
            kv_cache.set_slot_bias(ctx, bias, seq_id)
        return Report(self.method.name, len(cells), plan.n_slots, rho_source, stats.rho, plan,
                      plan_s=t1 - t0, apply_s=time.perf_counter() - t1)
