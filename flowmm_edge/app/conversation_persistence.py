"""`/save` and `/load` of a conversation: llama.cpp's state of its sequence, its slot bias and its
bookkeeping, through the checksummed format of session_file.py. Mixed into
conversation.Conversation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import session_file
from .engine import SessionError
from ..bindings import kv_cache
from ..errors import FlowMMError
from ..calibration import policy as policy_mod


class Persistence:
    def save(self, path: str | Path) -> None:
        self._finish_reply()
        header = {"model": policy_mod.fingerprint(self.model_path), "kv_type": self.kv_type,
                  "messages": [list(m) for m in self.messages], "cached_text": self.cached_text, "pos": self.pos,
                  "labels": self.labels_by_pos.tolist(), "tokens": self.tokens_by_pos.tolist(),
                  "label_names": self.labels.names,
                  "stats": dataclasses.asdict(self.stats)}
        state = self.ctx.state(self.seq_id) if self.pos else b""
        logits = self.last_logits.astype(np.float32).tobytes() if self.last_logits is not None else b""
        bias = self._bias()
        session_file.write(path, header, state, logits, b"" if bias is None else bias.astype(np.float32).tobytes())

    def load(self, path: str | Path) -> None:
        """Resume a saved session; on any problem the current one is left as it was."""
        self._finish_reply()
        try:
            h, state, logits, bias = session_file.read(path, tuple(f.name for f in dataclasses.fields(type(self.stats))),
                                                       optional_stats=("background_merges", "background_merge_seconds"))
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
                self.ctx.set_state(state, self.seq_id)
            else:
                self.ctx.clear(self.seq_id)
            if state and self.ctx.next_pos(self.seq_id) != h["pos"]:
                raise SessionError(f"{path}: invalid session file: the cache ends at position "
                                   f"{self.ctx.next_pos(self.seq_id) - 1}, the header says {h['pos'] - 1}")
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
        self.compression.reset()  # the next merge repeats the loaded text once
        self.labels.names = list(h["label_names"])
        self.stats = type(self.stats)(**h["stats"])
        self.last_logits = np.frombuffer(logits, np.float32).copy() if logits else None
