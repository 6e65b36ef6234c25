"""Calibration: run sample prompts, measure each layer's cross-modal flow rho^l from the native
attention statistics (every query row, all heads), and write the model's merging policy.

rho^l = mean over query heads of (mass text->other + other->text) / (all mass), with the flow
matrices summed over all calibration prompts before the ratio (docs/METHOD.md, 'Cross-modal
flow (rho)').

Prompts: a JSONL file, one {"segments": [...]} per line (prompt.parse_segments), or the
built-in set. For a model with an mmproj the built-in prompts carry generated images; for a
text-only model their "image" spans are text labelled as the image modality.

With `distill_docs`, calibration also distils the repeat pass into an importance predictor
(distillation.py) on a corpus of its own, and the policy's FlowMM scores by it
(importance="predicted").
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..bindings import images, runtime
from ..bindings.native import llama_cpp
from ..bindings.attention_stats import AttentionStats
from . import distillation
from ..compression import reconstruction
from ..compression.compressor import rho_from_flow
from ..methods.importance_predictor import rope_pairing
from ..methods.flowmm import PREDICTED, REPEATED, FlowMM
from .policy import Policy, fingerprint
from ..bindings.prompt import ModalityLabels, PromptError, Segment, feed, jsonl_lines, parse_segments, prepare

THETA = 0.25  # docs/METHOD.md, 'Merging strategy per layer': 0.2-0.3 worked best in the paper
# the policy records FlowMM's own defaults (one home: its signature), except what it calibrates or ablates
METHOD_DEFAULTS = {k: p.default for k, p in inspect.signature(FlowMM).parameters.items()
                   if k not in ("theta", "flow_guidance", "sensitivity", "predictor")}
DISTILL_TOKENS = 2048  # tokens per distillation document
DISTILL_HELD_BACK = 2  # documents kept out of the fit to report its rank correlation (one natural, one planted)

_OBJECTS = ["red car", "blue door", "green tree", "yellow sign", "white cat", "black dog", "grey bridge", "orange kite"]
_PLACES = ["on the left", "in the middle", "on the right", "at the top", "at the bottom", "in the background"]
_QUESTIONS = ["What colour is the car?", "Where is the cat?", "How many trees are there?", "Describe the scene.",
              "What is at the top of the picture?", "Is there a dog, and where is it?"]


def builtin_prompts(with_images: bool, n: int = 6) -> list[list[Segment]]:
    rng = np.random.default_rng(1234)
    prompts = []
    for k in range(n):
        scene = " ".join(f"A {rng.choice(_OBJECTS)} is {rng.choice(_PLACES)}." for _ in range(12))
        intro = Segment("text", text="Look at this picture and answer the question.\n")
        if with_images:
            body = [Segment("image", image=images.pattern(k))]
        else:
            body = [Segment("text", text=scene + "\n", modality="image")]
        prompts.append([intro, *body, Segment("text", text=f"Question: {_QUESTIONS[k % len(_QUESTIONS)]}\nAnswer:")])
    return prompts


def load_prompts(path: str | Path) -> list[list[Segment]]:
    """JSONL, one prompt a line; a malformed line is an error naming its line number."""
    p = Path(path)
    out = []
    for where, obj in jsonl_lines(p, "prompts"):
        if isinstance(obj, ValueError):
            raise PromptError(f"{where}: not valid JSON ({getattr(obj, 'msg', obj)})")
        if not isinstance(obj, dict):
            raise PromptError(f"{where}: a prompt must be a JSON object with 'segments'")
        out.append(parse_segments(obj.get("segments"), where, base_dir=p.parent))
    if not out:
        raise PromptError(f"{p}: no prompts in the file")
    return out


def layer_flows(model: runtime.Model, prompts: list[list[Segment]], projector=None, n_threads: int | None = None,
                flash_attn="auto", progress: bool = True) -> list[list[np.ndarray]]:
    """Per prompt, per layer: the [n_head, n_labels, n_labels] attention flow over every row."""
    labels = ModalityLabels()
    prepared = [prepare(model, segs, labels, projector, add_bos=True) for segs in prompts]
    try:
        n_ctx = max(p.n_pos for p in prepared) + 16
        n_labels = len(labels.names)
        flows = []
        with runtime.Context(model, n_ctx=n_ctx, n_batch=512, n_threads=n_threads, flash_attn=flash_attn) as ctx:
            for p in tqdm(prepared, desc="calibrating", unit="prompt", disable=not progress):
                ctx.clear()
                with AttentionStats(ctx, labels=p.labels, n_labels=n_labels) as stats:
                    feed(ctx, p, 0)
                flows.append([stats.flow(l) for l in range(stats.n_layer)])
        return flows
    finally:
        for p in prepared:
            p.close()


def distill(model: runtime.Model, n_docs: int, doc_tokens: int = DISTILL_TOKENS, n_threads: int | None = None,
            progress: bool = True, projector=None):
    """(the predictor, what the policy records about it): n_docs documents of the distillation
    corpus, each prefilled and repeated (the teacher), the last DISTILL_HELD_BACK kept out of the
    fit to measure its rank correlation, then all of them fitted. With a `projector`, every third
    document holds images too (distillation.documents)."""
    if n_docs <= DISTILL_HELD_BACK:
        raise reconstruction.ReconstructionError(f"distillation needs more than {DISTILL_HELD_BACK} documents")
    texts = distillation.natural_texts()
    docs = distillation.documents(model, n_docs, doc_tokens, texts=texts, projector=projector)
    bar = tqdm(total=n_docs, desc="distilling", unit="doc", disable=not progress)
    samples = distillation.collect_documents(model, docs, doc_tokens, n_threads,
                                             progress=lambda done, total: bar.update(1), projector=projector)
    bar.close()
    pairing = rope_pairing(llama_cpp.llama_model_rope_type(model.ptr))
    predictor, info = distillation.fit(samples, pairing, held_back=DISTILL_HELD_BACK)
    record = {"teacher": "reconstruction_scores (repeat pass), log(mass + 1e-4)",
              "corpus": "dist-info METADATA and LICENSE texts of the installed Python packages, every second "
                        "document with planted records" + (", every third with images" if projector else "")
                        + " (calibration/distillation.py)",
              "n_documents_with_images": sum(1 for d in docs if d.images),
              "n_sources": len(texts), "n_documents": n_docs, "tokens_per_document": doc_tokens,
              "n_tokens": samples.n_tokens, "held_back_documents": DISTILL_HELD_BACK, **info}
    return dataclasses.replace(predictor, info=record), record


def calibrate(model_path: str | Path, prompts: list[list[Segment]] | None = None, prompts_name: str = "builtin",
              projector=None, theta: float = THETA, n_threads: int | None = None, progress: bool = True,
              flash_attn="auto", distill_docs: int = 0, distill_tokens: int = DISTILL_TOKENS, n_gpu_layers: int = 0,
              tensor_split: list[float] | None = None) -> Policy:
    """`n_gpu_layers`, `tensor_split`: where the layers and their cache live (runtime.Model)."""
    predictor = None
    with runtime.Model(model_path, n_gpu_layers=n_gpu_layers, tensor_split=tensor_split) as model:
        if prompts is None:
            prompts = builtin_prompts(with_images=projector is not None)
        proj = projector(model) if callable(projector) else None
        try:
            flows = layer_flows(model, prompts, proj, n_threads, flash_attn, progress)
            if distill_docs:
                predictor, _ = distill(model, distill_docs, distill_tokens, n_threads, progress, proj)
        finally:
            if proj is not None:
                proj.close()
    n_layer = len(flows[0])
    rho = [rho_from_flow([f[l] for f in flows]) for l in range(n_layer)]
    method = dict(METHOD_DEFAULTS, **(PREDICTED if predictor is not None else REPEATED))
    return Policy(model=fingerprint(model_path), theta=theta, rho=rho, method=method,
                  calibration={"prompts": prompts_name, "n_prompts": len(prompts), "with_images": projector is not None,
                               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                  predictor=predictor)
