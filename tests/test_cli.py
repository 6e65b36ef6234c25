"""The command line: subcommands, `info`, and one-line errors for bad model files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowmm_edge.models import gguf_file
from flowmm_edge.errors import ModelFileError


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowmm_edge", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)


def test_help_lists_the_subcommands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for sub in ("chat", "calibrate", "bench", "eval", "info"):
        assert f"    {sub}" in proc.stdout


def test_info_describes_the_library_and_a_model(tiny_models):
    text, mmproj = tiny_models
    proc = run_cli("info", "--model", str(text), "--mmproj", str(mmproj))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    from flowmm_edge.bindings import native
    assert native.flowmm_version() in out and native.lib_path in out
    assert "architecture       llama" in out
    assert "heads / KV heads   4 / 2" in out
    # KV bytes per token, f16: 2 (K and V) * 4 layers * 2 KV heads * 32 dims * 2 bytes = 1024
    assert "f16 1.00 KiB" in out
    assert "projector          mlp, image 32px, patch 8px, output width 128" in out
    # the CPU variant ggml loaded (from its own log), and where llama.cpp put the weights (its own report)
    variant = re.search(r"CPU variant\s+(\S+)\s+\((.+)\)", out)
    assert variant and Path(variant.group(2)).is_file() and f"ggml-cpu-{variant.group(1)}." in variant.group(2)
    buffers = re.search(r"weight buffers\s+(.+)", out).group(1)
    assert re.fullmatch(r"(\S+ [0-9.]+ MiB)(, \S+ [0-9.]+ MiB)*", buffers) and "AMX" not in buffers


def _truncated(src, dst, n):
    dst.write_bytes(src.read_bytes()[:n])
    return dst


@pytest.mark.parametrize("kind", ["missing", "not-gguf", "truncated-header", "truncated-data", "directory"])
def test_bad_model_file_gives_one_line_naming_the_file(tiny_models, tmp_path, kind):
    text, _ = tiny_models
    bad = {
        "missing": lambda: tmp_path / "nope.gguf",
        "not-gguf": lambda: (tmp_path / "notes.gguf").write_text("hello world") and tmp_path / "notes.gguf",
        "truncated-header": lambda: _truncated(text, tmp_path / "t1.gguf", 1000),
        "truncated-data": lambda: _truncated(text, tmp_path / "t2.gguf", text.stat().st_size - 4096),
        "directory": lambda: tmp_path,
    }[kind]()
    with pytest.raises(ModelFileError) as e:
        gguf_file.read_text_model(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    proc = run_cli("info", "--model", str(bad))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_mmproj_given_as_model_and_model_as_mmproj(tiny_models):
    text, mmproj = tiny_models
    with pytest.raises(ModelFileError, match="vision projector"):
        gguf_file.read_text_model(mmproj)
    with pytest.raises(ModelFileError, match="not a vision projector"):
        gguf_file.read_projector(text)


def test_chat_with_no_arguments_runs_the_default_model():
    proc = subprocess.run([sys.executable, "-m", "flowmm_edge", "chat", "--max-tokens", "8"], input="What is 2+2?\n/quit\n",
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Qwen2.5 Coder 0.5B Instruct" in proc.stderr and "flowmm (importance: predicted), budget 1024 cells of 4096" in proc.stderr
    assert "4" in proc.stdout


def test_llama_cpp_flag_names_reach_the_same_settings():
    """llama.cpp's short names and this project's older long names set the same attributes."""
    from flowmm_edge.cli import build_parser

    p = build_parser()
    short = p.parse_args(["chat", "-m", "a.gguf", "-c", "512", "-n", "9", "-ngl", "3", "-t", "2", "-ctk", "q8_0",
                          "-sys", "hi", "-s", "5", "--top-k", "7", "--top-p", "0.5", "--min-p", "0.1",
                          "--repeat-penalty", "1.1"])
    long = p.parse_args(["chat", "--model", "a.gguf", "--ctx", "512", "--max-tokens", "9", "--gpu-layers", "3",
                         "--threads", "2", "--kv-type", "q8_0", "--system-prompt", "hi", "--seed", "5", "--top-k", "7",
                         "--top-p", "0.5", "--min-p", "0.1", "--repeat-penalty", "1.1"])
    keys = ("model", "ctx", "max_tokens", "gpu_layers", "threads", "kv_type", "system_prompt", "seed", "top_k", "top_p",
            "min_p", "repeat_penalty")
    assert [getattr(short, k) for k in keys] == [getattr(long, k) for k in keys]
    assert (short.model, short.ctx, short.max_tokens, short.kv_type, short.seed) == ("a.gguf", 512, 9, "q8_0", 5)
    for cmd in (["eval"], ["bench"], ["calibrate", "--out", "p.json"]):
        a = p.parse_args(cmd + ["-m", "a.gguf", "-t", "2"])
        assert (a.model, a.threads) == ("a.gguf", 2)
    assert p.parse_args(["eval", "-ctk", "q4_0"]).kv_type == "q4_0"
    for cmd in (["chat"], ["eval"], ["bench"], ["calibrate", "--out", "p.json"]):
        assert p.parse_args(cmd).flash_attn == "auto"
        assert p.parse_args(cmd + ["-fa", "off"]).flash_attn == p.parse_args(cmd + ["--flash-attn", "off"]).flash_attn == "off"


def test_the_help_lists_every_registered_method():
    """--method's help is made from the registry: every method in methods.METHODS and every flowmm
    variant is named (a hand-written list fell behind once)."""
    from flowmm_edge.methods import METHODS, registry

    for command in ("chat", "serve", "eval", "bench"):
        out = subprocess.run([sys.executable, "-m", "flowmm_edge", command, "--help"], capture_output=True,
                             text=True, timeout=120, env={**os.environ, "COLUMNS": "1000"}).stdout
        for name in list(METHODS) + [f"flowmm:{v}" for v in registry.VARIANTS]:
            assert name in out, (command, name)


def test_a_methods_fields_are_settings_of_its_name():
    """`name:field=value` sets the method dataclass's field, read as its default's type; what the
    method refuses, and fields it lacks, are refused by name."""
    import dataclasses

    from flowmm_edge.methods import METHODS, MethodError, registry

    got = registry.resolve("flowmm:repeat+pool=15+window=8+sensitivity=false+tau_quantile=0.5")[0]
    # without a policy FlowMM starts from the product's settings for the repeat pass (REPEATED)
    assert got == dataclasses.replace(METHODS["flowmm"](value_norm=True), importance="reconstruction", pool=15,
                                      window=8, sensitivity=False, tau_quantile=0.5)
    assert not registry.resolve("flowmm:value_norm=false")[0].value_norm  # a setting named wins
    assert registry.resolve("snapkv:window=16")[0] == METHODS["snapkv"](window=16)
    for name, message in (("flowmm:pool=4", "odd kernel"), ("flowmm:pool=x", "not an int"),
                          ("snapkv:pool=3", "no setting 'pool'"), ("flowmm:flow_guidance=2", "true or false"),
                          ("snapkv:repeat", "unknown method")):
        with pytest.raises(MethodError, match=message):
            registry.resolve(name)
