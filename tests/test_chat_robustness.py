"""Nothing a user types, pastes, interrupts or loads breaks the chat or loses the conversation.

The reference for an interrupted reply is a run that was never interrupted and stopped at the
same token by its length limit: both must answer the next turn identically. Damaged session files
are real saves with a flipped byte, a cut, or a header rewritten with a valid checksum. The fuzz
cases are bounded in count and time."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pexpect
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import REPO, write_png
from flowmm_edge.models import gguf_file
from flowmm_edge.bindings import runtime
from flowmm_edge.app import session_file
from flowmm_edge.errors import FlowMMError
from flowmm_edge.bindings.multimodal import MAX_IMAGE_PIXELS
from flowmm_edge.app.session import Session, SessionError

ENV_PY = [sys.executable, "-m", "flowmm_edge"]
FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def session(tiny_models):
    """One tiny-model session for the tests that only need it to survive (reset by each)."""
    text, mmproj = tiny_models
    with Session(text, mmproj, budget=48, n_ctx=160, max_reply=4, n_threads=2, schedule="blocking") as s:
        yield s


def _state(s):
    return (s.ctx.state(), list(s.messages), s.cached_text, s.pos, s.labels_by_pos.tolist())


def _fresh(tiny_models, method, max_reply=12):
    text, mmproj = tiny_models
    return Session(text, mmproj, method=method, budget=48 if method != "full" else 0.9, n_ctx=256,
                   max_reply=max_reply, n_threads=2, schedule="blocking")


FIRST = "tell me a long story about the red cat and the blue dog that live in the big old city"
SECOND = "and what happened next"


def _next_answer(s) -> tuple[np.ndarray, str]:
    s.add_user_turn(SECOND)
    logits = s.last_logits.copy()
    return logits, "".join(s.reply())


def _reference(tiny_models, method, n_tokens):
    """The same history, never interrupted: the first reply stops at n_tokens by its length limit."""
    assert n_tokens >= 1
    with _fresh(tiny_models, method) as ref:
        ref.add_user_turn(FIRST)
        list(ref.reply(max_tokens=n_tokens))
        assert ref.stats.generated_tokens == n_tokens
        return _next_answer(ref)


@pytest.mark.parametrize("method", ["flowmm", "snapkv", "full"])
@pytest.mark.parametrize("k", [1, 4])
def test_a_reply_closed_after_k_pieces_leaves_the_conversation_consistent(tiny_models, method, k):
    with _fresh(tiny_models, method) as s:
        s.add_user_turn(FIRST)
        assert method == "full" or s.stats.merges >= 1  # the reply follows a merge
        gen = s.reply()
        for i, _ in enumerate(gen):
            if i + 1 == k:
                break
        gen.close()
        n = s.stats.generated_tokens
        assert s.ctx.next_pos() == s.pos and len(s.labels_by_pos) >= s.pos
        got = _next_answer(s)
    want = _reference(tiny_models, method, n)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[1] == want[1]


@pytest.mark.parametrize("method", ["flowmm", "full"])
def test_ctrl_c_inside_a_token_decode_drops_that_token_and_the_next_turn_answers(tiny_models, method, monkeypatch):
    k = 3
    with _fresh(tiny_models, method) as s:
        s.add_user_turn(FIRST)
        real, calls = s.ctx.decode, []

        def decode_then_interrupt(tokens, pos, seq_id=0):
            out = real(tokens, pos, seq_id)  # the token is in the cache now
            calls.append(pos)
            if len(calls) == k:
                raise KeyboardInterrupt
            return out

        monkeypatch.setattr(s.ctx, "decode", decode_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            for _ in s.reply():
                pass
        monkeypatch.setattr(s.ctx, "decode", real)
        n = s.stats.generated_tokens
        assert n == min(k, len(calls)) - 1 and s.ctx.next_pos() == s.pos
        got = _next_answer(s)
    want = _reference(tiny_models, method, n)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[1] == want[1]


def test_an_exception_in_the_consumer_then_a_new_turn(tiny_models):
    with _fresh(tiny_models, "flowmm") as s:
        s.add_user_turn(FIRST)
        gen = s.reply()
        with pytest.raises(RuntimeError):
            for _ in gen:
                raise RuntimeError("the caller's callback failed")  # the generator is left suspended
        assert s.stats.generated_tokens == 0  # not yet recorded: the reply is still open
        s.add_user_turn(SECOND)  # closes the suspended reply first
        n = s.stats.generated_tokens
        assert n >= 1 and s.messages[-2][0] == "assistant" and s.ctx.next_pos() == s.pos
        got = (s.last_logits.copy(), "".join(s.reply()))
    want = _reference(tiny_models, "flowmm", n)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[1] == want[1]


# -- text in ------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_are_a_prompt(session, data):
    session.reset()
    session.add_user_turn(data.decode("utf-8", "surrogateescape"))
    text = "".join(session.reply())
    assert isinstance(text, str) and session.ctx.next_pos() == session.pos


def test_invalid_utf8_through_a_pipe_is_replaced_not_a_traceback(tiny_models):
    text, _ = tiny_models
    proc = subprocess.run(ENV_PY + ["chat", "--model", str(text), "--ctx", "256", "--budget", "64", "--max-tokens", "3"],
                          input=b"caf\xe9 ol\xff\n/stats\n", capture_output=True, cwd=REPO, timeout=120)
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "replaced by U+FFFD" in out and "1 turns" in out


def _spawn(tiny_models, *extra):
    return pexpect.spawn(sys.executable, ["-m", "flowmm_edge", "chat", "--model", str(tiny_models[0]), "--ctx", "256",
                                          "--budget", "64", "--max-tokens", "2", *extra],
                         cwd=str(REPO), encoding="utf-8", timeout=180)


def _positions(child) -> int:
    child.sendline("/stats")
    child.expect(r"(\d+) turns, (\d+) positions seen")
    return int(child.match.group(2))


def test_a_20000_character_paste_a_block_and_a_file_arrive_whole(tiny_models, tmp_path):
    words = " ".join(f"w{i % 97}" for i in range(4000))
    assert len(words) > 15_000
    with runtime.Model(tiny_models[0]) as m:
        n_tokens = len(m.tokenize(words, add_special=False))
    child = _spawn(tiny_models)
    child.expect("> ")
    child.send(words + "\r")          # one line, far past a cooked terminal's 4095 characters
    child.expect("> ", timeout=300)
    first = _positions(child)
    assert first >= n_tokens, (first, n_tokens)
    child.sendline('"""')             # a multi-line block, as in Ollama
    for line in ("first line", "second line", 'last line"""'):
        child.sendline(line)
    child.expect("> ")
    child.sendline("/stats")
    child.expect("2 turns")
    doc = tmp_path / "doc.txt"
    doc.write_bytes(words.encode() + b"\n\xff tail")
    child.sendline(f"/file {doc}")
    child.expect("replaced by U\\+FFFD")
    child.expect("> ", timeout=300)
    assert _positions(child) >= first + n_tokens
    child.sendline("/file")
    child.expect("error: /file needs a file name")
    child.sendline("/image")
    child.expect("error: ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# -- session files ------------------------------------------------------------------------------


def _resign(raw: bytes, header: dict) -> bytes:
    """A session file with `header` in place of its own and a valid checksum."""
    start = len(session_file.MAGIC) + session_file._FRAME.size
    n_blob, n_cache, n_logits, n_bias, _ = session_file._FRAME.unpack(raw[len(session_file.MAGIC):start])
    blob = json.dumps(header).encode()
    body = blob + raw[start + n_blob:]
    return (session_file.MAGIC + session_file._FRAME.pack(len(blob), n_cache, n_logits, n_bias,
                                                          hashlib.sha256(body).digest()) + body)


def test_damaged_session_files_are_refused_and_change_nothing(session, tmp_path):
    session.reset()
    session.chat("hello there")
    saved = tmp_path / "ok.session"
    session.save(saved)
    session.chat("and more")
    before = _state(session)
    raw = saved.read_bytes()
    start = len(session_file.MAGIC) + session_file._FRAME.size
    n_blob = struct.unpack("<I", raw[len(session_file.MAGIC):len(session_file.MAGIC) + 4])[0]
    header = json.loads(raw[start:start + n_blob])

    def flipped(at):
        b = bytearray(raw)
        b[at] ^= 0x10
        return bytes(b)

    cases = {
        "header byte": (flipped(start + 5), "checksum"),
        "cache byte": (flipped(start + n_blob + 40), "checksum"),
        "truncated": (raw[:-7], "truncated"),
        "no model": (_resign(raw, {k: v for k, v in header.items() if k != "model"}), "'model'"),
        "messages not a list": (_resign(raw, {**header, "messages": "hi"}), "'messages'"),
        "non-integer label": (_resign(raw, {**header, "labels": [0.5] * header["pos"]}), "'labels'"),
        "tokens of another length": (_resign(raw, {**header, "tokens": header["tokens"][:-1]}), "'tokens'"),
        "token below -1": (_resign(raw, {**header, "tokens": [-2] * header["pos"]}), "'tokens'"),
        "pos beyond the cache": (_resign(raw, {**header, "pos": header["pos"] + 3, "labels": header["labels"] + [0] * 3,
                                                   "tokens": header["tokens"] + [0] * 3}),
                                 "cache ends at position"),
    }
    for name, (data, message) in cases.items():
        bad = tmp_path / "bad.session"
        bad.write_bytes(data)
        with pytest.raises(SessionError, match=message):
            session.load(bad)
        assert _state(session) == before, name
    session.load(saved)  # the intact file still loads, with the token of every position
    assert session.messages[-1][0] == "assistant" and len(session.messages) < len(before[1])
    assert session.tokens_by_pos.tolist() == header["tokens"] and len(header["tokens"]) == header["pos"]
    assert header["tokens"][:5] == session.model.tokenize(session.cached_text)[:5]


FLIPS = st.lists(st.tuples(st.integers(0, 2 ** 31), st.integers(1, 255)), min_size=1, max_size=4)


def _flip(raw: bytes, flips, limit: int) -> bytes:
    out = bytearray(raw)
    for at, mask in flips:
        out[at % limit] ^= mask
    return bytes(out)


@FUZZ
@given(FLIPS)
def test_random_flips_in_a_session_file(session, tmp_path_factory, flips):
    session.reset()
    session.chat("hi")
    path = tmp_path_factory.mktemp("fuzz") / "s.session"
    session.save(path)
    before = _state(session)
    raw = path.read_bytes()
    damaged = _flip(raw, flips, len(raw))
    path.write_bytes(damaged)
    if damaged == raw:  # the flips cancelled out: an intact file loads
        session.load(path)
        return
    with pytest.raises(SessionError):
        session.load(path)
    assert _state(session) == before


@FUZZ
@given(FLIPS)
def test_random_flips_in_a_gguf_header(tiny_models, tmp_path_factory, flips):
    raw = tiny_models[0].read_bytes()
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    path.write_bytes(_flip(raw, flips, gguf_file.open_gguf(tiny_models[0]).data_offset))
    # a one-line error or a model that loads; in a child process, so that a crash is seen as one
    code = ("import sys\nfrom flowmm_edge.bindings import runtime\nfrom flowmm_edge.errors import FlowMMError\n"
            f"try:\n    runtime.Model({str(path)!r}).close()\nexcept FlowMMError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-1500:]


# -- arguments and images -----------------------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--ctx", "0"], "--ctx 0 is below the minimum"),
    (["--ctx", "-5"], "--ctx -5 is below the minimum"),
    (["--ctx", "1000000000"], "--ctx 1000000000 is above the model's trained context"),
    (["--temp", "nan"], "--temp nan must be a finite number"),
    (["--max-tokens", "-1"], "--max-tokens -1 must be >= 1"),
    (["--threads", "-5"], "--threads -5 must be >= 1"),
    (["--budget", "36"], "must be above the 36 cells every merge keeps"),
])
def test_bad_chat_flags_give_one_line_naming_the_flag(tiny_models, flags, message):
    proc = subprocess.run(ENV_PY + ["chat", "--model", str(tiny_models[0]), "--prompt", "hi", "--ctx", "256", *flags],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr


def test_seed_minus_one_means_random_and_outputs_are_checked_first(tiny_models, tmp_path):
    proc = subprocess.run(ENV_PY + ["chat", "--model", str(tiny_models[0]), "--prompt", "hi", "--ctx", "256",
                                    "--budget", "64", "--seed", "-1", "--temp", "0.7", "--max-tokens", "3"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr[-1500:]
    out = tmp_path / "new" / "folder" / "policy.json"
    proc = subprocess.run(ENV_PY + ["calibrate", "--model", str(tiny_models[0]), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-1500:]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = subprocess.run(ENV_PY + ["eval", "--model", "tiny", "--json", str(blocker / "rows.json")],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--json" in lines[0] and "cannot create the folder" in lines[0]


def _big_png(path, width: int, height: int):
    """A valid RGB PNG of any size, written row by row (all black)."""
    comp, row = zlib.compressobj(9), b"\x00" * (1 + 3 * width)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_image_pixel_limits(session, tmp_path):
    huge = _big_png(tmp_path / "huge.png", 20000, 20000)
    assert 20000 * 20000 > MAX_IMAGE_PIXELS
    with pytest.raises(FlowMMError, match=r"20000x20000 pixels is above the limit of 100 megapixels"):
        session.projector.prepare(huge)
    big = write_png(tmp_path / "big.png", 5000, 4000)
    prepared = session.projector.prepare(big)
    try:
        assert prepared.note and "downscaled from 5000x4000" in prepared.note and prepared.n_pos > 0
    finally:
        prepared.close()


def test_a_session_file_keeps_the_slot_bias_and_version_2_files_still_load(tiny_models, tmp_path):
    from flowmm_edge.bindings import kv_cache

    text, _ = tiny_models
    with Session(text, budget=48, n_ctx=160, max_reply=4, n_threads=2, schedule="blocking") as a, \
         Session(text, budget=48, n_ctx=160, max_reply=4, n_threads=2, schedule="blocking") as b:
        a.chat("the secret key is red and the code is 1234")
        cells, pos = kv_cache.seq_cells(a.ctx)
        lay = kv_cache.layout(a.ctx)
        bias = np.random.default_rng(5).uniform(-1, 1, (lay.n_layer, lay.n_head_kv, len(cells))).astype(np.float32)
        kv_cache.set_slot_bias(a.ctx, bias)
        a.save(tmp_path / "biased.session")
        b.load(tmp_path / "biased.session")
        # the same bias on the same positions, wherever the cells landed, and the same next token
        b_cells, b_pos = kv_cache.seq_cells(b.ctx)
        got = kv_cache.get_slot_bias(b.ctx)
        np.testing.assert_array_equal(got[..., np.argsort(b_pos)], bias[..., np.argsort(pos)])
        np.testing.assert_array_equal(a.ctx.decode([7], a.pos), b.ctx.decode([7], b.pos))

        # a version 2 file (no bias section) written by hand loads, and carries no bias
        raw = (tmp_path / "biased.session").read_bytes()
        start = len(session_file.MAGIC) + session_file._FRAME.size
        n_blob, n_cache, n_logits, n_bias, _ = session_file._FRAME.unpack(raw[len(session_file.MAGIC):start])
        header = {**json.loads(raw[start:start + n_blob]), "version": 2}
        blob = json.dumps(header).encode()
        body = blob + raw[start + n_blob:start + n_blob + n_cache + n_logits]
        v2 = b"FLOWMMS2" + struct.pack("<IQQ32s", len(blob), n_cache, n_logits, hashlib.sha256(body).digest()) + body
        (tmp_path / "v2.session").write_bytes(v2)
        b.load(tmp_path / "v2.session")
        assert b.pos == a.pos and not np.any(kv_cache.get_slot_bias(b.ctx))

        # a bias section that does not fit the cache is refused, and the session stays as it was
        short = _resign(raw[:-4], json.loads(raw[start:start + n_blob]))
        short = short[:len(session_file.MAGIC)] + session_file._FRAME.pack(
            *session_file._FRAME.unpack(short[len(session_file.MAGIC):start])[:3], n_bias - 4,
            hashlib.sha256(short[start:]).digest()) + short[start:]
        (tmp_path / "short.session").write_bytes(short)
        before = _state(b)
        with pytest.raises(SessionError, match="slot bias of"):
            b.load(tmp_path / "short.session")
        assert _state(b) == before and not np.any(kv_cache.get_slot_bias(b.ctx))
