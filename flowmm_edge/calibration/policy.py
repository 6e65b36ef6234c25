"""The per-layer merging policy a calibration pass writes for one model (JSON).

    {"schema": "flowmm-edge/policy", "schema_version": 2,
     "model": {"name", "architecture", "n_layer", "n_head", "n_head_kv", "gguf_header_sha256"},
     "theta": 0.25, "rho": [per layer] | null, "modes": ["cross" | "intra", per layer] | null,
     "method": {FlowMM's parameters}, "calibration": {what it was computed from},
     "predictor": null | {an ImportancePredictor: features, rope_pairing, weights, bias, info}}

Version 2 added the predictor (importance_predictor.py, distilled by `calibrate --distill`);
version 1 files, which have none, still load. A null rho (a policy self-distillation learned from
conversations without images: no evidence of the cross-modal flow) means FlowMM estimates rho^l
from each prompt, as without a policy.

The model fingerprint includes a hash of the GGUF's header and tensor table (everything before
the tensor data), so a policy never silently applies to another model or another quantization.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path


from ..models import gguf_file
from ..errors import FlowMMError
from ..methods.importance_predictor import ImportancePredictor, PredictorError

SHIPPED = Path(__file__).resolve().parent.parent / "policies"  # policies the package ships (the default model's)
AUTO, NONE = "auto", "none"  # --policy values: the shipped policy for the model, if any; no policy
SCHEMA, SCHEMA_VERSION = "flowmm-edge/policy", 2
READABLE_VERSIONS = (1, 2)


class PolicyError(FlowMMError):
    pass


def fingerprint(model_path: str | Path) -> dict:
    facts = gguf_file.read_text_model(model_path)
    header = gguf_file.open_gguf(model_path)
    h = hashlib.sha256()
    with open(model_path, "rb") as f:
        left = header.data_offset
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return {"name": facts.name, "architecture": facts.architecture, "n_layer": facts.n_layer, "n_head": facts.n_head,
            "n_head_kv": facts.n_head_kv, "gguf_header_sha256": h.hexdigest()}


@dataclasses.dataclass
class Policy:
    model: dict
    theta: float
    rho: list[float] | None  # None: estimated from each prompt
    method: dict
    calibration: dict
    predictor: ImportancePredictor | None = None

    @property
    def modes(self) -> list[str] | None:
        return None if self.rho is None else ["cross" if r >= self.theta else "intra" for r in self.rho]

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "model": self.model, "theta": self.theta,
                "rho": None if self.rho is None else [float(r) for r in self.rho], "modes": self.modes,
                "method": self.method,
                "calibration": self.calibration,
                "predictor": None if self.predictor is None else self.predictor.to_json()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def flowmm(self, **overrides):
        """The FlowMM method this policy describes (its parameters, overridden where given)."""
        from ..methods.flowmm import FlowMM

        params = {**self.method, "theta": self.theta, **overrides}
        if params.get("importance") == "predicted":
            params.setdefault("predictor", self.predictor)
        return FlowMM(**params)

    def check_model(self, model_path: str | Path) -> None:
        """Refuse a policy calibrated for another model."""
        have = fingerprint(model_path)
        if have != self.model:
            diff = [k for k in have if have.get(k) != self.model.get(k)]
            raise PolicyError(f"the policy was calibrated for {self.model.get('name')!r} "
                              f"({self.model.get('gguf_header_sha256', '?')[:12]}), not for {Path(model_path).name} "
                              f"({have['gguf_header_sha256'][:12]}): {', '.join(diff)} differ")


def load(path: str | Path) -> Policy:
    """Read and validate a policy file; every problem is a one-line PolicyError naming the file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise PolicyError(f"{p}: cannot read the policy file ({e.strerror or e})") from None
    except ValueError as e:
        raise PolicyError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise PolicyError(f"{p}: not a flowmm-edge policy (schema {data.get('schema') if isinstance(data, dict) else None!r})")
    if data.get("schema_version") not in READABLE_VERSIONS:
        raise PolicyError(f"{p}: policy schema version {data.get('schema_version')!r} is not one of "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
    for key, kind in (("model", dict), ("theta", (int, float)), ("rho", (list, type(None))), ("method", dict),
                      ("calibration", dict)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise PolicyError(f"{p}: '{key}' is missing or of the wrong type")
    model = data["model"]
    for key in ("architecture", "n_layer", "n_head", "n_head_kv", "gguf_header_sha256"):
        if key not in model:
            raise PolicyError(f"{p}: the model fingerprint lacks '{key}'")
    rho, theta = data["rho"], data["theta"]
    # per-layer values are of the layers that are merged: all of them, or with interleaved
    # sliding-window attention (Gemma 3) only the full-attention ones; the exact count is checked
    # against the context's cache when the policy is used (compressor, check_layout)
    if rho is not None and not 0 < len(rho) <= model["n_layer"]:
        raise PolicyError(f"{p}: rho has {len(rho)} values for a model of {model['n_layer']} layers")
    if rho is not None and not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and 0 <= r <= 1 for r in rho):
        raise PolicyError(f"{p}: rho values must be finite numbers in [0, 1]")
    if not (math.isfinite(theta) and 0 <= theta <= 1):
        raise PolicyError(f"{p}: theta {theta} is not in [0, 1]")
    predictor = None
    if data.get("predictor") is not None:
        try:
            predictor = ImportancePredictor.from_json(data["predictor"], str(p))
        except PredictorError as e:
            raise PolicyError(str(e)) from None
        if not (0 < predictor.weights.shape[0] <= model["n_layer"] and predictor.weights.shape[1] == model["n_head_kv"]):
            raise PolicyError(f"{p}: the predictor's weights {tuple(predictor.weights.shape)} do not fit a model of "
                              f"{model['n_layer']} layers and {model['n_head_kv']} KV heads")
    policy = Policy(model=model, theta=float(theta), rho=None if rho is None else [float(r) for r in rho],
                    method=data["method"],
                    calibration=data["calibration"], predictor=predictor)
    if "modes" in data and data["modes"] != policy.modes:
        raise PolicyError(f"{p}: 'modes' disagree with rho and theta")
    try:
        policy.flowmm()
    except (TypeError, FlowMMError) as e:
        raise PolicyError(f"{p}: bad method parameters: {e}") from None
    return policy


def shipped_for(model_path: str | Path) -> Policy | None:
    """The policy the package ships for this very model (same fingerprint), or None. The default
    model's is made by `python -m flowmm_edge calibrate --distill 16 --threads 2 --out
    flowmm_edge/policies/qwen2.5-coder-0.5b-instruct.json` (docs/METHOD.md, 'Learned importance')."""
    have = fingerprint(model_path)
    for f in sorted(SHIPPED.glob("*.json")):
        pol = load(f)
        if pol.model == have:
            return pol
    return None


def learned_for(model_path: str | Path) -> Policy | None:
    """The policy this machine learned for this very model from its conversations
    (self_distillation.py), or None. A file that no longer loads is ignored (learning starts again)."""
    from .self_distillation import learned_path

    have = fingerprint(model_path)
    path = learned_path(have)
    if not path.is_file():
        return None
    try:
        pol = load(path)
    except PolicyError:
        return None
    return pol if pol.model == have else None


def choose(value, model_path: str | Path) -> Policy | None:
    """The policy a --policy value (or Engine's `policy=`) names for this model: a Policy or a file
    (checked against the model), AUTO (the one the package ships for it, else the one learned for
    it on this machine, if any) or NONE/None."""
    if value is None or value == NONE:
        return None
    if value == AUTO:
        return shipped_for(model_path) or learned_for(model_path)  # matched by the fingerprint already
    pol = value if isinstance(value, Policy) else load(value)
    pol.check_model(model_path)
    return pol
