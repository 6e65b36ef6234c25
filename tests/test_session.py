"""The Session on the tiny multimodal pair: turns, streaming, budget-driven merges, bounded
memory over 200 turns, chunked prefill, errors that lose nothing, save/load across processes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from flowmm_edge.models import tiny as tm
from conftest import REPO, write_png
from flowmm_edge.calibration import calibration_pass
from flowmm_edge.bindings import kv_cache
from flowmm_edge.errors import FlowMMError
from flowmm_edge.app.session import Session, SessionError


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_png(tmp_path_factory.mktemp("img") / "pic.png", 40, 30)


def _session(tiny_models, **kw):
    text, mmproj = tiny_models
    args = dict(budget=48, n_ctx=160, max_reply=12, n_threads=2, schedule="blocking")  # merged at each turn's end
    args.update(kw)
    return Session(text, mmproj, **args)


def test_text_and_image_turns_stream_and_merge(tiny_models, image):
    with _session(tiny_models) as s:
        n = s.add_user_turn("what is in the picture", images=[image])
        labels = s.labels_by_pos[: s.pos]
        assert (labels == 1).sum() == 16, "the tiny projector makes 16 image positions"
        pieces = list(s.reply())
        assert pieces and all(isinstance(p, str) for p in pieces)
        assert s.messages[-1] == ("assistant", "".join(pieces))
        assert s.stats.merges == 1 and n > 48
        cells, positions = kv_cache.seq_cells(s.ctx)
        assert len(cells) == 48 + s.stats.generated_tokens  # merged to the budget, then the reply
        assert positions[-1] == s.pos - 1
        s.add_user_turn("and the colours?")
        assert s.stats.merges == 2 and s.cells() == 48


def test_200_turns_stay_within_the_buffer_and_the_budget(tiny_models, image):
    with _session(tiny_models, max_reply=6, n_ctx=200) as s:  # room for a turn with an image and the repeat pass
        for i in range(200):
            s.add_user_turn(f"turn {i}: tell me more about the cat", images=[image] if i % 25 == 0 else [])
            assert s.cells() == 48, i  # right after the merge that ends every turn
            list(s.reply())
            assert s.cells() <= 48 + 6
            assert kv_cache.used_bound(s.ctx) <= 48 + 6  # compacted: no cell beyond the kept ones
        r = s.report()
        assert r["positions"] > 20 * r["buffer_cells"], "the uncompressed conversation outgrew the buffer many times"
        assert r["full_equivalent_bytes"] > 20 * r["buffer_bytes"] and r["kv_bytes"] <= 54 * s.bytes_per_cell
        assert r["merges"] == 200


def test_a_turn_longer_than_the_buffer_is_prefilled_in_chunks(tiny_models):
    with _session(tiny_models) as s:
        long_text = " ".join(f"word{i}" for i in range(150))
        n = s.add_user_turn(long_text)
        assert n > 160 and s.stats.merges >= 2 and s.cells() == 48
        assert s.pos == n and len(list(s.reply())) >= 0


def _state(s):
    return (s.ctx.state(), list(s.messages), s.pos, s.labels_by_pos.tolist())


def test_errors_lose_nothing(tiny_models, image, tmp_path):
    text, mmproj = tiny_models
    with _session(tiny_models) as s:
        s.chat("hello there", images=[image])
        before = _state(s)
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        for imgs, message in (([tmp_path / "missing.png"], "cannot read the image"),
                              ([bad], "not a readable image")):
            with pytest.raises(FlowMMError, match=message):
                s.add_user_turn("look", images=imgs)
            assert _state(s) == before
        # an image larger than the room left after a merge
        with _session(tiny_models, method="snapkv", n_ctx=96, budget=60, max_reply=24) as small:  # 12 cells of room
            small.chat("hi")
            kept = _state(small)
            with pytest.raises(SessionError, match="image of 16 positions cannot fit"):
                small.add_user_turn("look", images=[image])
            assert _state(small) == kept
        # the conversation goes on, and the next logits equal those of a session that never saw the errors
        s.add_user_turn("and now?")
        with _session(tiny_models) as clean:
            clean.chat("hello there", images=[image])
            clean.add_user_turn("and now?")
            np.testing.assert_array_equal(s.last_logits, clean.last_logits)
    with Session(text, None, budget=48, n_ctx=160) as t, pytest.raises(SessionError, match="no mmproj"):
        t.add_user_turn("look", images=[image])


def test_bad_configurations_are_refused(tiny_models, tmp_path):
    text, _ = tiny_models
    other = tm.write_mmproj(tm.TINY.vision, 256, tmp_path / "other-mmproj.gguf")
    with pytest.raises(FlowMMError, match="256-wide embeddings .* belongs to another model"):
        Session(text, other)
    with pytest.raises(SessionError, match="must be above the 36 cells every merge keeps"):
        Session(text, budget=20, n_ctx=256)
    with pytest.raises(SessionError, match="leaves no room"):
        Session(text, budget=250, n_ctx=256)
    with pytest.raises(SessionError, match="unknown method"):
        Session(text, method="zip")
    pol = calibration_pass.calibrate(text, progress=False)
    pol.model["gguf_header_sha256"] = "1" * 64
    with pytest.raises(FlowMMError, match="calibrated for"):
        Session(text, policy=pol)
    with Session(text, budget="64KiB", n_ctx=256) as s:  # 64 KiB of this model's KV cells
        assert s.budget_cells == 64 * 1024 // s.engine.bytes_per_cell
    with Session(text, budget="0.25", n_ctx=256) as s:
        assert s.budget_cells == 64
    with pytest.raises(SessionError, match="is not a ratio"):
        Session(text, budget="lots", n_ctx=256)


CONTINUE = """
import sys, json, numpy as np
sys.path.insert(0, {scripts!r})
from flowmm_edge.bindings import runtime
runtime.quiet_native_logs()
from flowmm_edge.app.session import Session
s = Session({text!r}, {mmproj!r}, budget=48, n_ctx=160, max_reply=12, n_threads=2)
s.load({saved!r})
s.add_user_turn("what next")
np.save({out!r}, s.last_logits)
print(json.dumps(s.report()["positions"]))
"""


def test_save_then_load_in_a_new_process_continues_identically(tiny_models, image, tmp_path):
    text, mmproj = tiny_models
    saved = tmp_path / "chat.session"
    with _session(tiny_models) as s:
        s.chat("describe it", images=[image])
        s.chat("and the sky?")
        s.save(saved)
        s.add_user_turn("what next")
        want, positions = s.last_logits, s.pos
    out = tmp_path / "logits.npy"
    code = CONTINUE.format(scripts=str(REPO / "scripts"), text=str(text), mmproj=str(mmproj), saved=str(saved), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == positions
    np.testing.assert_array_equal(np.load(out), want)


def test_bad_session_files_change_nothing(tiny_models, tmp_path):
    with _session(tiny_models) as s:
        s.chat("hello")
        before = _state(s)
        s.save(tmp_path / "ok.session")
        raw = (tmp_path / "ok.session").read_bytes()
        (tmp_path / "cut.session").write_bytes(raw[:-10])
        (tmp_path / "junk.session").write_bytes(b"hello")
        for name, message in (("cut", "truncated"), ("junk", "not a flowmm-edge session"), ("none", "cannot read")):
            with pytest.raises(SessionError, match=message):
                s.load(tmp_path / f"{name}.session")
            assert _state(s) == before


def test_a_closed_sessions_model_refuses_instead_of_reading_freed_memory(tiny_models):
    """After the session ends its model is freed: tokenizing or detokenizing with it raises a
    clear error (it crashed the process when the freed vocab pointer was still read)."""
    with _session(tiny_models) as s:
        model = s.model
        toks = model.tokenize("hello there")
        assert model.detokenize(toks).strip() == "hello there"
    with pytest.raises(FlowMMError, match="closed"):
        model.detokenize(toks)
    with pytest.raises(FlowMMError, match="closed"):
        model.tokenize("hello")
