"""Synthetic LLaVA-style GGUF models for tests and benchmarks.

    python -m flowmm_edge.models.tiny [--out DIR] [--shape tiny|llava-1.5-7b]

Writes, from a fixed seed, a llama-architecture text model and a CLIP `mmproj` with the
LLaVA-1.5 MLP projector, in the tensor layout real LLaVA GGUFs use (the legacy
`convert_image_encoder_to_gguf.py` layout), so that llama.cpp and mtmd load the pair
through their real code paths. Weights are random: good for mechanics, memory and speed,
meaningless for answer quality.

`tiny` takes well under a second and a few MB. `llava-1.5-7b` has LLaVA-1.5-7B's layer
count and widths (32 layers, 4096 wide, 32 heads, CLIP ViT-L/14-336) with random Q4_0
blocks for the text weights: about 3.8 GB, for the memory benchmarks.

Importable: tests call `ensure_tiny_models()`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

import gguf

from .. import paths

SEED = 20251108
GENERATOR_VERSION = 1  # bump when the files' content changes

# llama.cpp's chatml template string, so chat code can rely on the model's own template
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = (
    "the of and to in is was that for on as with by he at from his an were are which this be or "
    "has had not but it they one all her she there their been who its new first would also more "
    "two after when most than some what time where image picture color red green blue cat dog "
    "answer question number secret key pass word code city name day year what which how many "
    "you your me my we our please tell describe see look here hello yes no ok thanks"
).split()


@dataclasses.dataclass(frozen=True)
class TextSpec:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    n_vocab: int  # at least the base vocabulary; padded with filler pieces
    weight_type: str  # "f16" or "q4_0"
    weight_std: float


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    name: str
    image_size: int
    patch_size: int
    n_embd: int
    n_head: int
    n_ff: int
    n_layer: int  # blocks kept in the file (LLaVA-1.5 drops CLIP's last one)
    projection_dim: int
    weight_std: float

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class ModelPair:
    text: TextSpec
    vision: VisionSpec


# head_dim 32: one Q4_0/Q8_0 block per (cell, KV head) slice, GQA 4 query heads : 2 KV heads
TINY = ModelPair(
    text=TextSpec("flowmm-tiny-llama", n_layer=4, n_embd=128, n_head=4, n_head_kv=2, n_ff=256,
                  n_ctx_train=8192, n_vocab=512, weight_type="f16", weight_std=0.08),
    vision=VisionSpec("flowmm-tiny-clip", image_size=32, patch_size=8, n_embd=64, n_head=4, n_ff=128,
                      n_layer=2, projection_dim=64, weight_std=0.05),
)

LLAVA_15_7B = ModelPair(
    text=TextSpec("flowmm-llava-1.5-7b-shaped", n_layer=32, n_embd=4096, n_head=32, n_head_kv=32, n_ff=11008,
                  n_ctx_train=4096, n_vocab=32000, weight_type="q4_0", weight_std=0.02),
    vision=VisionSpec("flowmm-clip-vit-l-14-336-shaped", image_size=336, patch_size=14, n_embd=1024, n_head=16,
                      n_ff=4096, n_layer=23, projection_dim=768, weight_std=0.02),
)

SHAPES = {"tiny": TINY, "llava-1.5-7b": LLAVA_15_7B}


# ---------------------------------------------------------------------------------------
# tokenizer


def spm_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary llama.cpp's SPM tokenizer accepts.

    Specials, chatml control tokens, the 256 byte-fallback tokens (so any text
    tokenizes), single characters, and words with all their prefixes (SPM merges
    pairs whose concatenation is in the vocabulary, so every prefix must exist).
    """
    T = gguf.TokenType
    tokens: list[str] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types: list[int] = [T.UNKNOWN, T.CONTROL, T.CONTROL, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    pieces: list[str] = []
    seen = set(tokens)

    def add(p: str) -> None:
        if p not in seen:
            seen.add(p)
            pieces.append(p)

    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()\n\u2581":
        add(c)
    for w in WORDS:
        word = "\u2581" + w
        for i in range(2, len(word) + 1):
            add(word[:i])
    i = 0
    while len(tokens) + len(pieces) < n_vocab:
        add(f"\u2581w{i}")
        i += 1
    pieces = pieces[: max(0, n_vocab - len(tokens))]
    if len(tokens) + len(pieces) < n_vocab:
        raise ValueError(f"n_vocab {n_vocab} is smaller than the base vocabulary")
    # longer pieces merge first
    scores = [0.0] * len(tokens) + [-float(1000 - min(len(p), 999)) - k * 1e-3 for k, p in enumerate(pieces)]
    tokens += pieces
    types += [T.NORMAL] * len(pieces)
    return tokens, scores, [int(t) for t in types]


# ---------------------------------------------------------------------------------------
# writers


def _random_q4_0(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """Random Q4_0 blocks, as bytes: per 32 values an f16 scale and 16 bytes of nibbles.

    Uniform nibbles are centered on 8, so each value is d * (q - 8) with std ~ 4.6 d.
    """
    assert cols % 32 == 0
    n_blocks = rows * cols // 32
    out = np.empty((n_blocks, 18), dtype=np.uint8)
    out[:, :2] = np.full(n_blocks, std / 4.6, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    out[:, 2:] = rng.integers(0, 256, size=(n_blocks, 16), dtype=np.uint8)
    return out.reshape(rows, cols // 32 * 18)


def _add_matrix(w: gguf.GGUFWriter, rng: np.random.Generator, name: str, rows: int, cols: int,
                std: float, wtype: str) -> None:
    """A [rows, cols] weight (numpy order: rows = output features)."""
    if wtype == "q4_0":
        data = _random_q4_0(rng, rows, cols, std)
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q4_0)  # shape from the byte shape
    else:
        w.add_tensor(name, (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float16))


def write_text_model(spec: TextSpec, path: Path, seed: int = SEED, chat_template: str | None = None) -> Path:
    """The text GGUF; chat_template None writes chatml, "" writes none (as LLaVA-1.5's GGUFs ship)."""
    rng = np.random.default_rng(seed)
    head_dim = spec.n_embd // spec.n_head
    n_embd_kv = head_dim * spec.n_head_kv
    tokens, scores, types = spm_vocab(spec.n_vocab)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(spec.name)
    w.add_description("flowmm-edge synthetic model: random weights, for mechanics, memory and speed tests")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if spec.weight_type == "q4_0" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(4)  # <|im_end|> ends a chatml turn
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template != "":
        w.add_chat_template(chat_template or CHATML_TEMPLATE)

    std, wt = spec.weight_std, spec.weight_type
    _add_matrix(w, rng, "token_embd.weight", len(tokens), spec.n_embd, 1.0 if wt == "f16" else std, wt)
    for il in range(spec.n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
        _add_matrix(w, rng, p + "attn_q.weight", spec.n_embd, spec.n_embd, std * 2, wt)
        _add_matrix(w, rng, p + "attn_k.weight", n_embd_kv, spec.n_embd, std * 2, wt)
        _add_matrix(w, rng, p + "attn_v.weight", n_embd_kv, spec.n_embd, std, wt)
        _add_matrix(w, rng, p + "attn_output.weight", spec.n_embd, spec.n_embd, std, wt)
        w.add_tensor(p + "ffn_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
        _add_matrix(w, rng, p + "ffn_gate.weight", spec.n_ff, spec.n_embd, std, wt)
        _add_matrix(w, rng, p + "ffn_up.weight", spec.n_ff, spec.n_embd, std, wt)
        _add_matrix(w, rng, p + "ffn_down.weight", spec.n_embd, spec.n_ff, std, wt)
    w.add_tensor("output_norm.weight", np.ones(spec.n_embd, dtype=np.float32))
    _add_matrix(w, rng, "output.weight", len(tokens), spec.n_embd, std * 4, wt)

    _write(w)
    return path


def write_mmproj(spec: VisionSpec, n_embd_text: int, path: Path, seed: int = SEED + 1) -> Path:
    """A CLIP vision tower + LLaVA-1.5 two-layer MLP projector (mm.0, GELU, mm.2)."""
    rng = np.random.default_rng(seed)
    D, F, std = spec.n_embd, spec.n_ff, spec.weight_std

    def f32(*shape, scale=std):
        return rng.standard_normal(shape, dtype=np.float32) * scale

    def f16(*shape, scale=std):
        return f32(*shape, scale=scale).astype(np.float16)

    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_name(spec.name)
    w.add_description("image encoder for LLaVA")
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", spec.image_size)
    w.add_uint32("clip.vision.patch_size", spec.patch_size)
    w.add_uint32("clip.vision.embedding_length", D)
    w.add_uint32("clip.vision.feed_forward_length", F)
    w.add_uint32("clip.vision.projection_dim", spec.projection_dim)
    w.add_uint32("clip.vision.attention.head_count", spec.n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_uint32("clip.vision.block_count", spec.n_layer)
    w.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    w.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    w.add_bool("clip.use_gelu", False)

    # projector first, as the LLaVA converter writes it
    w.add_tensor("mm.0.weight", f16(n_embd_text, D))
    w.add_tensor("mm.0.bias", f32(n_embd_text))
    w.add_tensor("mm.2.weight", f16(n_embd_text, n_embd_text))
    w.add_tensor("mm.2.bias", f32(n_embd_text))

    w.add_tensor("v.class_embd", f32(D))
    w.add_tensor("v.patch_embd.weight", f16(D, 3, spec.patch_size, spec.patch_size))
    w.add_tensor("v.position_embd.weight", f32(spec.n_patches + 1, D))
    w.add_tensor("v.pre_ln.weight", np.ones(D, dtype=np.float32))
    w.add_tensor("v.pre_ln.bias", np.zeros(D, dtype=np.float32))
    for il in range(spec.n_layer):
        p = f"v.blk.{il}."
        for t in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(p + t + ".weight", f16(D, D))
            w.add_tensor(p + t + ".bias", f32(D))
        w.add_tensor(p + "ln1.weight", np.ones(D, dtype=np.float32))
        w.add_tensor(p + "ln1.bias", np.zeros(D, dtype=np.float32))
        # legacy LLaVA naming: CLIP's fc1 is stored as ffn_down, fc2 as ffn_up
        w.add_tensor(p + "ffn_down.weight", f16(F, D))
        w.add_tensor(p + "ffn_down.bias", f32(F))
        w.add_tensor(p + "ffn_up.weight", f16(D, F))
        w.add_tensor(p + "ffn_up.bias", f32(D))
        w.add_tensor(p + "ln2.weight", np.ones(D, dtype=np.float32))
        w.add_tensor(p + "ln2.bias", np.zeros(D, dtype=np.float32))

    _write(w)
    return path


def _write(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------------------------------
# cached pairs


def _pair_key(pair: ModelPair, seed: int) -> str:
    blob = json.dumps([dataclasses.asdict(pair.text), dataclasses.asdict(pair.vision), seed,
                       GENERATOR_VERSION, gguf.__name__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_models(pair: ModelPair, out_dir: Path | None = None, seed: int = SEED) -> tuple[Path, Path]:
    """(text GGUF, mmproj GGUF) for `pair`, generated once into the cache folder."""
    if out_dir is None:
        out_dir = _models_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    key = _pair_key(pair, seed)
    text = out_dir / f"{pair.text.name}-{key}.gguf"
    mmproj = out_dir / f"mmproj-{pair.vision.name}-{key}.gguf"
    for path, write in ((text, lambda p: write_text_model(pair.text, p, seed)),
                        (mmproj, lambda p: write_mmproj(pair.vision, pair.text.n_embd, p, seed + 1))):
        if not path.is_file():
            tmp = path.with_name(path.name + ".part")
            write(tmp)
            tmp.replace(path)
    return text, mmproj


def ensure_tiny_models(out_dir: Path | None = None) -> tuple[Path, Path]:
    return ensure_models(TINY, out_dir)


def _models_dir() -> Path:
    return paths.models_dir() / "synthetic"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--out", type=Path, default=None, help="folder (default: the flowmm-edge cache)")
    ap.add_argument("--seed", type=int, default=SEED)
    a = ap.parse_args(argv)
    text, mmproj = ensure_models(SHAPES[a.shape], a.out, a.seed)
    print(text)
    print(mmproj)
    return 0


if __name__ == "__main__":
    sys.exit(main())
