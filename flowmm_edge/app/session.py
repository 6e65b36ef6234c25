"""A chat session over llama.cpp's low-level API with a bounded, merged KV cache.

    with Session(budget=0.25, n_ctx=2048) as s:        # the embedded default model
        s.add_user_turn("What is in this picture?", images=["cat.png"])
        for piece in s.reply():
            print(piece, end="")

Memory: llama.cpp allocates the KV buffer once (`n_ctx` cells) and it never grows. After each
user turn is decoded, the method merges the sequence down to `budget` cells (FlowMM's
observation window is then the end of the user's turn, and its reconstruction pass repeats the
text added since the last merge, from `tokens_by_pos`, in the free cells). A turn longer than
the free room is decoded in chunks, merging between chunks, so any conversation fits; `reserve`
cells stay free for the reply (and at least reconstruction.room_needed for that pass). A turn
fails (one-line error, everything restored) only if one image alone is larger than the room
left after a merge.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import re
import time
from pathlib import Path

import numpy as np

from . import chat_template as chat_template_mod
from ..models import default_model, gguf_file
from ..bindings import kv_cache, runtime, sampling
from ..methods import policy as policy_mod, reconstruction
from . import chat_api, session_file
from ..methods.compression import Compressor
from ..errors import FlowMMError
from ..methods import METHODS
from ..methods.base import RECONSTRUCTION_SCORES, Method
from ..bindings.prompt import ModalityLabels, Segment, prepare, valid_text

DEFAULT_SYSTEM = "You are a helpful assistant. Answer briefly."
MEDIA = "<__media__>"


class SessionError(FlowMMError):
    pass


def parse_budget(value, n_ctx: int, bytes_per_cell: float) -> int:
    """Cells the cache is merged down to: a ratio of n_ctx ("0.25"), a cell count ("512") or memory ("24MiB")."""
    if isinstance(value, str):
        text = value.strip()
        m = re.fullmatch(r"([0-9.]+)\s*(KiB|MiB|GiB|KB|MB|GB)", text, re.IGNORECASE)
        if m:
            scale = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2)[0].lower()]
            return max(1, int(float(m.group(1)) * scale // bytes_per_cell))
        try:
            value = int(text) if re.fullmatch(r"[0-9]+", text) else float(text)
        except ValueError:
            raise SessionError(f"budget {value!r} is not a ratio (0.25), a cell count (512) or a size (24MiB)") from None
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise SessionError(f"budget ratio {value} is outside (0, 1]")
        return max(1, int(value * n_ctx))
    if isinstance(value, int) and value > 0:
        return value
    raise SessionError(f"budget {value!r} must be positive")


MIN_CTX = 64  # the smallest KV buffer a chat can work in


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable; else physical), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_settings(facts, n_ctx: int, bytes_per_cell: float, n_threads, n_gpu_layers: int, max_reply: int) -> None:
    """Range-check a session's numeric settings; the error names the chat's flag (the sampling
    settings are checked by sampling.SamplingParams)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SessionError(message)

    need(isinstance(n_ctx, int) and n_ctx >= MIN_CTX, f"--ctx {n_ctx} is below the minimum of {MIN_CTX} cells")
    need(not facts.n_ctx_train or n_ctx <= facts.n_ctx_train,
         f"--ctx {n_ctx} is above the model's trained context of {facts.n_ctx_train} tokens")
    free = available_memory()
    need(free is None or n_ctx * bytes_per_cell < 0.8 * free,
         f"--ctx {n_ctx}: a KV buffer of {n_ctx * bytes_per_cell / 2 ** 30:.2f} GiB would not fit in the "
         f"{(free or 0) / 2 ** 30:.2f} GiB of memory available; lower --ctx or use --kv-type q8_0/q4_0")
    need(n_threads is None or (isinstance(n_threads, int) and n_threads >= 1), f"--threads {n_threads} must be >= 1")
    need(isinstance(n_gpu_layers, int) and n_gpu_layers >= -1, f"--gpu-layers {n_gpu_layers} must be >= 0 (-1: all)")
    need(isinstance(max_reply, int) and max_reply >= 1, f"--max-tokens {max_reply} must be >= 1")


@dataclasses.dataclass
class SessionStats:
    turns: int = 0
    merges: int = 0
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    merge_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0


class Session:
    def __init__(self, model: str | Path | None = None, mmproj: str | Path | None = None, *, method: str | Method = "flowmm",
                 budget="0.25", policy: str | Path | policy_mod.Policy | None = None, kv_type: str = "f16",
                 n_ctx: int = 4096, n_threads: int | None = None, n_gpu_layers: int = 0,
                 system_prompt: str | None = DEFAULT_SYSTEM, max_reply: int = 256, flash_attn: str | bool = "auto",
                 temperature: float = 0.0, seed: int = 0, chat_template: str | None = None, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0):
        self.model_path = Path(model) if model else default_model.ensure()
        facts = gguf_file.read_text_model(self.model_path)
        # a method is a registered name, or an instance configured by the caller (an ablation, say)
        self._method_obj, method = (method, method.name) if isinstance(method, Method) else (None, method)
        if method not in METHODS:
            raise SessionError(f"unknown method {method!r} (one of {', '.join(sorted(METHODS))})")
        if method != "full" and not facts.supported:
            raise SessionError(f"{self.model_path}: architecture '{facts.architecture}' is not supported by merging "
                               f"({', '.join(gguf_file.SUPPORTED_ARCHITECTURES)}); use --method full")
        self.bytes_per_cell = facts.kv_bytes_per_token(kv_type) if kv_type in gguf_file.KV_TYPE_BYTES else 0
        check_settings(facts, n_ctx, self.bytes_per_cell, n_threads, n_gpu_layers, max_reply)
        self.sampling = sampling.SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        try:
            self.sampling.check()
        except sampling.SamplingError as e:
            raise SessionError(str(e)) from None
        self.budget_cells = parse_budget(budget, n_ctx, max(1, self.bytes_per_cell))
        self.reserve = min(max_reply, n_ctx // 4)
        needs_repeat = False
        if method != "full":
            probe = self._method_obj or METHODS[method]()
            needs_repeat = RECONSTRUCTION_SCORES in probe.needs
            kept = len(probe.protected(10 ** 6))
            if self.budget_cells <= kept:
                raise SessionError(f"budget of {self.budget_cells} cells must be above the {kept} cells every merge "
                                   f"keeps (sinks + recent window)")
        self._check_room(method, n_ctx)
        self.policy = None
        if policy is not None:
            self.policy = policy if isinstance(policy, policy_mod.Policy) else policy_mod.load(policy)
            self.policy.check_model(self.model_path)
            if method != "flowmm":
                raise SessionError(f"a policy configures flowmm, not {method}")
        self.method_name, self.max_reply = method, max_reply
        self.system_prompt = valid_text(system_prompt) if system_prompt else None
        self.n_ctx, self.kv_type = n_ctx, kv_type
        self.model = runtime.Model(self.model_path, n_gpu_layers=n_gpu_layers)
        self.projector = None
        try:
            # which template renders the conversation (`template.why` says, for the CLI to print)
            self.template = chat_template_mod.choose(self.model, self.model_path, chat_template, vision=bool(mmproj))
            if needs_repeat:  # the repeat pass runs in the room kept for the reply (which stays free at a merge)
                self.reserve = max(self.reserve, reconstruction.room_needed(reconstruction.repeat_prefix(self.model)))
                self._check_room(method, n_ctx)
            if mmproj:
                from ..bindings.multimodal import Projector

                self.projector = Projector(mmproj, self.model, n_threads=n_threads or 2, use_gpu=n_gpu_layers > 0)
            self.ctx = runtime.Context(self.model, n_ctx=n_ctx, n_batch=512, kv_type=kv_type, flash_attn=flash_attn,
                                       n_threads=n_threads)
        except BaseException:
            self.close()
            raise
        self._reset_state()

    def _check_room(self, method: str, n_ctx: int) -> None:
        if method != "full" and self.budget_cells + self.reserve + 8 > n_ctx:
            raise SessionError(f"budget of {self.budget_cells} cells leaves no room for a turn in a {n_ctx}-cell "
                               f"cache with {self.reserve} kept for the reply: lower --budget or raise --ctx")

    # -- state ---------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        if getattr(self, "sampler", None) is not None:
            self.sampler.close()
        self.sampler = sampling.Sampler(self.model.n_vocab, self.sampling)  # a new conversation draws afresh
        self.messages: list[tuple[str, str]] = [("system", self.system_prompt)] if self.system_prompt else []
        self.cached_text = ""   # the formatted conversation whose tokens are in the cache
        self.pos = 0            # next position (tokens and image positions seen so far)
        self.labels = ModalityLabels()
        self.labels_by_pos = np.zeros(0, np.int32)
        self.tokens_by_pos = np.zeros(0, np.int32)  # -1 where an image sits; repeated by reconstruction scores
        self._repeats = reconstruction.RepeatedScores()  # what the merges' repeat passes have scored so far
        self.stats = SessionStats()
        self.last_logits = None
        self._active_reply = None
        self._reply_sampler = None
        self.finish_reason = None
        self._keys = None  # the turns' keys (chat_api.Turn.key) while create_chat_completion drives it

    def _method(self):
        if self.policy is not None:
            return self.policy.flowmm()
        return self._method_obj or METHODS[self.method_name]()

    def cells(self) -> int:
        return len(kv_cache.seq_cells(self.ctx)[0])

    def _snapshot(self):
        return (self.ctx.state() if self.pos else b"", list(self.messages), self.cached_text, self.pos,
                self.labels_by_pos.copy(), self.tokens_by_pos.copy(), list(self.labels.names),
                dataclasses.replace(self.stats), self.last_logits, self._bias(), self._repeats.scored)

    def _restore(self, snap) -> None:
        (state, self.messages, self.cached_text, self.pos, self.labels_by_pos, self.tokens_by_pos, names, self.stats,
         self.last_logits, bias, self._repeats.scored) = snap
        self.labels.names = names
        if state:
            self.ctx.set_state(state)
        else:
            self.ctx.clear()
        self._set_bias(bias)

    def _bias(self) -> np.ndarray | None:
        """The slot bias the cache carries (not part of llama.cpp's state), cells in position order; None if none."""
        bias = kv_cache.get_slot_bias(self.ctx) if self.pos else None
        if bias is None or not np.any(bias):
            return None
        return bias[..., np.argsort(kv_cache.seq_cells(self.ctx)[1], kind="stable")]

    def _set_bias(self, bias: np.ndarray | None) -> None:
        """Set a bias from _bias() on the cache's cells (which may sit in other cells now), or clear it."""
        if bias is None:
            kv_cache.clear_slot_bias(self.ctx)
            return
        in_cells = np.empty_like(bias)
        in_cells[..., np.argsort(kv_cache.seq_cells(self.ctx)[1], kind="stable")] = bias
        kv_cache.set_slot_bias(self.ctx, in_cells)

    def reset(self) -> None:
        self._finish_reply()
        self.ctx.clear()
        self._reset_state()

    def close(self) -> None:
        if getattr(self, "ctx", None) is not None and getattr(self, "_active_reply", None) is not None:
            self._finish_reply()
        for h in ("sampler", "ctx", "projector", "model"):
            obj = getattr(self, h, None)
            if obj is not None:
                obj.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- turns ---------------------------------------------------------------------------------

    @staticmethod
    def _segments(delta: str, content: list[Segment]) -> list[Segment]:
        """The turn's rendered text as segments: the template's text around the user's content,
        which keeps its own segments (images, and text spans with their modality labels).
        Neighbouring text of one modality is joined, so a plain text turn is one segment."""
        rendered = "".join(MEDIA if c.kind == "image" else c.text for c in content)
        at = delta.find(rendered)
        if at >= 0:
            segs = [Segment("text", delta[:at]), *content, Segment("text", delta[at + len(rendered):])]
        else:  # the template rewrote the content (trimmed it, say): labels other than text are lost
            images = [c for c in content if c.kind == "image"]
            parts = delta.split(MEDIA)
            if len(parts) - 1 != len(images):
                raise SessionError("the chat template dropped or duplicated an image marker")
            segs = [x for k, text in enumerate(parts) for x in [Segment("text", text)] + images[k:k + 1]]
        out: list[Segment] = []
        for seg in segs:
            if seg.kind == "text" and not seg.text:
                continue
            if out and seg.kind == out[-1].kind == "text" and seg.modality == out[-1].modality:
                out[-1] = Segment("text", out[-1].text + seg.text, modality=seg.modality)
            else:
                out.append(seg)
        return out

    def add_user_turn(self, text: str = "", images: list | tuple = (), segments: list[Segment] | None = None) -> int:
        """Decode a user turn (images first, then the text; or `segments`, in their order and with
        their modality labels), merging as the budget requires. Returns its positions. On any
        error the conversation and the cache are as before."""
        self._finish_reply()
        if segments is None:
            segments = [Segment("image", image=im, modality="image") for im in images]
            segments.append(Segment("text", ("\n" if images else "") + valid_text(text)))
        else:
            segments = [dataclasses.replace(s, text=valid_text(s.text)) for s in segments]
        if any(s.kind == "image" for s in segments) and self.projector is None:
            raise SessionError("this model has no mmproj, so it cannot take images (start with --mmproj)")
        content = "".join(MEDIA if s.kind == "image" else s.text for s in segments)
        messages = self.messages + [("user", content)]
        formatted = self.template.render(self.model, messages, add_assistant=True)
        if not formatted.startswith(self.cached_text):
            raise SessionError("the model's chat template re-renders earlier turns; cannot continue incrementally")
        # prepare first: an unreadable image or a bad segment fails here, before anything changes
        prepared = prepare(self.model, self._segments(formatted[len(self.cached_text):], segments), self.labels,
                           self.projector, add_bos=self.pos == 0)
        try:
            room = self.n_ctx - self.reserve - (self.budget_cells if self.method_name != "full" else self.cells())
            for p in prepared.pieces:
                if not isinstance(p, list) and p.n_pos > room:
                    raise SessionError(f"an image of {p.n_pos} positions cannot fit: {room} cells are free after a "
                                       f"merge (raise --ctx or lower --budget)")
            if self.method_name == "full" and prepared.n_pos > room:
                raise SessionError(f"the turn of {prepared.n_pos} tokens does not fit: {room} cells left and the "
                                   f"method 'full' never merges (use another --method or /reset)")
            snap = self._snapshot()
            try:
                self._decode_turn(prepared)
            except BaseException:
                self._restore(snap)
                raise
        finally:
            prepared.close()
        self.messages, self.cached_text = messages, formatted
        self.stats.turns += 1
        self._keys = None  # a turn not from create_chat_completion: its next request starts afresh
        return prepared.n_pos

    def _decode_turn(self, prepared) -> None:
        labels = np.concatenate([self.labels_by_pos, prepared.labels])
        self.labels_by_pos = labels
        self.tokens_by_pos = np.concatenate([self.tokens_by_pos, reconstruction.tokens_by_position(prepared.pieces)])
        units = []  # token lists (neighbours joined, split as the room allows) and images, in order
        for piece in prepared.pieces:
            if isinstance(piece, list) and units and isinstance(units[-1], list):
                units[-1] = units[-1] + piece
            else:
                units.append(piece)
        merging = self.method_name != "full"
        t0 = time.perf_counter()
        while units:
            used = self.cells()
            free = self.n_ctx - self.reserve - used
            take = units.pop(0)
            if isinstance(take, list):
                take, rest = take[:max(free, 0)], take[max(free, 0):]
                if rest:
                    units.insert(0, rest)
                n = len(take)
            else:
                n = take.n_pos
            if n == 0 or n > free:
                raise SessionError("internal: no room for the next chunk")  # a merge below always makes room
            end = self.pos + n
            if not units:  # the end of the turn: merge down to the budget
                will_merge = merging and used + n > self.budget_cells
            else:  # merge now if the next unit (one token at least, an image whole) would not fit
                nxt = 1 if isinstance(units[0], list) else units[0].n_pos
                will_merge = merging and used + n + nxt > self.n_ctx - self.reserve
            if will_merge:
                comp = Compressor(self._method(), self.budget_cells, rho=policy_mod.rho_array(self.policy))
                wants_recon = RECONSTRUCTION_SCORES in comp.method.needs
                with comp.observe(self.ctx, prompt_end=end, labels=labels):
                    logits = self._decode_unit(take)
            else:
                logits = self._decode_unit(take)
            self.pos = end
            if logits is not None:
                self.last_logits = logits
            if will_merge:
                t1 = time.perf_counter()
                if wants_recon:
                    comp.use_reconstruction(self._repeats.update(self.ctx, self.tokens_by_pos))
                comp.compress(self.ctx, labels)
                self.stats.merges += 1
                self.stats.merge_seconds += time.perf_counter() - t1
        self.stats.prompt_tokens += prepared.n_pos
        self.stats.prefill_seconds += time.perf_counter() - t0

    def _decode_unit(self, unit):
        if isinstance(unit, list):
            return self.ctx.decode(unit, self.pos)
        unit.eval(self.ctx, self.pos)
        return None

    def _sample(self, logits: np.ndarray) -> int:
        return (self._reply_sampler or self.sampler).sample(logits)

    def reply(self, max_tokens: int | None = None, params: sampling.SamplingParams | None = None,
              stop: list[str] | tuple[str, ...] = ()):
        """Generate the assistant's reply, yielding text pieces as they come: at most `max_tokens`
        (default the session's max_reply), drawn with `params` for this reply only (default the
        session's sampler), ended before the first of the `stop` strings (which it leaves out).
        `finish_reason` then says "stop" (end of generation or a stop string) or "length".

        Stopping early -- closing the generator, Ctrl-C, an exception anywhere, or starting the
        next turn while it is suspended -- keeps what was generated as the reply, and leaves cache,
        positions, labels and messages consistent: the next turn continues as if the reply had
        ended there. (After a stop string the cache keeps the tokens that spelled it.)"""
        if self.last_logits is None:
            raise SessionError("no user turn to reply to")
        if params is not None:
            try:
                params.check()
            except sampling.SamplingError as e:
                raise SessionError(str(e)) from None
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise SessionError(f"max_tokens {max_tokens!r} must be an integer >= 1")
        if any(not isinstance(s, str) or not s for s in stop):
            raise SessionError("each stop string must be a non-empty string")
        self._reply_sampler = sampling.Sampler(self.model.n_vocab, params) if params is not None else None
        self._active_reply = self._generate(max_tokens or self.max_reply, tuple(stop))
        return self._active_reply

    def _finish_reply(self) -> None:
        """Close a reply generator that was left suspended (its `finally` records the reply)."""
        gen, self._active_reply = self._active_reply, None
        if gen is not None:
            gen.close()

    def _generate(self, max_tokens: int, stop: tuple[str, ...]):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        full, shown, cut, logits, generated = "", 0, False, self.last_logits, []
        hold = max((len(s) for s in stop), default=1) - 1  # text that may still become a stop string
        self.last_logits, self.finish_reason = None, "length"
        t0 = time.perf_counter()
        try:
            for _ in range(min(max_tokens, self.n_ctx - self.cells())):  # stop when the buffer is full
                tok = self._sample(logits)
                if self.model.is_end_of_generation(tok):
                    self.finish_reason = "stop"
                    break
                logits = self.ctx.decode([tok], self.pos)
                self.pos += 1
                generated.append(tok)
                full += decoder.decode(self.model.token_to_piece(tok)).replace("\x00", "")  # C strings end at NUL
                hits = [i for i in (full.find(s, max(0, shown - len(s))) for s in stop) if i >= 0]
                if hits:
                    full, self.finish_reason, cut = full[:min(hits)], "stop", True
                    break
                if len(full) - hold > shown:
                    yield full[shown:len(full) - hold]
                    shown = len(full) - hold
            if not cut:
                full += decoder.decode(b"", final=True)  # the bytes of a character left incomplete
            if len(full) > shown:
                yield full[shown:]
                shown = len(full)
        finally:
            # A stop that lands between a token's decode and the bookkeeping above leaves that token
            # in the cache at self.pos: drop it, so the cache ends exactly where positions and text do.
            self.ctx.truncate(self.pos)
            self._active_reply = None
            if self._reply_sampler is not None:
                self._reply_sampler.close()
                self._reply_sampler = None
            self.stats.decode_seconds += time.perf_counter() - t0
            self.stats.generated_tokens += len(generated)
            self.labels_by_pos = np.concatenate([self.labels_by_pos, np.full(len(generated), self.labels("text"), np.int32)])
            self.tokens_by_pos = np.concatenate([self.tokens_by_pos, np.asarray(generated, np.int32)])
            reply = full
            self.messages = self.messages + [("assistant", reply)]
            self.cached_text += reply
            self.last_reply_tokens = len(generated)
            if self._keys is not None:  # as chat_api keys the reply when a client sends it back
                self._keys = self._keys + [("assistant", reply, ())]

    def chat(self, text: str, images: list | tuple = ()) -> str:
        self.add_user_turn(text, images)
        return "".join(self.reply())

    def add_assistant_turn(self, text: str) -> int:
        """Decode an assistant message the caller supplies (a history resent by an API client) as
        if it had been generated after the last user turn; returns its positions. On any error the
        conversation and the cache are as before."""
        self._finish_reply()
        if not self.messages or self.messages[-1][0] != "user":
            raise SessionError("an assistant message must follow a user message")
        text = valid_text(text)
        prepared = prepare(self.model, [Segment("text", text)], self.labels, self.projector, add_bos=False)
        try:
            snap = self._snapshot()
            try:
                if prepared.n_pos:
                    self._decode_turn(prepared)
            except BaseException:
                self._restore(snap)
                raise
        finally:
            prepared.close()
        self.messages = self.messages + [("assistant", text)]
        self.cached_text += text
        self.last_logits = None
        self._keys = None
        return prepared.n_pos

    def create_chat_completion(self, messages: list[dict], max_tokens: int | None = None,
                               temperature: float | None = None, top_p: float | None = None,
                               top_k: int | None = None, min_p: float | None = None,
                               repeat_penalty: float | None = None, seed: int | None = None,
                               stop: str | list[str] | None = None, stream: bool = False):
        """llama-cpp-python's `Llama.create_chat_completion` on this session: `messages` is the
        whole conversation (OpenAI's shape, chat_api), and the reply a `chat.completion` dict, or
        with stream=True an iterator of `chat.completion.chunk` dicts. A conversation that extends
        the one in the cache decodes only its new messages (llama-server's cache_prompt); any
        other starts afresh. Sampling settings left None are the session's."""
        turns = chat_api.parse_messages(messages)
        params = dataclasses.replace(self.sampling, **{k: v for k, v in (
            ("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("min_p", min_p),
            ("repeat_penalty", repeat_penalty), ("seed", seed)) if v is not None})
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        prompt_tokens = self._feed(turns)
        gen = self.reply(max_tokens, params, stops)
        cid, name = chat_api.completion_id(), self.model_path.name
        if stream:
            return self._stream(gen, cid, name)
        content = "".join(gen)
        return chat_api.completion(cid, name, content, self.finish_reason, prompt_tokens, self.last_reply_tokens)

    def _stream(self, gen, cid: str, name: str):
        yield chat_api.chunk(cid, name, {"role": "assistant"})
        for piece in gen:
            yield chat_api.chunk(cid, name, {"content": piece})
        yield chat_api.chunk(cid, name, {}, self.finish_reason)

    def _feed(self, turns: list) -> int:
        """Bring the cache to the conversation `turns` less its last user turn's reply: keep the
        cached turns if they are its beginning, else start afresh; decode the rest. Returns the
        positions decoded."""
        keys = [t.key for t in turns]
        self._finish_reply()
        cached = self._keys
        if cached is None or keys[:len(cached)] != cached or len(cached) >= len(keys):
            self.reset()
            self.messages, self._keys = [], []
        decoded = 0
        for turn in turns[len(self._keys):]:
            keys = self._keys
            if turn.role == "system":
                self.messages = self.messages + [("system", turn.text)]  # rendered with the next turn
            elif turn.role == "assistant":
                decoded += self.add_assistant_turn(turn.text)
            else:
                decoded += self.add_user_turn(segments=list(turn.segments))
            self._keys = keys + [turn.key]
        return decoded

    # -- statistics and persistence ------------------------------------------------------------

    def report(self) -> dict:
        cells = self.cells()
        s = self.stats
        return {"cells": cells, "buffer_cells": self.n_ctx, "budget_cells": self.budget_cells,
                "kv_bytes": cells * self.bytes_per_cell, "buffer_bytes": self.n_ctx * self.bytes_per_cell,
                "full_equivalent_bytes": self.pos * self.bytes_per_cell, "positions": self.pos,
                "compression": self.pos / cells if cells else 1.0, "merges": s.merges, "turns": s.turns,
                "prefill_tok_s": s.prompt_tokens / s.prefill_seconds if s.prefill_seconds else 0.0,
                "decode_tok_s": s.generated_tokens / s.decode_seconds if s.decode_seconds else 0.0,
                "merge_seconds": s.merge_seconds, "method": self.method_name}

    def save(self, path: str | Path) -> None:
        self._finish_reply()
        header = {"model": policy_mod.fingerprint(self.model_path), "kv_type": self.kv_type,
                  "messages": [list(m) for m in self.messages], "cached_text": self.cached_text, "pos": self.pos,
                  "labels": self.labels_by_pos.tolist(), "tokens": self.tokens_by_pos.tolist(),
                  "label_names": self.labels.names,
                  "stats": dataclasses.asdict(self.stats)}
        state = self.ctx.state() if self.pos else b""
        logits = self.last_logits.astype(np.float32).tobytes() if self.last_logits is not None else b""
        bias = self._bias()
        session_file.write(path, header, state, logits, b"" if bias is None else bias.astype(np.float32).tobytes())

    def load(self, path: str | Path) -> None:
        """Resume a saved session; on any problem the current one is left as it was."""
        self._finish_reply()
        try:
            h, state, logits, bias = session_file.read(path, tuple(f.name for f in dataclasses.fields(SessionStats)))
        except session_file.SessionFileError as e:
            raise SessionError(str(e)) from None
        if h["model"] != policy_mod.fingerprint(self.model_path):
            raise SessionError(f"{path}: saved with another model ({h['model']['name']!r})")
        if h["kv_type"] != self.kv_type:
            raise SessionError(f"{path}: saved with a {h['kv_type']} cache, this session uses {self.kv_type}")
        if logits and len(logits) != 4 * self.model.n_vocab:
            raise SessionError(f"{path}: invalid session file: logits for {len(logits) // 4} tokens, the model has "
                               f"{self.model.n_vocab}")
        if bool(state) != bool(h["pos"]):
            raise SessionError(f"{path}: invalid session file: 'pos' {h['pos']} and the cache disagree")
        snap = self._snapshot()
        try:
            if state:
                self.ctx.set_state(state)
            else:
                self.ctx.clear()
            if state and self.ctx.next_pos() != h["pos"]:
                raise SessionError(f"{path}: invalid session file: the cache ends at position "
                                   f"{self.ctx.next_pos() - 1}, the header says {h['pos'] - 1}")
            lay = kv_cache.layout(self.ctx)
            want = lay.n_layer * lay.n_head_kv * self.cells()
            if bias and len(bias) != 4 * want:
                raise SessionError(f"{path}: invalid session file: a slot bias of {len(bias) // 4} values, the cache "
                                   f"needs {want}")
            self._set_bias(np.frombuffer(bias, np.float32).reshape(lay.n_layer, lay.n_head_kv, -1) if bias else None)
        except FlowMMError as e:
            self._restore(snap)
            if isinstance(e, SessionError):
                raise
            raise SessionError(f"{path}: llama.cpp refused the saved cache (is --ctx smaller than when it was saved?)") from None
        self.messages = [tuple(m) for m in h["messages"]]
        self.cached_text, self.pos = h["cached_text"], h["pos"]
        self.labels_by_pos = np.asarray(h["labels"], np.int32)
        self.tokens_by_pos = np.asarray(h.get("tokens") or [-1] * h["pos"], np.int32)
        self._repeats = reconstruction.RepeatedScores()  # the next merge repeats the loaded text once
        self.labels.names = list(h["label_names"])
        self.stats = SessionStats(**h["stats"])
        self.last_logits = np.frombuffer(logits, np.float32).copy() if logits else None
