"""Glyph pages: a CLIP `mmproj` that reads, by construction, the text our own renderer draws.

    python -m flowmm_edge glyph --text-model M.gguf --out mmproj-glyph.gguf
    python -m flowmm_edge glyph --render "Repeat after me: 12345" --png page.png

`write_mmproj` builds, deterministically (numpy and gguf only, no training, no download), a
LLaVA-layout mmproj (projector_type "mlp": patch embedding, position embeddings, pre-layernorm,
transformer blocks, mm.0 -> GELU -> mm.2) for a given text model. `render` draws a text as a
page: one image patch per token, each patch a 4x4 grid of black/white blocks carrying the bits
of the token's code. Through llama.cpp's real mtmd image path, a rendered page reaches the text
model as exactly the token embeddings of that text (bit for bit on the CPU backend): an
image-shaped way to put text into a multimodal model's context.

The construction, the clip.cpp facts it rests on and the measured figures are in docs/GLYPH.md.

Vocabulary (`Codebook`): 2**bits codes. Code 0 is the filler token (the page's padding; an
all-white patch); codes 1.. are the first other token ids of the text model that are normal or
byte tokens, in id order. For a GPT-2-style BPE vocabulary (Qwen2's) those are the 256 byte
tokens and the earliest merges, so every text has a tokenization inside the vocabulary: a token
of the model's own tokenization that falls outside it is split by BPE restricted to the merges
whose pieces are inside (`Codebook.tokenize`). Other vocabularies refuse such tokens, naming them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np

import gguf

from .. import paths
from ..errors import FlowMMError

VERSION = 1          # bump when the files' content changes (it is part of the cache key)
BITS = 12            # bits per code: 4096 codes
GRID = 16            # patches per side: 256 tokens a page
PATCH = 16           # pixels per patch side
BLOCK = 4            # pixels per bit block side: a patch holds (PATCH // BLOCK)**2 = 16 bit slots
VISION_EMBD = 64     # width of the vision tower's residual stream
VISION_FF = 128
VISION_BLOCKS = 2    # clip_graph_llava runs block_count - 1 of them (the feature layer is the second to last)
LN_EPS = 1e-6
ALPHA = 8.0          # mm.0 weight per bit dimension
LEVEL = 16.0         # mm.0 output of the matching unit: >= 10, where ggml's GELU is the identity
FILLER = "\n"        # the padding token's text (read back better than " ": docs/GLYPH.md)

KEY = "glyph."


class GlyphError(FlowMMError):
    """A text, page or file the glyph code cannot take."""


# ---------------------------------------------------------------------------------------
# GPT-2 byte-level alphabet: the token strings of a "gpt2" GGUF vocabulary spell bytes this way


def _byte_chars() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


BYTE_CHARS = _byte_chars()


def _spell(piece: bytes, tokenizer_model: str) -> str:
    """A token's text as the GGUF vocabulary writes it."""
    if tokenizer_model == "gpt2":
        return "".join(BYTE_CHARS[b] for b in piece)
    return piece.decode("utf-8", "replace").replace(" ", "\u2581")


# ---------------------------------------------------------------------------------------
# the code book


@dataclasses.dataclass
class Codebook:
    """Geometry and vocabulary of a glyph mmproj (its glyph.* keys)."""

    bits: int
    grid: int
    patch: int
    block: int
    token_ids: list[int]          # code -> token id
    tokens: list[str]             # code -> the token's text as the GGUF vocabulary spells it
    merges: list[str]             # BPE merges among the vocabulary's tokens, in rank order ("a b")
    tokenizer_model: str
    text_model_sha256: str = ""

    def __post_init__(self):
        self.code_of = {t: c for c, t in enumerate(self.token_ids)}
        self._by_text = {s: t for s, t in zip(self.tokens, self.token_ids)}
        self._rank = {tuple(m.split(" ", 1)): r for r, m in enumerate(self.merges)}

    @property
    def filler(self) -> int:
        return self.token_ids[0]

    @property
    def n_codes(self) -> int:
        return len(self.token_ids)

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    @property
    def image_size(self) -> int:
        return self.grid * self.patch

    @classmethod
    def load(cls, mmproj: str | Path) -> "Codebook":
        try:
            r = gguf.GGUFReader(str(mmproj))
        except (OSError, ValueError) as e:
            raise GlyphError(f"{mmproj}: not a readable GGUF ({e})") from None

        def get(name):
            f = r.fields.get(KEY + name)
            if f is None:
                raise GlyphError(f"{mmproj}: not a glyph mmproj (no {KEY}{name})")
            return f.contents()

        if get("version") != VERSION:
            raise GlyphError(f"{mmproj}: glyph version {get('version')}, this code reads {VERSION}")
        return cls(bits=get("bits"), grid=get("grid"), patch=get("patch"), block=get("block"),
                   token_ids=[int(t) for t in get("token_ids")], tokens=list(get("tokens")),
                   merges=[m for m in get("merges") if m], tokenizer_model=get("tokenizer_model"),
                   text_model_sha256=get("text_model_sha256"))

    # ---- text -> tokens inside the vocabulary

    def split(self, token: int, piece: bytes) -> list[int]:
        """Token ids inside the vocabulary that spell `piece` (the text of `token`): BPE restricted
        to the merges among vocabulary tokens, from single bytes up."""
        if token in self.code_of:
            return [token]
        if self.tokenizer_model != "gpt2" or not piece:
            raise GlyphError(f"token {token} ({piece!r}) is outside the glyph vocabulary")
        parts = list(_spell(piece, "gpt2"))
        while len(parts) > 1:
            ranks = [self._rank.get((a, b), 1 << 30) for a, b in zip(parts, parts[1:])]
            i = int(np.argmin(ranks))
            if ranks[i] == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        missing = [p for p in parts if p not in self._by_text]
        if missing:
            raise GlyphError(f"token {token} ({piece!r}) cannot be spelled in the glyph vocabulary")
        return [self._by_text[p] for p in parts]

    def tokenize(self, text: str, model) -> list[int]:
        """`text` in vocabulary tokens: the model's own tokenization (a `bindings.runtime.Model`,
        no BOS, special-token text taken literally), its out-of-vocabulary tokens split."""
        out: list[int] = []
        for t in model.tokenize(text, add_special=False, parse_special=False):
            out.extend(self.split(t, model.token_to_piece(t, special=True)))
        return out

    def check(self, tokens: list[int]) -> list[int]:
        tokens = [int(t) for t in tokens]
        bad = sorted({t for t in tokens if t not in self.code_of})
        if bad:
            raise GlyphError(f"token ids outside the glyph vocabulary: {bad[:20]}" + (" ..." if len(bad) > 20 else ""))
        return tokens

    # ---- tokens <-> pixels

    def pages(self, tokens: list[int]) -> list[list[int]]:
        """The tokens cut into pages of at most n_patches each (the last one is padded when rendered)."""
        tokens = self.check(tokens)
        n = self.n_patches
        return [tokens[i:i + n] for i in range(0, len(tokens), n)] or [[]]

    def pixels(self, tokens: list[int]) -> np.ndarray:
        """The page as a uint8 array [H, W, 3]: white paper, a black block for each set bit."""
        tokens = self.check(tokens)
        if len(tokens) > self.n_patches:
            raise GlyphError(f"{len(tokens)} tokens do not fit one page of {self.n_patches}: use pages()")
        codes = np.zeros(self.n_patches, np.int64)  # code 0: the filler, an all-white patch
        codes[:len(tokens)] = [self.code_of[t] for t in tokens]
        bits = (codes[:, None] >> np.arange(self.bits)) & 1                      # [patch, bit]
        slots = np.zeros((self.n_patches, (self.patch // self.block) ** 2), np.uint8)
        slots[:, :self.bits] = bits
        s = self.patch // self.block
        g = self.grid
        ink = slots.reshape(g, g, s, s)                                         # [py, px, by, bx]
        ink = np.repeat(np.repeat(ink, self.block, axis=2), self.block, axis=3)  # [py, px, y, x]
        ink = ink.transpose(0, 2, 1, 3).reshape(self.image_size, self.image_size)
        img = np.where(ink[..., None] == 1, 0, 255).astype(np.uint8)
        return np.repeat(img, 3, axis=2)

    def render(self, tokens: list[int]) -> bytes:
        """One page as PNG bytes (RGB, image_size square)."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.pixels(tokens), "RGB").save(buf, format="PNG")
        return buf.getvalue()

    def read(self, image: bytes | str | Path | np.ndarray) -> list[int]:
        """The n_patches token ids a page encodes (a PNG, a path or an [H, W, 3] array), in
        patch order: each bit block's mean brightness below half is a 1. Trailing fillers are the
        padding."""
        if isinstance(image, np.ndarray):
            a = image
        else:
            from PIL import Image

            src = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
            with Image.open(src) as im:
                a = np.asarray(im.convert("RGB"))
        if a.shape[:2] != (self.image_size, self.image_size):
            raise GlyphError(f"a page is {self.image_size}x{self.image_size} pixels, not {a.shape[1]}x{a.shape[0]}")
        s, g, b = self.patch // self.block, self.grid, self.block
        mean = a.astype(np.float64).mean(axis=2).reshape(g, s, b, g, s, b).mean(axis=(2, 5))  # [py, by, px, bx]
        slots = (mean < 127.5).transpose(0, 2, 1, 3).reshape(self.n_patches, s * s)[:, :self.bits]
        codes = (slots.astype(np.int64) << np.arange(self.bits)).sum(axis=1)
        return [self.token_ids[c] for c in codes]


def render(tokens_or_text, mmproj: str | Path, model=None) -> bytes:
    """One page (PNG bytes) of token ids, or of a text tokenized with `model` (a
    `bindings.runtime.Model`); more than one page's worth is an error (see `pages`)."""
    book = Codebook.load(mmproj)
    tokens = book.tokenize(tokens_or_text, _model(model)) if isinstance(tokens_or_text, str) else tokens_or_text
    return book.render(tokens)


def pages(tokens_or_text, mmproj: str | Path, model=None) -> list[list[int]]:
    """The vocabulary tokens of each page (render each with `Codebook.render`)."""
    book = Codebook.load(mmproj)
    tokens = book.tokenize(tokens_or_text, _model(model)) if isinstance(tokens_or_text, str) else tokens_or_text
    return book.pages(tokens)


def _model(model):
    """The opened text model (anything with llama.cpp's `tokenize`: bindings.runtime.Model); this
    layer reads GGUF files with gguf-py and never loads llama.cpp itself."""
    if model is None or isinstance(model, (str, Path)):
        raise GlyphError("rendering a text needs its opened text model (model=: a bindings.runtime.Model)")
    return model


# ---------------------------------------------------------------------------------------
# the mmproj


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _field(r: gguf.GGUFReader, name: str, default=None):
    f = r.fields.get(name)
    return default if f is None else f.contents()


def codebook_for(r: gguf.GGUFReader, bits: int = BITS, grid: int = GRID, filler: str | int = FILLER,
                 sha256: str = "") -> Codebook:
    """The vocabulary rule applied to a text model's GGUF (see the module's docstring)."""
    if not 1 <= bits <= (PATCH // BLOCK) ** 2:
        raise GlyphError(f"bits must be 1 to {(PATCH // BLOCK) ** 2} (a patch's bit slots)")
    f = r.fields["tokenizer.ggml.tokens"]
    strings = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    ft = r.fields.get("tokenizer.ggml.token_type")
    types = [int(ft.parts[i][0]) for i in ft.data] if ft is not None else [1] * len(strings)
    model = str(_field(r, "tokenizer.ggml.model", "?"))
    eligible = [i for i, t in enumerate(types) if t in (gguf.TokenType.NORMAL, gguf.TokenType.BYTE)]
    n = 1 << bits
    if isinstance(filler, str):
        spelled = _spell(filler.encode(), model)
        try:
            filler = strings.index(spelled)
        except ValueError:
            raise GlyphError(f"the filler {filler!r} is not one token of this vocabulary") from None
    if filler not in eligible[:n]:
        raise GlyphError(f"the filler token {filler} is not among the vocabulary's first {n} eligible tokens")
    ids = [filler] + [i for i in eligible if i != filler][:n - 1]
    if len(ids) < n:
        raise GlyphError(f"the text model has {len(ids)} eligible tokens, fewer than {n} codes")
    texts = [strings[i] for i in ids]
    merges: list[str] = []
    if model == "gpt2" and "tokenizer.ggml.merges" in r.fields:
        inside = set(texts)
        fm = r.fields["tokenizer.ggml.merges"]
        for i in fm.data:
            m = bytes(fm.parts[i]).decode("utf-8")
            a, _, b = m.partition(" ")
            if a in inside and b in inside and a + b in inside:
                merges.append(m)
    return Codebook(bits=bits, grid=grid, patch=PATCH, block=BLOCK, token_ids=ids, tokens=texts, merges=merges,
                    tokenizer_model=model, text_model_sha256=sha256)


def _embeddings(r: gguf.GGUFReader, ids: list[int]) -> np.ndarray:
    """Rows `ids` of the text model's token_embd.weight, dequantized to f32 [len(ids), n_embd]."""
    t = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
    if t is None:
        raise GlyphError("the text model has no token_embd.weight")
    rows = np.asarray(t.data)[np.asarray(ids)]
    return gguf.quants.dequantize(rows, t.tensor_type).astype(np.float32).reshape(len(ids), -1)


def weights(book: Codebook, emb: np.ndarray) -> dict[str, np.ndarray]:
    """The mmproj's tensors (numpy order: output features first), from the code book and the
    vocabulary's embeddings [n_codes, n_embd]."""
    B, D, F, N = book.bits, VISION_EMBD, VISION_FF, book.n_codes
    P, b, s = book.patch, book.block, book.patch // book.block
    n_embd = emb.shape[1]
    # patch embedding: dims 2i and 2i+1 hold the mean of bit i's block, negated and as is, in
    # normalized pixels (black -1, white +1): +a and -a for a set (black) bit, -a and +a for a clear one
    w0 = 2.0 ** -int(np.ceil(np.log2(3 * b * b)))  # a power of two: the sums are exact
    a = 3 * b * b * w0
    patch = np.zeros((D, 3, P, P), np.float32)
    for i in range(B):
        y, x = (i // s) * b, (i % s) * b
        patch[2 * i, :, y:y + b, x:x + b] = -w0
        patch[2 * i + 1, :, y:y + b, x:x + b] = w0
    # LayerNorm sees mean 0 and variance 2B a^2 / D for every code: its weight brings each bit dim to +-1
    var = 2 * B * a * a / D
    ln_w = np.zeros(D, np.float32)
    ln_w[:2 * B] = np.sqrt(var + LN_EPS) / a
    # mm.0: one unit per code; 2*ALPHA per agreeing bit, bias so the matching unit is LEVEL and a
    # unit with h differing bits is LEVEL - 4*ALPHA*h <= -16 (ggml's GELU: exactly 0 at <= -10)
    signs = 2.0 * ((np.arange(N)[:, None] >> np.arange(B)) & 1) - 1.0   # [code, bit]
    mm0 = np.zeros((N, D), np.float32)
    mm0[:, 0:2 * B:2] = ALPHA * signs
    mm0[:, 1:2 * B:2] = -ALPHA * signs
    mm0_b = np.full(N, LEVEL - 2 * ALPHA * B, np.float32)
    # mm.2: column c = embedding of token c / LEVEL (a power of two: exact in f32)
    mm2 = (emb / np.float32(LEVEL)).T.astype(np.float32)               # [n_embd, code]
    t = {
        "mm.0.weight": mm0.astype(np.float16), "mm.0.bias": mm0_b,
        "mm.2.weight": np.ascontiguousarray(mm2), "mm.2.bias": np.zeros(n_embd, np.float32),
        "v.patch_embd.weight": patch.astype(np.float16),
        "v.position_embd.weight": np.zeros((book.n_patches, D), np.float32),
        "v.pre_ln.weight": ln_w, "v.pre_ln.bias": np.zeros(D, np.float32),
    }
    for il in range(VISION_BLOCKS):
        p = f"v.blk.{il}."
        for n in ("attn_q", "attn_k", "attn_v", "attn_out"):  # attn_out zero: the block adds nothing
            t[p + n + ".weight"] = np.zeros((D, D), np.float16)
            t[p + n + ".bias"] = np.zeros(D, np.float32)
        t[p + "ln1.weight"], t[p + "ln1.bias"] = np.ones(D, np.float32), np.zeros(D, np.float32)
        t[p + "ffn_down.weight"] = np.zeros((F, D), np.float16)  # legacy LLaVA names, swapped on load; both zero
        t[p + "ffn_down.bias"] = np.zeros(F, np.float32)
        t[p + "ffn_up.weight"] = np.zeros((D, F), np.float16)
        t[p + "ffn_up.bias"] = np.zeros(D, np.float32)
        t[p + "ln2.weight"], t[p + "ln2.bias"] = np.ones(D, np.float32), np.zeros(D, np.float32)
    return t


def write_mmproj(text_model_path: str | Path, out_path: str | Path, *, bits: int = BITS, grid: int = GRID,
                 filler: str | int = FILLER, sha256: str | None = None) -> Path:
    """Write the glyph mmproj for the text model at `text_model_path` (same bytes every run)."""
    text_model_path, out_path = Path(text_model_path), Path(out_path)
    sha256 = sha256 or sha256_file(text_model_path)
    r = gguf.GGUFReader(str(text_model_path))
    book = codebook_for(r, bits, grid, filler, sha256)
    emb = _embeddings(r, book.token_ids)
    n_embd = emb.shape[1]
    name = str(_field(r, "general.name", text_model_path.stem))

    w = gguf.GGUFWriter(str(out_path), "clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_name(f"flowmm-glyph-v{VERSION}")
    w.add_description(f"glyph pages for {name}: a rendered page reaches the text model as its text's token embeddings")
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", book.image_size)
    w.add_uint32("clip.vision.patch_size", book.patch)
    w.add_uint32("clip.vision.embedding_length", VISION_EMBD)
    w.add_uint32("clip.vision.feed_forward_length", VISION_FF)
    w.add_uint32("clip.vision.projection_dim", n_embd)
    w.add_uint32("clip.vision.attention.head_count", 1)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", LN_EPS)
    w.add_uint32("clip.vision.block_count", VISION_BLOCKS)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])  # black -> -1, white -> +1
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    w.add_bool("clip.use_gelu", True)
    w.add_uint32(KEY + "version", VERSION)
    w.add_uint32(KEY + "bits", book.bits)
    w.add_uint32(KEY + "grid", book.grid)
    w.add_uint32(KEY + "patch", book.patch)
    w.add_uint32(KEY + "block", book.block)
    w.add_string(KEY + "tokenizer_model", book.tokenizer_model)
    w.add_string(KEY + "text_model_sha256", sha256)
    w.add_array(KEY + "token_ids", [int(t) for t in book.token_ids])
    w.add_array(KEY + "tokens", book.tokens)
    w.add_array(KEY + "merges", book.merges or [""])
    for n, v in weights(book, emb).items():
        w.add_tensor(n, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def ensure(text_model_path: str | Path | None = None, out_dir: str | Path | None = None, *, bits: int = BITS,
           grid: int = GRID) -> Path:
    """The glyph mmproj for a text model (default: the embedded default model), written once into
    `out_dir` (default the cache's models/glyph) under a name keyed by the text model's sha256, the
    construction's version and its parameters."""
    if text_model_path is None:
        from . import default_model

        text_model_path = default_model.ensure()
    text_model_path = Path(text_model_path)
    out = Path(out_dir) if out_dir else paths.models_dir() / "glyph"
    out.mkdir(parents=True, exist_ok=True)
    sha = sha256_file(text_model_path)
    path = out / f"mmproj-glyph-v{VERSION}-b{bits}-g{grid}-{sha[:16]}.gguf"
    if not path.is_file():
        tmp = path.with_name(path.name + ".part")
        write_mmproj(text_model_path, tmp, bits=bits, grid=grid, sha256=sha)
        tmp.replace(path)
    return path
