"""A conversation's merges: whether one is due, running it now or on a thread of its own while
the user reads (when is decided by app/merge_schedule.py; how, by the sequence's
SequenceCompressor). Mixed into conversation.Conversation."""

from __future__ import annotations

import threading
import time

import numpy as np

from .engine import NoRoomError
from ..errors import FlowMMError
from ..compression import reconstruction
from ..compression.sequence_compressor import MergeInterrupted


class Merging:

    def merge_due(self) -> bool:
        """Whether the sequence is over its budget and can merge now (the reply-first schedule
        leaves this for after the reply: `merge`, `merge_in_background`, or the next turn)."""
        return self._bg is None and self.pos > 0 and self.compression.due(self.cells())

    def merge(self, stop=None, teacher: bool = False) -> bool:
        """Merge the sequence down to the budget now, if due; True if it merged. `stop()`, asked
        between chunks of the repeat pass, ends it early (False): the cache is as it was, and
        what was scored is kept for the next try. On any error too the cache is unchanged.
        `teacher`: nobody waits for this merge (idle time), so it scores by the repeat pass even
        where a predictor would do (SequenceCompressor.merge)."""
        self.stop_background_merge()
        if not self.merge_due():
            return False
        try:
            self._merge(foreground=False, stop=stop, teacher=teacher)
        except MergeInterrupted:
            return False
        return True

    def _merge(self, foreground: bool, stop=None, teacher: bool = False) -> None:
        t0 = time.perf_counter()
        need = self.compression.room(self.model, teacher)
        if teacher and self.engine.room(self, reserved=False) < need:
            teacher = False  # no free room for the teacher's pass: the predictor, rather than evict anyone
            need = self.compression.room(self.model, teacher)
        if need and self.engine.room(self, reserved=False) < need and \
                not self.engine.make_room(need, keep=self, reserved=False):
            raise NoRoomError(f"no room for the merge's repeat pass ({need} cells): the shared cache is "
                              f"held by conversations that are replying")
        progress = (lambda d, t: self._progress("merge", d, t)) if foreground else None
        try:
            self.compression.merge(self.ctx, self.tokens_by_pos, self.labels_by_pos, self.seq_id, stop=stop,
                                   progress=progress, teacher=teacher, images=self.images)
        finally:
            self._release_repeated_images()
        self.engine.learned()  # the merge may have taught the engine's learner enough
        if foreground:
            self.stats.merges += 1
            self.stats.merge_seconds += time.perf_counter() - t0
        else:
            self.stats.background_merges += 1
            self.stats.background_merge_seconds += time.perf_counter() - t0

    # -- images the repeat pass re-reads ----------------------------------------------------------

    def _keep_images(self, prepared, pos0: int) -> None:
        """Take a decoded turn's images from `prepared` (which then does not close them) when a
        merge of this conversation may repeat the context: the repeat pass re-feeds each image once
        (reconstruction.images_by_position), then it is closed."""
        if not self.compression.runs_repeat_pass(self.engine.merge_schedule.idle_teacher):
            return
        kept = reconstruction.images_by_position(prepared.pieces, pos0)
        prepared.give_up(kept.values())
        self.images.update(kept)

    def _release_repeated_images(self) -> None:
        repeated = self.compression.repeats.repeated
        for pos in [p for p in self.images if np.isin(p, repeated)]:
            self.images.pop(pos).close()

    def _close_images(self) -> None:
        for image in getattr(self, "images", {}).values():
            image.close()
        self.images = {}

    def merge_in_background(self, delay: float = 0.0) -> bool:
        """Start the due merge, after `delay` seconds, on a thread that owns the context while it
        runs (the chat's idle time while the user reads and types); True if one started. Any
        other call on this conversation first stops it at the next chunk boundary (the cache
        stays consistent, and it resumes from its progress at the next idle time)."""
        if not self.merge_due():
            return False
        self._bg_cells = self.cells()
        self._bg = _BackgroundMerge(self, delay)
        self._bg.start()
        return True

    def merging_in_background(self) -> bool:
        return self._bg is not None and not self._bg.done.is_set()

    def stop_background_merge(self) -> None:
        """Stop a background merge and wait for it: its repeat pass stops inside the decode it is
        running (Context.interrupt, on the CPU backend), anything else at its next chunk boundary,
        and it resumes from its progress at the next idle time. Ctrl-C cannot cut the wait short:
        the context must be the caller's again before anything else touches it."""
        bg, self._bg = self._bg, None
        if bg is None:
            return
        bg.stop.set()
        self.ctx.interrupt()
        interrupted = False
        while not bg.done.is_set():  # not Thread.join: a Ctrl-C inside it can leave is_alive() False too early
            try:
                bg.done.wait(0.2)
            except KeyboardInterrupt:
                interrupted = True
        self.ctx.clear_interrupt()  # the one who sets it clears it: a later foreground pass runs to its end
        if bg.error is not None:
            self.merge_error = bg.error
        if interrupted:
            raise KeyboardInterrupt


class _BackgroundMerge(threading.Thread):
    """A conversation's due merge on a thread of its own; `stop` ends it at a chunk boundary."""

    def __init__(self, conv: Merging, delay: float = 0.0):
        super().__init__(name=f"flowmm-merge-{conv.seq_id}", daemon=True)
        self.conv, self.stop, self.done, self.error = conv, threading.Event(), threading.Event(), None
        self.delay = delay

    def run(self) -> None:
        try:
            if not self.stop.wait(self.delay):
                self.conv._merge(foreground=False, stop=self.stop.is_set,
                                 teacher=self.conv.engine.merge_schedule.idle_teacher)
        except MergeInterrupted:
            pass
        except Exception as e:  # the cache is as it was; the next turn merges in the foreground if it must
            self.error = f"{type(e).__name__}: {e}" if not isinstance(e, FlowMMError) else str(e)
        finally:
            self.done.set()  # the context is the conversation's again
