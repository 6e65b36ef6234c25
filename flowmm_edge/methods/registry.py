"""The one place a method's name becomes a method object.

    method, rho = registry.resolve("flowmm:no-flow")        # an ablation
    method, rho = registry.resolve("flowmm", policy)        # the policy's FlowMM and its rho^l

A name is a registered method (`METHODS`), or `flowmm:<variant>[+<variant>...]`: the variants'
settings combined, later ones winning (`flowmm:window+pivotal`); any method also takes its
dataclass's fields as `setting=value` parts, as kvpress takes a press's fields
(`flowmm:repeat+pool=15`, `snapkv:window=16`). With a calibrated policy, the
name "flowmm" is the policy's FlowMM, with its per-layer rho and, if it has one, its importance
predictor; a variant is then the policy's FlowMM with the variant's settings (`flowmm:repeat`:
the policy's method scored by the repeat pass instead of its predictor). Without a policy a
variant starts from FlowMM's defaults and estimates its own rho. `chat`, `serve`, `eval`, `bench`,
`Engine` and the press all resolve names here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import METHODS
from .base import Method, MethodError
from .flowmm import PREDICTED, REPEATED

# flowmm:<variant>: the paper's ablations, the importance source, the merge rule, and eviction in place of merging
VARIANTS = {"no-flow": dict(flow_guidance=False), "no-sensitivity": dict(sensitivity=False),
            "no-both": dict(flow_guidance=False, sensitivity=False),
            "window": dict(importance="window"), "both": dict(importance="both"),  # the importance source
            "repeat": dict(importance="reconstruction"), "predicted": PREDICTED,
            "pivotal": dict(merge="pivotal"),  # LOOK-M's merge (flowmm:window+pivotal: FlowMM as first built)
            "select": dict(merge="mass", floor=2.0)}  # no key clears a floor above 1: eviction, same pivots


def _setting(cls, part: str) -> dict:
    """`field=value` of a method's dataclass (`flowmm:pool=15`, `snapkv:window=16`), the value read
    as the field's default's type; the method's own checks then judge it."""
    key, _, text = part.partition("=")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.repr}
    if key not in fields:
        raise MethodError(f"{cls.name} has no setting {key!r} (it has {', '.join(fields)})")
    default = fields[key].default
    kind = float if default is None or default is dataclasses.MISSING else type(default)
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise MethodError(f"{key}={text!r}: not true or false")
        return {key: text.lower() == "true"}
    try:
        return {key: kind(text)}
    except ValueError:
        raise MethodError(f"{key}={text!r}: not a{'n' if kind is int else ''} {kind.__name__}") from None


def known_names() -> list[str]:
    return sorted(METHODS) + [f"flowmm:{v}" for v in VARIANTS]


def base_name(name: str) -> str:
    """The registered method a name is a variant of ("flowmm:no-flow" -> "flowmm")."""
    return name.partition(":")[0]


def resolve(name: str | Method, policy=None) -> tuple[Method, np.ndarray | None]:
    """(a fresh method object, rho^l from the policy or None) for a name. A Method instance (a
    caller's own configuration) is returned as it is, with the policy's rho if it is FlowMM."""
    rho = None if policy is None or policy.rho is None else np.asarray(policy.rho, dtype=np.float64)
    if isinstance(name, Method):
        return name, rho if name.name == "flowmm" else None
    base, _, variant = name.partition(":")
    parts = variant.split("+") if variant else []
    named = [p for p in parts if "=" not in p]
    if base not in METHODS or (named and (base != "flowmm" or any(v not in VARIANTS for v in named))):
        raise MethodError(f"unknown method {name!r} (one of {', '.join(known_names())}, or variants and "
                          "setting=value joined by '+')")
    settings = {k: v for part in parts for k, v in (_setting(METHODS[base], part) if "=" in part
                                                       else VARIANTS[part]).items()}
    if base == "flowmm" and policy is not None:
        return policy.flowmm(**settings), rho
    if base == "flowmm":  # no policy: the repeat pass, with the product's settings for it
        settings = {**REPEATED, **settings}
    return METHODS[base](**settings), None
