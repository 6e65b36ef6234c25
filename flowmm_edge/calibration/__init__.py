"""FlowMM's per-layer policies (policy: rho, settings and an optional importance predictor), the
calibration pass that writes them (calibration_pass), the predictor's distillation from the repeat
pass ahead of time (distillation) and from a model's own conversations (self_distillation)."""
