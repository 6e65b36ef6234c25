"""The engine a chat runs on: model, vision projector, chat template, the merge settings and one
llama.cpp context whose KV buffer every conversation shares (llama-server's context; a
`conversation.Conversation` is its slot, one sequence each).

With one slot (`Session`, the terminal chat) the buffer is the conversation's own. With several
(`serve --parallel N`) it is one unified stream of n_ctx cells: each conversation merges itself
down to `budget_cells` after its turns, and when a turn still finds no room, the least recently
used idle conversations are evicted (`make_room`).
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

from . import chat_template as chat_template_mod
from ..bindings import kv_cache, media, runtime, sampling
from ..bindings.prompt import valid_text
from ..errors import FlowMMError
from ..methods import registry
from ..calibration import policy as policy_mod
from ..methods.base import Method, MethodError
from ..methods.budget import Budget, BudgetError
from ..compression.sequence_compressor import SequenceCompressor
from .merge_schedule import REPLY_FIRST, MergeSchedule, ScheduleError
from ..models import default_model, gguf_file

DEFAULT_SYSTEM = "You are a helpful assistant. Answer briefly."
_said: set[str] = set()


def say_once(message: str) -> None:
    """A note on stderr, once per process (a server's engines, a test run's sessions)."""
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr)


class SessionError(FlowMMError):
    pass


class TemplateRerenders(SessionError):
    """The chat template renders a new turn into earlier ones (a system message mid-history, say):
    the cache's text is not the new text's beginning."""


class NoRoomError(SessionError):
    """The shared buffer is held by conversations that are replying: the turn can wait for them."""


MIN_CTX = 64  # the smallest KV buffer a chat can work in


def method_spec_learns(method, policy) -> bool:
    """Whether an engine with this --method and --policy learns FlowMM's predictor from its own
    merges when no policy is found: plain "flowmm" with --policy auto (a variant or an instance is
    the caller's explicit configuration; --policy none means no predictor at all)."""
    return method == "flowmm" and policy == policy_mod.AUTO


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


class Engine:
    def __init__(self, model: str | Path | None = None, mmproj: str | Path | None = None, *, method: str | Method = "flowmm",
                 budget="0.25", policy: str | Path | policy_mod.Policy | None = policy_mod.AUTO, kv_type: str = "f16",
                 n_ctx: int = 4096, n_threads: int | None = None, n_gpu_layers: int = 0,
                 system_prompt: str | None = DEFAULT_SYSTEM, max_reply: int = 256, flash_attn: str | bool = "auto",
                 temperature: float = 0.0, seed: int = 0, chat_template: str | None = None, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, n_slots: int = 1,
                 schedule: str = REPLY_FIRST, idle_teacher: bool = False,
                 max_image_bytes: int = media.MAX_IMAGE_BYTES,
                 rpc_servers: str | list[str] | None = None, tensor_split: list[float] | str | None = None,
                 grammar: str | None = None, recall_tokens: int = 0):
        """`rpc_servers` ("HOST:PORT,..." as llama.cpp's --rpc) are registered before the model
        loads, so `n_gpu_layers` can place layers and their KV cache on them; `tensor_split`
        shares the offloaded layers between devices (llama.cpp's --tensor-split). `grammar`: GBNF
        text every reply follows (llama-cli's --grammar-file, --json-schema). `recall_tokens`: how
        much earlier text a user turn may re-read where merges folded away what it names
        (compression/recall.py; 0, the default: off; `chat` turns it on, recall.DEFAULT_TOKENS)."""
        self.model_path = Path(model) if model else default_model.ensure()
        facts = gguf_file.read_text_model(self.model_path)
        # a method is a registered name or variant, or an instance configured by the caller (an ablation, say)
        self.method_spec = method
        try:
            probe = registry.resolve(method)[0]
        except MethodError as e:
            raise SessionError(str(e)) from None
        method = probe.name
        try:
            self.merge_schedule = MergeSchedule(schedule, idle_teacher=idle_teacher)
        except ScheduleError as e:
            raise SessionError(str(e)) from None
        self.schedule = schedule
        if method != "full" and not facts.supported:
            raise SessionError(f"{self.model_path}: architecture '{facts.architecture}' is not supported by merging "
                               f"({', '.join(gguf_file.SUPPORTED_ARCHITECTURES)}); use --method full")
        self.bytes_per_cell = facts.kv_bytes_per_token(kv_type) if kv_type in gguf_file.KV_TYPE_BYTES else 0
        check_settings(facts, n_ctx, self.bytes_per_cell, n_threads, n_gpu_layers, max_reply)
        if not isinstance(n_slots, int) or n_slots < 1:
            raise SessionError(f"--parallel {n_slots} must be >= 1")
        if not isinstance(recall_tokens, int) or recall_tokens < 0:
            raise SessionError(f"--recall {recall_tokens} must be a count of tokens >= 0 (0: off)")
        self.recall_tokens = recall_tokens
        self.sampling = sampling.SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed, grammar=grammar)
        try:
            self.sampling.check()
        except sampling.SamplingError as e:
            raise SessionError(str(e)) from None
        # a ratio is of a slot's share of the buffer (all of it for one slot), as llama-server's n_ctx / np
        try:
            self.budget_cells = Budget.parse(budget, self.bytes_per_cell).keep(n_ctx // n_slots)
        except BudgetError as e:
            raise SessionError(str(e)) from None
        self.reserve = min(max_reply, n_ctx // 4)
        if method != "full":
            kept = len(probe.protected(10 ** 6))
            if self.budget_cells <= kept:
                raise SessionError(f"budget of {self.budget_cells} cells must be above the {kept} cells every merge "
                                   f"keeps (sinks + recent window)")
        self._check_room(method, n_ctx)
        # the shipped policy is FlowMM's: another method takes none unless one is named
        self.policy = policy_mod.choose(None if policy == policy_mod.AUTO and method != "flowmm" else policy,
                                        self.model_path)
        if self.policy is not None and method != "flowmm":
            raise SessionError(f"a policy configures flowmm, not {method}")
        self.learner = None  # self_distillation.ImportanceLearner while FlowMM learns this model's predictor
        self._learning_reported = 0  # spans learned from when the progress was last said
        self._learns = method_spec_learns(self.method_spec, policy) and self.policy is None
        probe = self.compressor()  # the compression a sequence of this engine gets
        self.model_label = facts.name or self.model_path.name
        if probe.repeats_context and (self.policy is None or self.policy.predictor is None):
            say_once(f"flowmm: no importance predictor for {self.model_label}: each merge scores by the repeat pass "
                     + ("after the reply (about 2-3x a prefill), and learning one from the passes over each conversation's "
                        "text before its first merge (used once it ranks well, after about 6k tokens); "
                        "`calibrate --distill 16 --out P` makes one ahead of time"
                        if self._learns else "(about 2-3x a prefill); `calibrate --distill 16 --out P` makes one"))
        self.method_name, self.max_reply = method, max_reply
        self.system_prompt = valid_text(system_prompt) if system_prompt else None
        self.n_ctx, self.kv_type = n_ctx, kv_type
        if rpc_servers:
            from ..bindings import rpc

            rpc.add_servers(rpc_servers)  # an unreachable or malformed one: RPCError, one line
        self.model = runtime.Model(self.model_path, n_gpu_layers=n_gpu_layers, tensor_split=tensor_split)
        self.projector = None
        try:
            # which template renders the conversation (`template.why` says, for the CLI to print)
            self.template = chat_template_mod.choose(self.model, self.model_path, chat_template, vision=bool(mmproj))
            # the repeat pass runs in the room kept for the reply (which stays free at a merge)
            room = probe.room(self.model)
            if room > self.reserve:
                self.reserve = room
                self._check_room(method, n_ctx)
            if mmproj:
                from ..bindings.multimodal import Projector

                self.projector = Projector(mmproj, self.model, n_threads=n_threads or 2, use_gpu=n_gpu_layers > 0)
                self.projector.max_image_bytes = max_image_bytes
            # one KV buffer of n_ctx cells: with several slots one unified stream that every
            # sequence draws on (llama.cpp would otherwise split it into n_slots fixed streams)
            self.ctx = runtime.Context(self.model, n_ctx=n_ctx, n_batch=512, kv_type=kv_type, flash_attn=flash_attn,
                                       n_threads=n_threads, n_seq_max=n_slots, kv_unified=n_slots > 1)
            if method != "full":
                n_merged, n_layer = kv_cache.layout(self.ctx).n_layer, runtime.llama_cpp.llama_model_n_layer(self.model.ptr)
                if n_merged < n_layer:  # interleaved sliding-window attention (Gemma 3)
                    # each conversation holds its last n_swa positions in the window layers' cache,
                    # which llama.cpp sizes by n_ctx: merging frees the other cache, not that one
                    n_swa = runtime.llama_cpp.llama_model_n_swa(self.model.ptr)
                    need = n_swa * n_slots + self.ctx.n_batch
                    if need > n_ctx:
                        raise SessionError(
                            f"{self.model_path.name} keeps a {n_swa}-token window per conversation in its "
                            f"sliding-window layers, a cache merging does not shrink: {n_slots} conversation(s) "
                            f"and a {self.ctx.n_batch}-token batch need --ctx of at least {need}, not {n_ctx}")
                    say_once(f"flowmm: {facts.name or self.model_path.name} attends through a sliding window in "
                             f"{n_layer - n_merged} of its {n_layer} layers: merging shrinks the cache of the other "
                             f"{n_merged}, the window layers keep their own (llama.cpp's, of --ctx cells)")
            if self._learns:
                from ..calibration import self_distillation
                from ..methods.importance_predictor import rope_pairing

                self.learner = self_distillation.ImportanceLearner.for_context(
                    policy_mod.fingerprint(self.model_path), self.ctx,
                    rope_pairing(runtime.llama_cpp.llama_model_rope_type(self.model.ptr)))
        except BaseException:
            self.close()
            raise
        self.n_slots, self.max_image_bytes = n_slots, max_image_bytes
        self.conversations: list = []  # the Conversations on this engine, one sequence each
        self._claims: dict[int, tuple] = {}  # seq_id -> (conversation, cells claimed): see claim()
        self._clock = itertools.count(1)

    def _check_room(self, method: str, n_ctx: int) -> None:
        if method != "full" and self.budget_cells + self.reserve + 8 > n_ctx:
            raise SessionError(f"budget of {self.budget_cells} cells leaves no room for a turn in a {n_ctx}-cell "
                               f"cache with {self.reserve} kept for the reply: lower --budget or raise --ctx")

    # -- the shared pool ---------------------------------------------------------------------------

    def compressor(self) -> SequenceCompressor:
        """A new sequence's compression: this engine's method, budget and policy (and learner)."""
        return SequenceCompressor(self.method_spec, self.budget_cells, self.policy, self.learner)

    def importance_state(self) -> str:
        """'learning' (self-distillation under way), 'predicted' (a predictor scores) or 'repeat'."""
        if self.learner is not None:
            return "learning"
        return "predicted" if self.policy is not None and self.policy.predictor is not None else "repeat"

    def learned_tokens(self) -> int:
        """Tokens the learner has fitted on so far (0 when not learning)."""
        return self.learner.progress.n_tokens if self.learner is not None else 0

    def learned(self) -> bool:
        """Called after each merge: once the learner's fit is good, write its policy where
        `--policy auto` finds it next time and switch every conversation to its predictor. True then."""
        if self.learner is None:
            return False
        pol = self.learner.ready()
        if pol is None:
            p = self.learner.progress
            if p.n_documents != self._learning_reported:  # a conversation's start was learned from
                self._learning_reported = p.n_documents
                print(f"flowmm: {self.model_label}: {p.describe()}", file=sys.stderr)
            return False
        from ..calibration import self_distillation

        path = self_distillation.learned_path(pol.model)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            pol.save(path)
            where = f"saved to {path}"
        except OSError as e:
            where = f"not saved ({e.strerror or e})"
        self.policy, self.learner = pol, None
        for c in self.conversations:
            c.compression.use_policy(pol)
        info = pol.calibration
        say_once(f"flowmm: learned an importance predictor for {self.model_label} from {info['n_tokens']} tokens in "
                 f"{info['n_documents']} spans (held-back rank correlation {info['held_back_spearman']:.2f}); "
                 f"{where}; merges now use it")
        return True

    def tick(self) -> int:
        return next(self._clock)

    def cells_in_use(self) -> int:
        """Cells the conversations on this engine hold, all together."""
        return self.n_ctx - kv_cache.free_cells(self.ctx)

    def free_cells(self, reserved: bool = True) -> int:
        """Cells free in the shared buffer, less (by default) the room kept for a reply and the repeat pass."""
        return kv_cache.free_cells(self.ctx) - (self.reserve if reserved else 0)

    # A claim is the most cells a conversation serving a request expects to hold before the request
    # ends (its turn and reply): the cells it has not taken yet are held back from the others, so a
    # prefill interleaved with another's never takes the room the other was admitted with. The
    # owner itself may grow past its claim into unclaimed cells (an estimate that fell short).

    def claim_turn(self, conv, keeps: bool, new: int, replies_active: bool, step: int) -> bool:
        """Whether a turn of `new` positions (an estimate) can start on `conv` now, which keeps
        its cells (`keeps`) or starts afresh; if so, `conv` claims its room: the new positions
        and the reply's reserve, or, for a method that merges, at least room to merge down to
        the budget and go on by `step` positions (the turn then merges as it goes). Room is made
        by merging idle conversations whose merge is due; an idle one is evicted only when
        waiting for the replying ones could not help (none is replying, or the method never
        merges). False: the turn waits."""
        kept = conv.cells() if keeps else 0  # a conversation that starts afresh gives its cells back first
        freed = conv.cells() - kept
        want = new + self.reserve
        merging = conv.compression.enabled
        least = min(want, max(0, self.budget_cells - kept) + min(new, step) + self.reserve) if merging else want
        room = self.room(conv, reserved=False) + freed
        if room < least:
            self.make_room(least - freed, keep=conv, reserved=False, evict=not replies_active or not merging)
            room = self.room(conv, reserved=False) + freed
        if room < least and replies_active:
            return False  # the replies will end, and their conversations can be merged or evicted then
        self.claim(conv, kept + max(min(want, room), 0))
        return True

    def claim(self, conv, cells: int) -> None:
        self._claims[conv.seq_id] = (conv, cells)

    def hold(self, conv, cells: int) -> None:
        """`conv`, serving a request, is about to grow to `cells`: its claim covers them, so that no
        other conversation is admitted into them while its prefill yields (a claim from an
        estimate that fell short, or room freed since it was made)."""
        if conv.seq_id in self._claims:
            self.claim(conv, max(self._claims[conv.seq_id][1], cells))

    def release(self, conv) -> None:
        self._claims.pop(conv.seq_id, None)

    def claimed_by_others(self, conv) -> int:
        """Cells the other conversations' claims hold back: claimed and not taken yet."""
        return sum(max(0, cells - c.cells()) for s, (c, cells) in self._claims.items() if c is not conv)

    def room(self, conv, reserved: bool = True) -> int:
        """Free cells `conv` may take: the buffer's free cells less the others' outstanding claims
        (and, by default, the room kept for a reply and the repeat pass)."""
        return self.free_cells(reserved) - (self.claimed_by_others(conv) if self._claims else 0)

    def make_room(self, need: int, keep, reserved: bool = True, evict: bool = True) -> bool:
        """Free cells until `keep` has `need` of room (Engine.room), from idle conversations (never
        `keep`, never one serving a request), least recently used first: merge those whose merge
        is still due (what the reply-first schedule left for idle time), then, if `evict`, evict.
        True if the room is there. An evicted conversation forgets its cache (its next request is
        prefilled afresh; a client resends the history anyway)."""
        idle = self.merge_schedule.room_order(self.conversations, keep)
        for victim in idle:
            if self.room(keep, reserved) >= need:
                return True
            if victim.merge_due() and self.room(victim, reserved=False) >= victim.compression.room(self.model):
                try:
                    victim.merge()
                except FlowMMError:
                    pass  # it could not merge (kept as it was): evicting it below still frees its cells
        for victim in idle if evict else ():
            if self.room(keep, reserved) >= need:
                break
            victim.evict()
        return self.room(keep, reserved) >= need

    def close(self) -> None:
        for c in list(getattr(self, "conversations", ())):
            c.close()
        for h in ("ctx", "projector", "model"):
            obj = getattr(self, h, None)
            if obj is not None:
                obj.close()
                setattr(self, h, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
