"""KV-compression methods behind one interface (base.Method), name -> class in METHODS: pure numpy
planning over the statistics a method declares it needs. Nothing here calls llama.cpp; running a
method on a live context is compression/, writing per-layer policies is calibration/."""

from .base import KEYS, PROMPT_SCORES, RHO, WINDOW_SCORES, Method, MethodError, Plan, Stats, TokenLayout
from .expected_attention import ExpectedAttention
from .flowmm import FlowMM
from .full import Full
from .h2o import H2O
from .lookm import LookM
from .random_keep import RandomKeep
from .snapkv import SnapKV
from .streaming import Streaming

METHODS: dict[str, type[Method]] = {m.name: m for m in (Full, Streaming, H2O, SnapKV, ExpectedAttention, LookM, FlowMM,
                                                        RandomKeep)}

__all__ = ["KEYS", "METHODS", "PROMPT_SCORES", "RHO", "WINDOW_SCORES", "ExpectedAttention", "FlowMM", "H2O", "LookM",
           "Method", "MethodError", "Plan", "RandomKeep", "SnapKV", "Stats", "Streaming", "TokenLayout"]
