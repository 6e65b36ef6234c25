"""`python -m flowmm_edge chat` driven as a user would: a pseudo-terminal (pexpect) for the
interactive loop, --prompt for scripts, --hf-repo through a local Hub stand-in, and the real
default model answering a planted-fact question under a small budget."""

from __future__ import annotations

import os
import sys

import numpy as np
import pexpect
import pytest

from conftest import REPO, write_png
from fake_hub import FakeHub

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_DISABLE_TELEMETRY": "1"}


def spawn(*args, env=None, timeout=60):
    return pexpect.spawn(sys.executable, ["-m", "flowmm_edge", "chat", *args], cwd=str(REPO), env=env or ENV,
                         encoding="utf-8", timeout=timeout)


def test_interactive_chat(tiny_models, tmp_path):
    text, mmproj = tiny_models
    img = write_png(tmp_path / "pic.png", 32, 32)
    child = spawn("--model", str(text), "--mmproj", str(mmproj), "--ctx", "256", "--budget", "64", "--max-tokens", "8",
                  "--schedule", "blocking")
    child.expect("type /help for commands")
    child.expect("> ")
    child.sendline(f"/image {img}")
    child.expect(f"image attached: {img}")
    child.expect("> ")
    child.sendline("what is in the picture?")
    child.expect("> ")  # the reply streamed, the prompt is back
    child.sendline("/stats")
    child.expect(r"method flowmm, blocking: 1 turns, (\d+) positions seen; merges waited for 1 ")
    positions = int(child.match.group(1))
    child.expect(r"KV cells in use (\d+) of a fixed 256-cell buffer")
    assert int(child.match.group(1)) <= 64 + 8 < positions
    child.expect(r"compression [0-9.]+x")
    child.sendline(f"/image {tmp_path / 'nope.png'}")
    child.expect(r"error: .*nope.png: cannot read the image")
    child.sendline("/help")
    child.expect("/save FILE")
    child.sendline("and then?")  # the chat goes on after the error
    child.expect("> ")
    child.sendline("/stats")
    child.expect("2 turns")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_one_shot_prompt_and_bad_inputs(tiny_models, tmp_path):
    text, mmproj = tiny_models
    img = write_png(tmp_path / "pic.png", 32, 32)
    child = spawn("--model", str(text), "--mmproj", str(mmproj), "--ctx", "256", "--budget", "64", "--max-tokens", "4",
                  "--prompt", "hello", "--image", str(img))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    child = spawn("--model", str(tmp_path / "missing.gguf"), "--prompt", "hi")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "error: " in child.before and "Traceback" not in child.before
    # --chat-template: said on stderr; an unknown name is one line naming the flag
    child = spawn("--model", str(text), "--ctx", "256", "--budget", "64", "--max-tokens", "2", "--chat-template",
                  "vicuna", "--prompt", "hi")
    child.expect("chat template: vicuna \\(--chat-template\\)")
    child.expect(pexpect.EOF)
    child = spawn("--model", str(text), "--chat-template", "nonsense", "--prompt", "hi")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "error: --chat-template 'nonsense' is neither a file" in child.before
    assert "Traceback" not in child.before


def test_hf_repo_download_then_offline(tiny_models, tmp_path):
    text, mmproj = tiny_models
    env = {**ENV, "HF_HOME": str(tmp_path / "hf")}
    with FakeHub("flowmm/tiny-llava", {"tiny.gguf": text, "mmproj.gguf": mmproj}) as hub:
        env["HF_ENDPOINT"] = hub.url
        child = spawn("--hf-repo", "flowmm/tiny-llava", "--hf-file", "tiny.gguf", "--hf-mmproj", "mmproj.gguf",
                      "--ctx", "256", "--budget", "64", "--max-tokens", "4", "--prompt", "hi", env=env)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        assert ("GET", "/flowmm/tiny-llava/resolve/main/tiny.gguf") in hub.requests
        assert ("GET", "/flowmm/tiny-llava/resolve/main/mmproj.gguf") in hub.requests
        cached = list((tmp_path / "hf").rglob("tiny.gguf"))
        assert cached and cached[0].read_bytes() == text.read_bytes()
    # the server is gone: offline mode serves both files from the cache
    env["HF_HUB_OFFLINE"] = "1"
    child = spawn("--hf-repo", "flowmm/tiny-llava", "--hf-file", "tiny.gguf", "--hf-mmproj", "mmproj.gguf",
                  "--ctx", "256", "--budget", "64", "--max-tokens", "4", "--prompt", "hi", env=env)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    child = spawn("--hf-repo", "flowmm/tiny-llava", "--hf-file", "other.gguf", "--prompt", "hi", env=env)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "other.gguf: not in the Hugging Face cache" in child.before


FILL = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]


@pytest.mark.parametrize("passkey,seed,budget", [
    ("71942", 0, "256"),
    pytest.param("30586", 1, "0.15", marks=pytest.mark.slow),
])
def test_real_model_answers_a_planted_fact_under_a_small_budget(default_model_path, passkey, seed, budget):
    rng = np.random.default_rng(seed)
    filler = lambda k: " ".join(rng.choice(FILL) for _ in range(k))  # noqa: E731
    prompt = (f"{filler(90)} The secret passkey is {passkey}. {filler(90)}\n"
              "What is the secret passkey? Answer with the number only.")
    child = spawn("--ctx", "1536", "--budget", budget, "--max-tokens", "12", "--threads", "2", "--prompt", prompt,
                  timeout=300)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert passkey in child.before


def test_hf_user_repo_quant_picks_the_gguf_and_its_mmproj(tiny_models, tmp_path):
    """-hf user/repo[:quant] as llama.cpp: the listed repo's GGUF with the quant tag (Q4_K_M by
    default) and its mmproj are downloaded; offline, the cached snapshot picks the same."""
    text, mmproj = tiny_models
    env = {**ENV, "HF_HOME": str(tmp_path / "hf")}
    files = {"tiny-Q4_K_M.gguf": text, "tiny-Q8_0.gguf": text, "mmproj-tiny-f16.gguf": mmproj}
    with FakeHub("flowmm/tiny-llava", files) as hub:
        env["HF_ENDPOINT"] = hub.url
        for spec, want in (("flowmm/tiny-llava", "tiny-Q4_K_M.gguf"), ("flowmm/tiny-llava:q8_0", "tiny-Q8_0.gguf")):
            child = spawn("-hf", spec, "-c", "256", "--budget", "64", "-n", "2", "--prompt", "hi", env=env)
            child.expect(pexpect.EOF)
            child.close()
            assert child.exitstatus == 0, child.before
            assert "+ mmproj-tiny-f16.gguf" in child.before  # the projector came with it
            # the picked file was fetched (a GET, or only a HEAD where its bytes were cached under another name)
            assert any(p == f"/flowmm/tiny-llava/resolve/main/{want}" for _, p in hub.requests)
            assert list((tmp_path / "hf").rglob(want))
        child = spawn("-hf", "flowmm/tiny-llava:Q2_K", "--prompt", "hi", env=env)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 1 and "no model GGUF matches 'Q2_K'" in child.before
        assert "tiny-Q4_K_M.gguf, tiny-Q8_0.gguf" in child.before and "Traceback" not in child.before
    env["HF_HUB_OFFLINE"] = "1"  # the server is gone: the cache answers
    child = spawn("-hf", "flowmm/tiny-llava:Q8_0", "-c", "256", "--budget", "64", "-n", "2", "--prompt", "hi", env=env)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def test_pick_gguf_rules():
    from flowmm_edge.cli import pick_gguf
    from flowmm_edge.errors import FlowMMError

    names = ["README.md", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "mmproj-m-f16.gguf"]
    assert pick_gguf(names, None) == ("m-Q4_K_M.gguf", "mmproj-m-f16.gguf")
    assert pick_gguf(names, "q8_0") == ("m-Q8_0.gguf", "mmproj-m-f16.gguf")
    assert pick_gguf(["only-F16.gguf"], None) == ("only-F16.gguf", None)  # one model: no tag needed
    for bad, quant, message in ((names, "Q2_K", "no model GGUF"), (["a-Q4_K_M.gguf", "b-Q4_K_M.gguf"], None, "more than one"),
                                (["mmproj.gguf"], None, "no model GGUF")):
        with pytest.raises(FlowMMError, match=message):
            pick_gguf(bad, quant)
