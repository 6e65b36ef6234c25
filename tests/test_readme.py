"""The README's recipes, run as written: each code block after a `<!-- recipe: NAME -->` marker
is executed from the repository root (shell blocks with bash, Python blocks with this
interpreter), with only its placeholder file names replaced by test files and the serve port by
a free one. The references: the default model's own answers where a recipe asks a question with
one answer, llama.cpp's and the server's own output otherwise."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def recipe(name: str) -> tuple[str, str]:
    m = re.search(rf"<!-- recipe: {re.escape(name)} -->\n```(\w+)\n(.*?)```", README, re.DOTALL)
    assert m, f"README has no recipe {name!r}"
    return m.group(1), m.group(2)


def run(kind: str, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    code = code.replace(".venv/bin/python", sys.executable)
    cmd = ["bash", "-c", code] if kind == "sh" else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_recipe_marker_is_one_the_tests_run():
    assert sorted(re.findall(r"<!-- recipe: ([\w-]+) -->", README)) == sorted(
        ["chat", "serve", "serve-client", "press", "llava"])
    assert len(README.splitlines()) <= 200


def test_the_chat_recipe_answers(default_model_path):
    r = run(*recipe("chat"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "paris" in r.stdout.lower()


def test_the_serve_recipe_streams_to_the_openai_client(default_model_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kind, start = recipe("serve")
    start = start.replace("--port 8080", f"--port {port}").replace(" &\n", "\n").strip()
    proc = subprocess.Popen(["bash", "-c", "exec " + start.replace(".venv/bin/python", sys.executable)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        kind, client = recipe("serve-client")
        r = run(kind, client.replace("127.0.0.1:8080", f"127.0.0.1:{port}"))
        assert r.returncode == 0, r.stderr[-2000:]
        said = r.stdout.lower()
        assert sum(c in said for c in ("red", "blue", "yellow", "green")) >= 2, r.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_press_recipe_runs_past_n_ctx_on_a_users_llama(default_model_path):
    r = run(*recipe("press"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()


def test_the_own_llava_recipe_learns_and_answers(tiny_models, tmp_path):
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (64, 48), (200, 120, 40)).save(image)
    kind, code = recipe("llava")
    r = run(kind, code.replace("llava-v1.5-7b.Q4_K_M.gguf", str(tiny_models[0]))
            .replace("mmproj-model-f16.gguf", str(tiny_models[1])).replace("cat.png", str(image)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no importance predictor" in r.stderr and "learning one" in r.stderr  # what the README says
    assert r.stdout.strip()
