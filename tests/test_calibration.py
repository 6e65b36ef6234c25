"""Calibration and policy files.

rho^l from `calibrate` is checked against numpy: softmax(QK^T/sqrt(d) + causal mask) from Q and
K captured with cb_eval in a separate run (not through the statistics code), flow matrices
summed over the prompts, then mean over heads of cross-modal mass / all mass.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from flowmm_edge.models import tiny as tm
from conftest import write_png
from flowmm_edge.calibration import calibration_pass
from flowmm_edge.calibration import policy
from flowmm_edge import cli
from flowmm_edge.bindings import prompt, runtime
from flowmm_edge.bindings.multimodal import Projector
from tensor_capture import Capture

SPEC = tm.TINY.text
L, NQ, H = SPEC.n_layer, SPEC.n_head, SPEC.n_head_kv
HD = SPEC.n_embd // SPEC.n_head


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory, tiny_models):
    d = tmp_path_factory.mktemp("calib")
    write_png(d / "pic.png", 40, 24)
    lines = [
        {"segments": [{"type": "text", "text": "describe this picture please"}, {"type": "image", "path": "pic.png"},
                      {"type": "text", "text": "what colour is the sky in it"}]},
        {"segments": [{"type": "text", "text": "the scene:"},
                      {"type": "text", "text": "a red car near a blue door and a green tree", "modality": "image"},
                      {"type": "text", "text": "where is the car"}]},
    ]
    f = d / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return f


def _flow_reference(model, proj, segments):
    """[L][NQ, 2, 2] flow from captured Q and K (post-RoPE), in float64."""
    cap = Capture([f"{n}-{l}" for l in range(L) for n in ("Qcur", "Kcur")])
    p = prompt.prepare(model, segments, prompt.ModalityLabels(), proj, add_bos=True)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2, cb_eval=cap.callback) as ctx:
        prompt.feed(ctx, p, 0)
    labels, n = p.labels, p.n_pos
    p.close()
    out = []
    for l in range(L):
        # three nodes per ubatch carry each name (projection, reshape, RoPE): the RoPE'd one is last
        q = np.concatenate([x.reshape(-1, NQ, HD) for x in cap.calls[f"Qcur-{l}"][2::3]]).astype(np.float16).astype(np.float64)
        k = np.concatenate([x.reshape(-1, H, HD) for x in cap.calls[f"Kcur-{l}"][2::3]]).astype(np.float16).astype(np.float64)
        assert len(q) == len(k) == n
        flow = np.zeros((NQ, 2, 2))
        for qh in range(NQ):
            logits = q[:, qh] @ k[:, qh // (NQ // H)].T / math.sqrt(HD)
            logits[np.triu_indices(n, 1)] = -np.inf
            pr = np.exp(logits - logits.max(axis=1, keepdims=True))
            pr /= pr.sum(axis=1, keepdims=True)
            for a in (0, 1):
                for b in (0, 1):
                    flow[qh, a, b] = pr[labels == a][:, labels == b].sum()
        out.append(flow)
    return out


def test_rho_equals_numpy_from_captured_attention(tiny_models, prompts_file):
    text, mmproj = tiny_models
    prompts = calibration_pass.load_prompts(prompts_file)
    pol = calibration_pass.calibrate(text, prompts, projector=lambda m: Projector(mmproj, m), progress=False)
    with runtime.Model(text) as model, Projector(mmproj, model) as proj:
        refs = [_flow_reference(model, proj, segs) for segs in prompts]
    for l in range(L):
        f = sum(r[l] for r in refs)
        want = np.mean((f[:, 0, 1] + f[:, 1, 0]) / f.sum(axis=(1, 2)))
        assert pol.rho[l] == pytest.approx(want, rel=1e-4), l
        # the per-prompt average would differ: the flows are summed before the ratio
    assert pol.modes == ["cross" if r >= 0.25 else "intra" for r in pol.rho]
    assert pol.model["n_layer"] == L and pol.calibration["n_prompts"] == 2


def test_cli_calibrate_writes_a_policy_that_loads(tiny_models, prompts_file, tmp_path, capsys):
    text, mmproj = tiny_models
    out = tmp_path / "policy.json"
    assert cli.main(["calibrate", "--model", str(text), "--mmproj", str(mmproj), "--prompts", str(prompts_file),
                     "--out", str(out), "--quiet"]) == 0
    pol = policy.load(out)
    pol.check_model(text)
    data = json.loads(out.read_text())
    assert data["schema"] == "flowmm-edge/policy" and len(data["rho"]) == L and len(data["modes"]) == L
    assert "layer   3" in capsys.readouterr().out
    m = pol.flowmm()
    assert (m.theta, m.window, m.tau_quantile) == (0.25, 32, 0.9)


def _write(path, **changes):
    data = {"schema": "flowmm-edge/policy", "schema_version": 1,
            "model": {"name": "x", "architecture": "llama", "n_layer": 2, "n_head": 4, "n_head_kv": 2,
                      "gguf_header_sha256": "0" * 64},
            "theta": 0.25, "rho": [0.1, 0.5], "method": {"window": 8}, "calibration": {}}
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    path.write_text(json.dumps(data) if not isinstance(changes.get("raw"), str) else changes["raw"])
    return path


@pytest.mark.parametrize("changes,message", [
    (dict(schema="other"), "not a flowmm-edge policy"),
    (dict(schema_version=3), "schema version 3"),
    (dict(rho=[0.1, float("nan")]), "finite numbers"),
    (dict(rho=[0.1, 0.2, 0.3]), "3 values for a model of 2 layers"),
    (dict(rho=[]), "0 values for a model of 2 layers"),
    (dict(rho=[0.1, 1.5]), "in \\[0, 1\\]"),
    (dict(theta=2.0), "theta 2.0"),
    (dict(modes=["cross", "cross"]), "disagree"),
    (dict(method={"tau_quantile": 3}), "bad method parameters"),
    (dict(method={"colour": 3}), "bad method parameters"),
    (dict(model=None), "'model' is missing"),
])
def test_malformed_policies_are_refused(tmp_path, changes, message):
    with pytest.raises(policy.PolicyError, match=message):
        policy.load(_write(tmp_path / "p.json", **changes))


def test_unreadable_policy_files(tmp_path):
    with pytest.raises(policy.PolicyError, match="cannot read"):
        policy.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(policy.PolicyError, match="not valid JSON"):
        policy.load(tmp_path / "bad.json")


def test_policy_for_another_model_is_refused(tiny_models, tmp_path):
    text, _ = tiny_models
    pol = calibration_pass.calibrate(text, progress=False)
    # the same weights under another header (one byte of the description changed) is another model
    other = tmp_path / "other.gguf"
    shutil.copy(text, other)
    raw = bytearray(other.read_bytes())
    i = raw.index(b"synthetic model")
    raw[i] = ord("S")
    other.write_bytes(bytes(raw))
    pol.check_model(text)
    with pytest.raises(policy.PolicyError, match="calibrated for 'flowmm-tiny-llama'.*gguf_header_sha256 differ"):
        pol.check_model(other)


def test_bad_prompt_files_name_the_line(tmp_path, tiny_models):
    f = tmp_path / "p.jsonl"
    f.write_text('{"segments": [{"type": "text", "text": "ok"}]}\n{"segments": [{"type": "video"}]}\n')
    with pytest.raises(prompt.PromptError, match=r"p.jsonl:2: segment 0 has unknown type 'video'"):
        calibration_pass.load_prompts(f)
    f.write_text('{"segments": [{"type": "text", "text": "ok"}]}\n{oops\n')
    with pytest.raises(prompt.PromptError, match=r"p.jsonl:2: not valid JSON"):
        calibration_pass.load_prompts(f)
    text, _ = tiny_models
    assert cli.main(["calibrate", "--model", str(text), "--prompts", str(f), "--out", str(tmp_path / "o.json")]) == 1
    assert not (tmp_path / "o.json").exists()


def test_a_policy_without_rho_round_trips_and_leaves_rho_to_each_prompt(tiny_models, tmp_path):
    """Self-distillation writes rho null when its conversations had one modality: the file loads,
    says so, and the method it configures estimates rho from each prompt (registry gives none)."""
    from flowmm_edge.methods import registry
    from flowmm_edge.calibration import policy as policy_mod

    pol = policy_mod.Policy(model=policy_mod.fingerprint(tiny_models[0]), theta=0.25, rho=None,
                            method={"importance": "reconstruction"}, calibration={"source": "test"})
    pol.save(tmp_path / "p.json")
    import json

    data = json.loads((tmp_path / "p.json").read_text())
    assert data["rho"] is None and data["modes"] is None
    back = policy_mod.load(tmp_path / "p.json")
    assert back.rho is None and registry.resolve("flowmm", back)[1] is None


def test_a_policy_with_too_few_layers_loads_and_is_refused_where_it_meets_the_cache(tiny_models, tmp_path):
    """A policy's per-layer values count the layers that are merged (with sliding-window
    attention, fewer than the model's), so the file check admits fewer; the merge that meets the
    cache refuses them, naming both counts, and leaves the cache as it was."""
    import numpy as np

    from flowmm_edge.bindings import kv_cache, runtime
    from flowmm_edge.compression.compressor import Compressor
    from flowmm_edge.methods.base import MethodError
    from flowmm_edge.methods.flowmm import FlowMM

    pol = policy.load(_write(tmp_path / "p.json", rho=[0.1]))
    assert pol.rho == [0.1]
    with runtime.Model(tiny_models[0]) as m, runtime.Context(m, n_ctx=256, n_threads=2) as ctx:
        tokens = m.tokenize("the cat sat on the mat and the dog sat on the log " * 3)
        n_layer = kv_cache.layout(ctx).n_layer
        comp = Compressor(FlowMM(sinks=2, window=4), 0.5, rho=pol.rho)
        labels = np.zeros(len(tokens), np.int32)
        with comp.observe(ctx, prompt_end=len(tokens), labels=labels):
            ctx.decode(tokens, 0)
        before = ctx.state()
        with pytest.raises(MethodError, match=f"rho for 1 layers, the cache merges {n_layer}"):
            comp.compress(ctx, labels, tokens=np.asarray(tokens, np.int32))
        assert ctx.state() == before
