"""`serve` against hostile and impatient clients, on 127.0.0.1 with the tiny model: local files
(refused by default, only under --allowed-local-media, symlinks resolved), special and huge
files refused fast with flat memory, departed clients' work dropped, a short request served
while a long prompt prefills, SIGTERM honoured within seconds; and the same bounded reads in
`chat` (/image /dev/zero through a pipe). Each check fails without its fix: without the bounds a
read of /dev/zero never ends, without chunked prefill the short request waits for the long one."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import write_png
from flowmm_edge.bindings import media
from test_server import MSG1, rss_kib, server

LONG = " ".join(["the secret key is red and the code is 1234 please tell me"] * 230)  # ~6,000 tiny tokens


def _image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def _post(srv, messages, timeout=30, **kw):
    return httpx.post(srv.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4, **kw},
                      timeout=timeout)


# -- the bounded reader, alone ---------------------------------------------------------------------

def test_special_and_huge_files_are_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sparse = tmp_path / "sparse.png"
    with open(sparse, "wb") as f:
        f.truncate(10 * 2 ** 30)  # 10 GiB, no blocks
    for path, message in [("/dev/zero", "not a regular file"), (fifo, "not a regular file"),
                          (sparse, "above the image size limit"), (tmp_path, "not a regular file")]:
        t = time.monotonic()
        with pytest.raises(media.MediaError, match=message):
            media.read_image_file(path)
        assert time.monotonic() - t < 1.0
    small = write_png(tmp_path / "ok.png", 8, 8)
    assert media.read_image_file(small) == small.read_bytes()
    with pytest.raises(media.MediaError, match="above the image size limit"):
        media.read_image_file(small, max_bytes=10)


def test_local_paths_only_under_the_allowed_directory(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    inside = write_png(root / "in.png", 8, 8)
    outside = write_png(tmp_path / "secret.png", 8, 8)
    (root / "link.png").symlink_to(outside)
    with pytest.raises(media.MediaError) as exists:
        media.image_from_url(str(outside))  # no allowed directory: no local file at all
    with pytest.raises(media.MediaError) as missing:
        media.image_from_url(str(tmp_path / "nope.png"))
    assert str(exists.value) == str(missing.value) == media.LOCAL_REFUSED
    assert media.image_from_url(str(inside), allowed_dir=root) == inside.read_bytes()
    assert media.image_from_url("file://" + str(inside), allowed_dir=root) == inside.read_bytes()
    for url in [str(outside), str(root / "link.png"), "../secret.png", str(root / ".." / "secret.png"),
                str(tmp_path / "nope.png")]:
        with pytest.raises(media.MediaError, match="not under the allowed media directory"):
            media.image_from_url(url, allowed_dir=root)
    big = base64.b64encode(b"x" * 4096).decode()
    with pytest.raises(media.MediaError, match="above the image size limit"):
        media.image_from_url("data:image/png;base64," + big, max_bytes=1024)


# -- through the server ----------------------------------------------------------------------------

def test_the_server_reads_no_local_file_and_refuses_special_ones_with_flat_memory(tiny_models, tmp_path):
    png = write_png(tmp_path / "in.png", 16, 16)
    with server(tiny_models, "-c", "1024", "-np", "1") as s:
        for url in [str(png), "/etc/passwd", "/nonexistent/x.png", "file:///dev/zero"]:
            r = _post(s, _image_message(url))
            assert r.status_code == 400 and r.json()["error"]["message"] == media.LOCAL_REFUSED
        ok = _post(s, _image_message("data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()))
        assert ok.status_code == 200
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sparse = tmp_path / "big.png"
    with open(sparse, "wb") as f:
        f.truncate(10 * 2 ** 30)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with server(tiny_models, "-c", "1024", "-np", "1", "--allowed-local-media", str(tmp_path)) as s:
        assert _post(s, _image_message(str(png))).status_code == 200
        rss0 = rss_kib(s.pid)
        for url, message in [(str(fifo), "not a regular file"), (str(sparse), "above the image size limit"),
                             (str(tmp_path / "zero.png"), "not under the allowed media directory"),
                             ("/dev/zero", "not under the allowed media directory")]:
            t = time.monotonic()
            r = _post(s, _image_message(url))
            assert time.monotonic() - t < 1.0
            assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert rss_kib(s.pid) - rss0 < 10 * 1024
        assert _post(s, MSG1).status_code == 200


def test_a_prompt_over_the_limit_is_refused_before_any_work(tiny_models):
    with server(tiny_models, "-c", "1024", "-np", "1", "--max-prompt-tokens", "100") as s:
        r = _post(s, [{"role": "user", "content": LONG}])
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "flowmm_requests_total 0" in httpx.get(s.url + "/metrics").text
        assert _post(s, MSG1).status_code == 200


def _stream_first_piece(url: str, messages, out: dict, max_tokens: int = 4) -> None:
    out["start"] = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                      json={"messages": messages, "max_tokens": max_tokens, "stream": True}) as r:
        for line in r.iter_lines():
            if '"content"' in line:
                out["first"] = time.monotonic()
                return


def test_a_short_request_is_answered_while_a_long_prompt_prefills(tiny_models):
    with server(tiny_models, "-c", "8192", "-np", "2", "--method", "full") as s:
        long = {}  # 6,000 tokens: seconds of prefill here
        t = threading.Thread(target=_stream_first_piece, args=(s.url, [{"role": "user", "content": LONG}], long))
        t.start()
        time.sleep(0.2)  # the long prompt is prefilling
        r = _post(s, MSG1, timeout=120)
        short_done = time.monotonic()
        t.join(timeout=120)
        assert r.status_code == 200 and "first" in long
        # the short answer came while the long prompt was still prefilling: before its first token
        assert short_done < long["first"], (short_done - long["start"], long["first"] - long["start"])


def test_a_departed_clients_work_is_dropped(tiny_models):
    with server(tiny_models, "-c", "8192", "-np", "1", "--method", "full") as s:
        def leave_after(seconds: float) -> None:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.url + "/v1/chat/completions", timeout=seconds,
                           json={"messages": [{"role": "user", "content": LONG}], "max_tokens": 4})
        leave_after(0.5)   # running: its prefill stops at the next chunk
        leave_after(0.5)   # queued behind it or running: dropped either way
        t = time.monotonic()
        assert _post(s, MSG1, timeout=60).status_code == 200
        answered = time.monotonic() - t
        metrics = httpx.get(s.url + "/metrics").text
        assert "flowmm_requests_cancelled_total 2" in metrics, metrics
        alone = time.monotonic()
        _post(s, [{"role": "user", "content": LONG}], timeout=120)
        assert answered < time.monotonic() - alone  # less than one long prefill: nobody prefilled for the departed


def test_a_timeout_stops_a_request_with_408(tiny_models):
    with server(tiny_models, "-c", "4096", "-np", "1", "--timeout", "1.5") as s:
        t = time.monotonic()
        # 24,000 tokens prefilled and merged down in chunks (with the repeat pass: the tiny model has no
        # predictor): many seconds on any machine
        r = _post(s, [{"role": "user", "content": LONG * 4}], timeout=120)
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        assert time.monotonic() - t < 1.5 + 2  # stopped at a chunk boundary soon after its time ran out
        assert _post(s, MSG1).status_code == 200  # a short one fits its time


def test_sigterm_during_a_long_request_exits_within_seconds(tiny_models):
    with server(tiny_models, "-c", "8192", "-np", "1", "--method", "full") as s:
        got = {}

        def ask():  # 6,000 tokens: seconds of prefill here, then up to 2,000 decoded
            try:
                got["r"] = _post(s, [{"role": "user", "content": LONG}], timeout=120, max_tokens=2000)
            except httpx.TransportError as e:
                got["r"] = e
        t = threading.Thread(target=ask)
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        s.send_signal(signal.SIGTERM)
        s.wait(timeout=30)
        assert time.monotonic() - t0 <= 5.0
        t.join(timeout=10)
        r = got["r"]
        assert isinstance(r, httpx.TransportError) or r.status_code == 503


def test_chat_image_of_dev_zero_through_a_pipe_is_one_line_and_the_chat_goes_on(tiny_models, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    script = f"/image /dev/zero\n/image {fifo}\nhello\n"
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "flowmm_edge", "chat", "-m", str(tiny_models[0]), "--mmproj",
                          str(tiny_models[1]), "-c", "1024", "-n", "4", "-t", "2"], input=script, text=True,
                         capture_output=True, timeout=120)
    assert time.monotonic() - t < 60 and out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    lines = (out.stdout + out.stderr).splitlines()
    assert sum("/dev/zero" in ln and "not a regular file" in ln for ln in lines) == 1
    assert sum(str(fifo) in ln and "not a regular file" in ln for ln in lines) == 1
