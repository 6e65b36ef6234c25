"""Thin, leak-free handles over llama.cpp's low-level API: model, context, decode.

The high-level `llama_cpp.Llama` keeps `n_tokens` equal to the next position and indexes
its arrays by it, which breaks once the cache is compacted (docs/ARCHITECTURE.md, 'What the
code relies on in llama.cpp'); flowmm-edge drives llama.cpp through these handles instead.
Every handle frees its native object in `close()` (and as a last resort when garbage-collected).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
from pathlib import Path

import numpy as np

from ..models import gguf_file
from . import kv_cache, native
from ..errors import FlowMMError, ModelFileError
from .native import llama_cpp

# llama.cpp's report of each weight buffer, e.g. "load_tensors:   CPU_REPACK model buffer size =   123.45 MiB"
BUFFER_REPORT = re.compile(r"load_tensors:\s+(\S+) model buffer size\s*=\s*([0-9.]+) MiB")

KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}

# llama.cpp's -fa values. "auto" is llama.cpp's own choice at context creation: flash attention
# where the device running the attention supports it (and always with a quantized V cache).
FLASH_ATTN = {"on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
              "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO}


def quiet_native_logs() -> None:
    """Let only llama.cpp's errors through to stderr (all of them with FLOWMM_VERBOSE set), the
    vision encoder's included. The package already routes libllama's log so at import."""
    native.route_mtmd_logs()


class DecodeError(FlowMMError):
    pass


class DecodeInterrupted(DecodeError):
    """A decode inside Context.interruptible() stopped because Context.interrupt() was called; the
    positions of the ubatch it stopped in are gone from the cache (llama.cpp drops them)."""


# the native abort callback (native/flowmm.h, flowmm_abort_when_set): it reads an int32 flag, so
# no Python runs on the compute thread
_ABORT_WHEN_SET = llama_cpp.ggml_abort_callback(ctypes.cast(native.lib.flowmm_abort_when_set, ctypes.c_void_p).value)


class _Handle:
    """Owns one native object (`ptr`); frees it once, on close(), on leaving a with-block,
    or when garbage-collected. A borrowed handle (`owned` False) wraps an object somebody else
    frees (a llama_cpp.Llama's model and context): close() only lets go of it."""

    ptr = None
    owned = True

    def _free(self, ptr) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, None
            if self.owned:
                self._free(ptr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def check_tensor_split(split: list[float] | str | None) -> list[float] | None:
    """llama.cpp's --tensor-split ("3,1" or [3, 1]): non-negative shares, one per device."""
    if split is None or split == "":
        return None
    try:
        shares = [float(x) for x in (split.split(",") if isinstance(split, str) else split)]
    except (TypeError, ValueError):
        raise ModelFileError(f"--tensor-split {split!r} is not a list of numbers") from None
    if not shares or any(not x >= 0 for x in shares) or sum(shares) <= 0:
        raise ModelFileError(f"--tensor-split {split!r}: shares must be >= 0 and not all 0")
    if len(shares) > llama_cpp.llama_max_devices():
        raise ModelFileError(f"--tensor-split has {len(shares)} shares; llama.cpp takes at most "
                             f"{llama_cpp.llama_max_devices()} devices")
    return shares


class Model(_Handle):
    """A text model GGUF, checked with gguf_file before llama.cpp opens it."""

    def __init__(self, path: str | Path, n_gpu_layers: int = 0, repack: bool = True,
                 tensor_split: list[float] | None = None):
        """`repack=False` keeps every CPU weight in the plain CPU buffer (no repacked layouts);
        `tensor_split`: the share of the offloaded layers each device takes, in llama.cpp's device
        order (its --tensor-split; None: by free memory)."""
        self.facts = gguf_file.read_text_model(path)
        llama_cpp.llama_backend_init()
        self.tensor_split = check_tensor_split(tensor_split)
        self.ptr, self.buffers = self._load(path, n_gpu_layers, repack)
        if any(name.startswith("AMX") for name in self.buffers):
            # Only a build with ggml's AMX buffer type gets here (scripts/build_native.py builds none):
            # its Q4_K matmul crashes in the pinned llama.cpp (upstream #20824), so load again without
            # extra buffer types, repack included, rather than crash at the first decode.
            sys.stderr.write(f"warning: this libggml put weights in its AMX buffer type, which crashes; "
                             f"reloading {Path(path).name} without extra buffer types (slower)\n")
            llama_cpp.llama_model_free(self.ptr)
            self.ptr, self.buffers = self._load(path, n_gpu_layers, repack=False)
        self._vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)

    @property
    def vocab(self):
        """The model's llama_vocab; a closed model raises instead of handing out a freed pointer."""
        if not self.ptr:
            raise FlowMMError("this model is closed (its session or press has ended)")
        return self._vocab

    @classmethod
    def borrow(cls, ptr, path: str | Path) -> "Model":
        """A handle on a model llama.cpp already loaded from `path` (a llama_cpp.Llama's)."""
        self = cls.__new__(cls)
        self.facts = gguf_file.read_text_model(path)
        self.ptr, self.owned, self.buffers = ptr, False, {}
        self._vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        return self

    def _load(self, path, n_gpu_layers: int, repack: bool):
        """(model pointer, {buffer type: MiB}) from llama.cpp's own report of where the weights went."""
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = repack
        split = None
        if self.tensor_split:
            split = (ctypes.c_float * llama_cpp.llama_max_devices())(*self.tensor_split)
            params.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))  # read while loading
        with native.captured_log() as lines:
            ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise ModelFileError(f"{path}: llama.cpp could not load this model (see the error above)")
        buffers = {name: float(mib) for name, mib in BUFFER_REPORT.findall("".join(lines))}
        return ptr, buffers

    def tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n tokens needed
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_to_piece(self, token: int, special: bool = False) -> bytes:
        """The token's text; a control token (BOS, EOS, ...) is empty unless `special`."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def chat_template(self) -> str | None:
        """The chat template the GGUF carries (tokenizer.chat_template), or None."""
        t = llama_cpp.llama_model_chat_template(self.ptr, None)
        return t.decode("utf-8", "replace") if t else None

    def format_chat(self, messages: list[tuple[str, str]], add_assistant: bool, template: str | None = None) -> str:
        """The conversation through llama.cpp's llama_chat_apply_template: `template` is one of its
        built-in names or a template text it recognises; default the GGUF's own, else chatml."""
        tmpl = (template or self.chat_template() or "chatml").encode()
        chat = (llama_cpp.llama_chat_message * len(messages))(
            *[llama_cpp.llama_chat_message(r.encode(), c.encode()) for r, c in messages])
        size = 256 + 2 * sum(len(c) + len(r) for r, c in messages)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(tmpl, chat, len(messages), add_assistant, buf, size)
            if n < 0:
                raise FlowMMError("llama.cpp does not know this chat template")
            if n <= size:
                return buf.raw[:n].decode("utf-8", "replace")
            size = n
        raise FlowMMError("chat template output kept growing")

    def special_text(self, which: str) -> str:
        """The text of the vocabulary's "bos" or "eos" token ("" if it has none)."""
        tok = (llama_cpp.llama_vocab_bos if which == "bos" else llama_cpp.llama_vocab_eos)(self.vocab)
        return self.token_to_piece(tok, special=True).decode("utf-8", "replace") if tok >= 0 else ""

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_to_piece(t) for t in tokens).decode("utf-8", "replace")

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (llama_model_meta_val_str), None if the model has no such key."""
        buf = ctypes.create_string_buffer(1024)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def end_of_generation_tokens(self) -> np.ndarray:
        """Every token id that ends a generation (llama_vocab_is_eog), found once."""
        if getattr(self, "_eog", None) is None:
            self._eog = np.array([t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)],
                                 np.int64)
        return self._eog

    def _free(self, ptr) -> None:
        llama_cpp.llama_model_free(ptr)


class Context(_Handle):
    """A llama.cpp context over `model`: a KV cache of `n_ctx` cells and a decode loop."""

    def __init__(self, model: Model, n_ctx: int = 2048, n_batch: int = 512, n_ubatch: int | None = None,
                 kv_type: str = "f16", flash_attn: str | bool = "auto", n_threads: int | None = None, n_seq_max: int = 1,
                 kv_unified: bool = False, cb_eval=None):
        if kv_type not in KV_TYPES:
            raise FlowMMError(f"KV cache type {kv_type!r} is not one of {', '.join(KV_TYPES)}")
        fa = {True: "on", False: "off"}.get(flash_attn, flash_attn) if isinstance(flash_attn, bool) else flash_attn
        if fa not in FLASH_ATTN:
            raise FlowMMError(f"flash attention {flash_attn!r} is not one of {', '.join(FLASH_ATTN)}")
        self.model = model
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_ubatch or n_batch
        p.n_seq_max = n_seq_max
        p.kv_unified = kv_unified  # one stream shared by all sequences, or one stream each
        p.n_threads = p.n_threads_batch = n_threads or max(1, os.cpu_count() or 1)
        p.type_k = p.type_v = KV_TYPES[kv_type]
        p.flash_attn_type = FLASH_ATTN[fa]
        p.no_perf = True
        if cb_eval is not None:  # a llama_cpp.ggml_backend_sched_eval_callback; kept alive with the context
            self._cb_eval = cb_eval
            p.cb_eval = cb_eval
        self.params = p
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, p)
        if not self.ptr:
            raise FlowMMError(f"llama.cpp could not create a context (n_ctx={n_ctx}, kv_type={kv_type}, flash_attn={flash_attn})")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ptr)
        self.n_batch = llama_cpp.llama_n_batch(self.ptr)  # llama.cpp caps it at n_ctx: a larger batch would abort
        self._interrupt = ctypes.c_int32(0)

    @classmethod
    def borrow(cls, ptr, model: Model) -> "Context":
        """A handle on a context somebody else created over `model` (a llama_cpp.Llama's)."""
        self = cls.__new__(cls)
        self.model, self.ptr, self.owned, self.params = model, ptr, False, None
        self.n_ctx = llama_cpp.llama_n_ctx(ptr)
        self.n_batch = llama_cpp.llama_n_batch(ptr)
        self._interrupt = ctypes.c_int32(0)
        return self

    def interrupt(self) -> None:
        """Stop a decode running inside interruptible() before its next graph node (any thread
        may call this); decodes outside interruptible() are not affected. Stays set until
        clear_interrupt()."""
        self._interrupt.value = 1

    def clear_interrupt(self) -> None:
        self._interrupt.value = 0

    @contextlib.contextmanager
    def interruptible(self):
        """Decodes inside may be stopped by interrupt() (DecodeInterrupted) on the CPU backend,
        between two graph nodes; on other backends, and on a borrowed context (whose owner may
        have its own abort callback), they run to the end. Nothing else is interruptible: a merge
        applying its plan must finish."""
        if not self.owned:
            yield
            return
        llama_cpp.llama_set_abort_callback(self.ptr, _ABORT_WHEN_SET, ctypes.c_void_p(ctypes.addressof(self._interrupt)))
        try:
            with native.quiet_when_interrupted(self._interrupt):
                yield
        finally:
            llama_cpp.llama_set_abort_callback(self.ptr, llama_cpp.ggml_abort_callback(), None)

    def decode(self, tokens: list[int], pos0: int, seq_id: int = 0, all_logits: bool = False) -> np.ndarray:
        """Decode `tokens` at positions pos0… of `seq_id`; returns the last token's logits (a copy),
        or with all_logits every token's, [len(tokens), n_vocab]."""
        if not tokens:
            raise DecodeError("nothing to decode")
        batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        rows = []
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                batch.n_tokens = len(chunk)
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = pos0 + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq_id
                    batch.logits[i] = all_logits or start + i == len(tokens) - 1
                rc = llama_cpp.llama_decode(self.ptr, batch)
                if rc == 2 and self._interrupt.value:
                    raise DecodeInterrupted("the decode was interrupted")
                if rc != 0:
                    raise DecodeError(f"llama_decode failed with code {rc} (cache full or invalid batch)")
                if all_logits:
                    rows += [self.logits(i) for i in range(len(chunk))]
        finally:
            llama_cpp.llama_batch_free(batch)
        return np.stack(rows) if all_logits else self.logits(-1)

    def decode_rows(self, rows: list[tuple[int, int, int]], chunks: list[tuple[list[int], int, int]] = ()
                    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Decode one token for each of several sequences in one batch (llama-server's
        update_slots): rows of (token, position, seq_id); `chunks` (tokens, pos0, seq_id) are
        prompt chunks of other sequences, first in the same batch. At most n_batch entries.
        Returns (each chunk's last logits, each row's logits [len(rows), n_vocab]). The weights
        are read once for all of them."""
        head, lasts = [], []
        for tokens, pos0, seq_id in chunks:
            head += [(tok, pos0 + i, seq_id, i == len(tokens) - 1) for i, tok in enumerate(tokens)]
            lasts.append(len(head) - 1)
        entries = head + [(tok, pos, seq_id, True) for tok, pos, seq_id in rows]
        if not entries or any(not c[0] for c in chunks):
            raise DecodeError("nothing to decode")
        if len(entries) > self.n_batch:
            raise DecodeError(f"{len(entries)} tokens are more than the batch of {self.n_batch}")
        batch = llama_cpp.llama_batch_init(len(entries), 0, 1)
        try:
            batch.n_tokens = len(entries)
            for i, (tok, pos, seq_id, out) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
                batch.seq_id[i][0] = seq_id
            rc = llama_cpp.llama_decode(self.ptr, batch)
            if rc != 0:
                raise DecodeError(f"llama_decode failed with code {rc} (cache full or invalid batch)")
            rows_out = [self.logits(len(head) + j) for j in range(len(rows))]  # by index in the batch
            return ([self.logits(i) for i in lasts],
                    np.stack(rows_out) if rows_out else np.zeros((0, self.model.n_vocab), np.float32))
        finally:
            llama_cpp.llama_batch_free(batch)

    def greedy(self, logits: np.ndarray, pos: int, max_tokens: int, seq_id: int = 0) -> tuple[list[int], int]:
        """Greedy decoding from `logits` (of the token before `pos`) until an end-of-generation
        token or max_tokens; returns (tokens, next position)."""
        out = []
        for _ in range(max_tokens):
            tok = int(logits.argmax())
            if self.model.is_end_of_generation(tok):
                break
            out.append(tok)
            logits = self.decode([tok], pos, seq_id)
            pos += 1
        return out, pos

    def state(self, seq_id: int = 0) -> bytes:
        """llama.cpp's serialisation of the sequence (cells, positions, K and V)."""
        size = llama_cpp.llama_state_seq_get_size(self.ptr, seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.ptr, buf, size, seq_id)
        return ctypes.string_at(buf, n)  # (slicing a c_uint8 array makes a list of ints: 8 bytes a byte)

    def set_state(self, data: bytes, seq_id: int = 0) -> None:
        """Replace the sequence by a serialised one; raises (sequence empty) if llama.cpp refuses it."""
        self.clear(seq_id)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data(self.ptr, buf, len(data), seq_id) != len(data):
            self.clear(seq_id)
            raise DecodeError("llama.cpp refused the saved cache (another model, KV type or too small a context?)")

    def truncate(self, pos: int, seq_id: int = 0) -> None:
        """Drop the sequence's cells at positions >= pos."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ptr), seq_id, pos, -1)

    def next_pos(self, seq_id: int = 0) -> int:
        """One past the highest position the sequence holds in the cache (0 when empty)."""
        return llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(self.ptr), seq_id) + 1

    def clear(self, seq_id: int = 0) -> None:
        """Empty the sequence, and drop the slot bias its cells carried (native, not part of
        llama.cpp's state): a state restored next must not inherit a bias from a merge made since."""
        self.truncate(0, seq_id)
        kv_cache.clear_slot_bias(self, seq_id)

    def logits(self, i: int = -1) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise DecodeError(f"no logits for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def _free(self, ptr) -> None:
        llama_cpp.llama_free(ptr)
