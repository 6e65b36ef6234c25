"""`python -m flowmm_edge`: the command line, a thin shell over the package."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import default_model, gguf_file, native, paths
from .errors import FlowMMError

NOT_BUILT = 2  # exit code of a subcommand that does not exist yet


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _recorded_backend() -> str:
    pointer = Path(sys.prefix) / paths.NATIVE_POINTER
    try:
        return json.loads(pointer.read_text())["backend"]
    except (OSError, ValueError, KeyError):
        return "unrecorded"


def cmd_info(args: argparse.Namespace) -> int:
    # validate the files first, so that a bad one gives its one-line error and nothing else
    m = gguf_file.read_text_model(args.model) if args.model else None
    p = gguf_file.read_projector(args.mmproj) if args.mmproj else None
    print(f"flowmm-edge native   {native.flowmm_version()}")
    print(f"libllama             {native.lib_path}")
    print(f"libmtmd              {native.mtmd_lib_path()}")
    print(f"backend (built for)  {_recorded_backend()}")
    print(f"ggml devices         {', '.join(native.backend_devices()) or 'none'}")
    print(f"cache folder         {paths.cache_dir()}")
    if m is not None:
        print(f"model                {m.path}")
        print(f"  name               {m.name}")
        print(f"  architecture       {m.architecture}"
              + ("" if m.supported else f"  (not supported by FlowMM merging: {', '.join(gguf_file.SUPPORTED_ARCHITECTURES)} only)"))
        print(f"  layers             {m.n_layer}")
        print(f"  heads / KV heads   {m.n_head} / {m.n_head_kv}")
        print(f"  head dim (K / V)   {m.head_dim_k} / {m.head_dim_v}")
        print(f"  embedding width    {m.n_embd}")
        print(f"  trained context    {m.n_ctx_train}")
        print(f"  parameters         {m.n_params / 1e6:.1f} M ({_human_bytes(m.file_size)} file)")
        kv = ", ".join(f"{t} {_human_bytes(m.kv_bytes_per_token(t))}" for t in gguf_file.KV_TYPE_BYTES)
        print(f"  KV bytes / token   {kv}")
    if p is not None:
        print(f"mmproj               {p.path}")
        print(f"  name               {p.name}")
        print(f"  projector          {p.projector_type}, image {p.image_size}px, patch {p.patch_size}px, "
              f"output width {p.n_embd_out}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else default_model.ensure(progress=lambda s: print(s, file=sys.stderr))
    facts = gguf_file.read_text_model(model)
    print(f"model ready: {facts.name} ({facts.architecture}, {facts.n_layer} layers) at {model}", file=sys.stderr)
    return _not_built("chat", 6)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import calibration, runtime
    from .multimodal import Projector

    runtime.quiet_native_logs()
    model = Path(args.model) if args.model else default_model.ensure(progress=lambda s: print(s, file=sys.stderr))
    facts = gguf_file.read_text_model(model)
    if not facts.supported:
        raise FlowMMError(f"{model}: architecture '{facts.architecture}' is not supported by FlowMM merging "
                          f"({', '.join(gguf_file.SUPPORTED_ARCHITECTURES)} only)")
    if args.mmproj:
        from .multimodal import check_pair

        check_pair(facts, gguf_file.read_projector(args.mmproj))
    if not 0.0 <= args.theta <= 1.0:
        raise FlowMMError(f"--theta {args.theta} is outside [0, 1]")
    prompts = calibration.load_prompts(args.prompts) if args.prompts else None
    policy = calibration.calibrate(model, prompts, prompts_name=str(args.prompts or "builtin"),
                                   projector=(lambda m: Projector(args.mmproj, m, n_threads=args.threads or 2))
                                   if args.mmproj else None,
                                   theta=args.theta, n_threads=args.threads, progress=not args.quiet)
    policy.save(args.out)
    print(f"policy for {facts.name}: theta {policy.theta}, {policy.calibration['n_prompts']} prompts"
          f"{' with images' if args.mmproj else ' (image spans played by labelled text)'}")
    for layer, (rho, mode) in enumerate(zip(policy.rho, policy.modes)):
        print(f"  layer {layer:3d}  rho {rho:.4f}  {mode}-modal")
    n_cross = policy.modes.count("cross")
    print(f"{n_cross} cross-modal and {len(policy.rho) - n_cross} intra-modal layers; written to {args.out}")
    return 0


def _not_built(name: str, issue: int) -> int:
    print(f"flowmm_edge {name}: not built yet (tracked in issue #{issue})", file=sys.stderr)
    return NOT_BUILT


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flowmm_edge",
                                 description="FlowMM KV-cache merging for multimodal GGUF models on llama.cpp")
    ap.add_argument("--version", action="version", version=f"flowmm-edge native {native.flowmm_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("chat", help="multi-turn chat with images and a bounded KV cache")
    p.add_argument("--model", help="text model GGUF (default: the embedded Qwen2.5 Coder 0.5B Instruct)")
    p.add_argument("--mmproj", help="vision projector GGUF")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("calibrate", help="write a per-layer merging policy for a model")
    p.add_argument("--model", help="text model GGUF (default: the embedded model)")
    p.add_argument("--mmproj", help="vision projector GGUF: calibrate on images")
    p.add_argument("--prompts", help="JSONL of {\"segments\": [...]} prompts (default: a small built-in set)")
    p.add_argument("--out", required=True, help="the policy JSON to write")
    p.add_argument("--theta", type=float, default=0.25, help="cross-modal threshold on rho (default 0.25, the paper's range 0.2-0.3)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("bench", help="KV memory and speed, side by side")
    p.set_defaults(func=lambda a: _not_built("bench", 7))

    p = sub.add_parser("eval", help="answer quality of the methods against the full cache")
    p.set_defaults(func=lambda a: _not_built("eval", 7))

    p = sub.add_parser("info", help="native library, backend and model facts")
    p.add_argument("--model", help="a text model GGUF to describe")
    p.add_argument("--mmproj", help="a vision projector GGUF to describe")
    p.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FlowMMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
