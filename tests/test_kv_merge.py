"""Merge plans applied through the FlowMM C API, against llama.cpp's own sequence state.

The reference never calls the merge API: it parses llama_state_seq_get_data, builds the
merged cache in numpy, writes it back in llama.cpp's state format and loads it into a fresh
context with llama_state_seq_set_data; both contexts then decode the same next token.
"""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.models import tiny as tm
from flowmm_edge.bindings import kv_cache, runtime
from state_reference import load_seq_state, parse_seq_state, seq_state_bytes, write_seq_state

SPEC = tm.TINY.text
HD = SPEC.n_embd // SPEC.n_head
L, H = SPEC.n_layer, SPEC.n_head_kv
PROMPT = "the secret key is red and the code is 1234 please tell me what color the cat is and how many dogs"
NEXT = "the"
CONFIGS = [("f16", True), ("f16", False), ("q8_0", True)]
# relative error of next-token logits against the reference (f16: the 1e-3; q8_0: requantization)
TOL = {"f16": 1e-3, "q8_0": 2e-2}


def _ctx(model, kv_type, fa):
    return runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, kv_type=kv_type, flash_attn=fa, n_threads=2)


def _rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _reference_logits(model, kv_type, fa, state, plan: kv_cache.MergePlan, next_tokens):
    """Merged cache built in numpy from the parsed state, loaded into a fresh context."""
    n_slots = plan.src.shape[2]
    ks, vs = [], []
    v_weight = plan.weight if plan.v_weight is None else plan.v_weight
    for rows_all, weight, out in ((state.k, plan.weight, ks), (state.v, v_weight, vs)):
        for l in range(L):
            m = np.zeros((n_slots, H * HD), np.float32)
            for h in range(H):
                for j in range(n_slots):
                    for c, w in zip(plan.src[l, h, j], weight[l, h, j]):
                        if c >= 0:
                            m[j, h * HD:(h + 1) * HD] += w * rows_all[l][c, h * HD:(h + 1) * HD]
            out.append(m)
    with _ctx(model, kv_type, fa) as ref:
        load_seq_state(ref.ptr, write_seq_state(state, plan.slot_pos, ks, vs))
        return ref.decode(next_tokens, int(plan.slot_pos[-1]) + 1)


def _run(model, kv_type, fa, make_plan):
    """(merged logits, reference logits, baseline logits) for the plan make_plan(n_cells, rng) builds."""
    rng = np.random.default_rng(7)
    tokens = model.tokenize(PROMPT)
    nxt = model.tokenize(NEXT, add_special=False)
    with _ctx(model, kv_type, fa) as ctx:
        ctx.decode(tokens, 0)
        state = parse_seq_state(seq_state_bytes(ctx.ptr, 0), H * HD, H * HD)
        cells, pos = kv_cache.seq_cells(ctx, 0)
        assert np.array_equal(cells, np.arange(len(tokens)))  # so cell index == state row
        plan = make_plan(len(tokens), rng)
        with _ctx(model, kv_type, fa) as base:
            base.decode(tokens, 0)
            baseline = base.decode(nxt, len(tokens))
        kv_cache.apply_plan(ctx, plan)
        after_cells, after_pos = kv_cache.seq_cells(ctx, 0)
        merged = ctx.decode(nxt, len(tokens))
    ref = _reference_logits(model, kv_type, fa, state, plan, nxt)
    return merged, ref, baseline, (after_cells, after_pos, plan)


def _identity(n, rng):
    return kv_cache.MergePlan.keep(np.broadcast_to(np.arange(n), (L, H, n)), np.arange(n))


def _keep_subset(n, rng):
    keep = np.sort(np.r_[0, rng.choice(np.arange(1, n - 1), size=n // 2, replace=False), n - 1])
    return kv_cache.MergePlan.keep(np.broadcast_to(keep, (L, H, len(keep))), keep)


def _per_head_weighted(n, rng):
    """Differing selections per layer and head, 3 weighted sources per slot, some unused."""
    B, S = n // 3, 3
    slot_pos = np.sort(np.r_[rng.choice(np.arange(0, n - 1), size=B - 1, replace=False), n - 1])
    src = rng.integers(0, n, size=(L, H, B, S)).astype(np.int32)
    src[..., 0] = slot_pos  # every slot keeps its anchor cell
    src[rng.random((L, H, B, S)) < 0.2] = -1
    src[..., 0] = slot_pos
    weight = rng.uniform(0.1, 1.0, size=(L, H, B, S)).astype(np.float32)
    return kv_cache.MergePlan(src=src, weight=weight, slot_pos=slot_pos.astype(np.int32))


def _keys_kept_values_weighted(n, rng):
    """The same sources, K taken from each slot's first source alone, V weighted over all of them."""
    plan = _per_head_weighted(n, rng)
    key_weight = np.zeros_like(plan.weight)
    key_weight[..., 0] = 1.0
    return kv_cache.MergePlan(src=plan.src, weight=key_weight, slot_pos=plan.slot_pos, v_weight=plan.weight)


@pytest.mark.parametrize("kv_type,fa", CONFIGS)
def test_identity_plan_leaves_the_next_logits_unchanged(model, kv_type, fa):
    merged, ref, baseline, _ = _run(model, kv_type, fa, _identity)
    if kv_type == "f16":
        np.testing.assert_array_equal(merged, baseline)
    else:
        assert _rel_err(merged, baseline) <= 1e-5


@pytest.mark.parametrize("kv_type,fa", CONFIGS)
@pytest.mark.parametrize("make_plan", [_keep_subset, _per_head_weighted, _keys_kept_values_weighted],
                         ids=["keep-subset", "per-head-weighted", "keys-kept-values-weighted"])
def test_plan_equals_the_state_edited_reference(model, kv_type, fa, make_plan):
    merged, ref, baseline, (cells, pos, plan) = _run(model, kv_type, fa, make_plan)
    assert _rel_err(merged, ref) <= TOL[kv_type]
    assert _rel_err(merged, baseline) > 10 * TOL[kv_type], "the plan should change the logits"
    # compacted: survivors in the lowest cells, positions as planned
    n_slots = plan.src.shape[2]
    assert np.array_equal(cells, np.arange(n_slots)) and np.array_equal(pos, plan.slot_pos)


def _bad_plans(n, cells_other):
    good = _keep_subset(n, np.random.default_rng(1))
    B = good.src.shape[2]

    def with_(**kw):
        p = kv_cache.MergePlan(src=good.src.copy(), weight=good.weight.copy(), slot_pos=good.slot_pos.copy())
        for k, v in kw.items():
            v(getattr(p, k)) if callable(v) else setattr(p, k, v)
        return p

    def setitem(idx, value):
        return lambda a: a.__setitem__(idx, value)

    return [
        (with_(src=setitem((0, 0, 1, 0), 10_000)), "cell 10000 is out of range"),
        (with_(src=setitem((1, 1, 2, 0), cells_other)), f"cell {cells_other} does not hold sequence 0"),
        (with_(weight=setitem((2, 0, 0, 0), np.nan)), "is negative or not finite"),
        (with_(weight=setitem((3, 1, 3, 0), -0.5)), "is negative or not finite"),
        (with_(v_weight=np.where(np.arange(good.src.size).reshape(good.src.shape) == 7, np.inf, 1.0).astype(np.float32)),
         "V weight inf is negative or not finite"),
        (with_(v_weight=np.ones(good.src.shape[:3], np.float32)), "v_weight"),
        (with_(src=good.src[:2], weight=good.weight[:2]), f"plan is for 2 layers x {H} KV heads, the cache has {L} x {H}"),
        (with_(slot_pos=setitem(2, 0)), "strictly increasing"),
        (with_(slot_pos=setitem(B - 1, n + 5)), f"the last slot must keep the sequence's last position {n - 1}"),
        (with_(src=setitem((0, 1, 4, 0), -1)), "has no source cell"),
        (kv_cache.MergePlan.keep(np.zeros((L, H, n + 1), np.int32), np.arange(n + 1)), f"but the sequence has only {n} cells"),
    ]


def test_invalid_plans_are_refused_and_change_nothing(model):
    tokens = model.tokenize(PROMPT)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, n_seq_max=2, kv_unified=True, n_threads=2) as ctx:
        ctx.decode(tokens, 0, seq_id=0)
        ctx.decode(model.tokenize("hello dogs"), 0, seq_id=1)
        other = int(kv_cache.seq_cells(ctx, 1)[0][0])
        before = seq_state_bytes(ctx.ptr, -1)
        for plan, message in _bad_plans(len(tokens), other):
            with pytest.raises(kv_cache.NativeError) as e:
                kv_cache.apply_plan(ctx, plan)
            assert message in str(e.value), (message, str(e.value))
            assert seq_state_bytes(ctx.ptr, -1) == before, f"cache changed after refusing: {message}"
        with pytest.raises(kv_cache.NativeError, match="seq_id 5 is out of range"):
            kv_cache.apply_plan(ctx, _identity(len(tokens), None), seq_id=5)
        # and the next decode is bit-identical to a context that never saw the bad plans
        with runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, n_seq_max=2, kv_unified=True, n_threads=2) as twin:
            twin.decode(tokens, 0, seq_id=0)
            twin.decode(model.tokenize("hello dogs"), 0, seq_id=1)
            nxt = model.tokenize(NEXT, add_special=False)
            np.testing.assert_array_equal(ctx.decode(nxt, len(tokens)), twin.decode(nxt, len(tokens)))


@pytest.mark.parametrize("unified", [False, True])
def test_other_sequences_are_untouched(model, unified):
    tokens, other = model.tokenize(PROMPT), model.tokenize("hello how many dogs are here")
    nxt = model.tokenize(NEXT, add_special=False)

    def two_sequences():
        ctx = runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, n_seq_max=2, kv_unified=unified, n_threads=2)
        ctx.decode(tokens, 0, seq_id=0)
        ctx.decode(other, 0, seq_id=1)
        return ctx

    with two_sequences() as ctx, two_sequences() as twin:
        before = seq_state_bytes(ctx.ptr, 1)
        if unified:  # seq 1's cells sit right after seq 0's: compaction must not move them
            assert kv_cache.seq_cells(ctx, 1)[0][0] == len(tokens)
        kv_cache.apply_plan(ctx, _keep_subset(len(tokens), np.random.default_rng(3)), seq_id=0)
        assert seq_state_bytes(ctx.ptr, 1) == before
        # separate streams: bit-identical. One unified stream: seq 1's next token lands in a cell
        # seq 0 freed, so attention visits its cells in another order (f16 accumulation differs)
        err = _rel_err(ctx.decode(nxt, len(other), seq_id=1), twin.decode(nxt, len(other), seq_id=1))
        assert err == 0.0 if not unified else err <= TOL["f16"]


def test_compacted_cache_keeps_working_through_decodes_and_a_second_merge(model):
    tokens = model.tokenize(PROMPT)
    n = len(tokens)
    with _ctx(model, "f16", True) as ctx:
        logits = ctx.decode(tokens, 0)
        assert kv_cache.used_bound(ctx) == n
        plan = _keep_subset(n, np.random.default_rng(5))
        kv_cache.apply_plan(ctx, plan)
        b1 = plan.src.shape[2]
        assert kv_cache.used_bound(ctx) == b1
        pos = n
        for _ in range(50):  # greedy decode on the compacted cache
            logits = ctx.decode([int(logits.argmax())], pos)
            assert np.isfinite(logits).all()
            pos += 1
        cells, positions = kv_cache.seq_cells(ctx)
        assert kv_cache.used_bound(ctx) == b1 + 50 and np.array_equal(positions[b1:], np.arange(n, n + 50))
        # second merge over the merged cells: keep every third cell and the last
        keep = np.r_[np.arange(0, len(cells) - 1, 3), len(cells) - 1]
        second = kv_cache.MergePlan.keep(np.broadcast_to(cells[keep], (L, H, len(keep))), positions[keep])
        kv_cache.apply_plan(ctx, second)
        assert kv_cache.used_bound(ctx) == len(keep)
        assert np.array_equal(kv_cache.seq_cells(ctx)[1], positions[keep])
        assert np.isfinite(ctx.decode([int(logits.argmax())], pos)).all()
