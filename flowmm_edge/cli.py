"""`python -m flowmm_edge`: the command line, a thin shell over the package."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .models import default_model, gguf_file, glyph, tiny
from .bindings import native
from .app import merge_schedule
from .compression import recall
from .methods import registry
from . import paths
from .errors import FlowMMError
from .bindings.media import MAX_IMAGE_BYTES
from .bindings.prompt import valid_text
from .evaluation.ruler_tasks import FAMILIES as ALL_FAMILIES, KEPT_FAMILIES
from .evaluation.image_tasks import FAMILIES as IMAGE_FAMILIES

def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _recorded_backend() -> str:
    """The backend the loaded libraries were built for, as the wheel (next to them) or setup (in
    the virtual environment) recorded it."""
    for pointer in (Path(native.lib_path).parent / paths.NATIVE_POINTER, Path(sys.prefix) / paths.NATIVE_POINTER):
        try:
            return json.loads(pointer.read_text())["backend"]
        except (OSError, ValueError, KeyError):
            continue
    return "unrecorded"


def cmd_info(args: argparse.Namespace) -> int:
    # validate the files first, so that a bad one gives its one-line error and nothing else
    model = args.model or (default_model.path() if default_model.path().is_file() else None)
    m = gguf_file.read_text_model(model) if model else None
    p = gguf_file.read_projector(args.mmproj) if args.mmproj else None
    placement = _placement(args)  # the --rpc servers' devices join the list below
    print(f"flowmm-edge native   {native.flowmm_version()}")
    print(f"libllama             {native.lib_path}")
    print(f"libmtmd              {native.mtmd_lib_path()}")
    print(f"backend (built for)  {_recorded_backend()}")
    print(f"ggml devices         {', '.join(native.backend_device_descriptions()) or 'none'}")
    print(f"CPU variant          {native.cpu_variant()}  ({native.loaded_backends.get('CPU', '?')})")
    feats = native.cpu_features()
    print(f"CPU features         {' '.join(k if v == '1' else f'{k}={v}' for k, v in feats.items()) or 'none reported'}")
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
        from .bindings import runtime

        with runtime.Model(m.path, **placement) as loaded:
            bufs = ", ".join(f"{name} {mib:.1f} MiB" for name, mib in loaded.buffers.items())
        print(f"  weight buffers     {bufs or 'none reported'}")
    if p is not None:
        print(f"mmproj               {p.path}")
        print(f"  name               {p.name}")
        print(f"  projector          {p.projector_type}, image {p.image_size}px, patch {p.patch_size}px, "
              f"output width {p.n_embd_out}")
    return 0


HELP = '''commands:
  /image PATH   attach an image to the next message (repeatable)
  /file PATH    send the text of a file as your message
  """           start a multi-line message; a line ending in """ ends it
  /stats        cache cells and memory, merges, compression, speed
  /reset        forget the conversation
  /save FILE    save the conversation and its compressed cache
  /load FILE    resume a saved conversation
  /help         this text
  /quit         leave (Ctrl-D too); Ctrl-C stops a reply'''


def _hf_file(repo: str, filename: str) -> Path:
    """A file of a Hugging Face repo through huggingface_hub (its cache, HF_ENDPOINT, HF_HUB_OFFLINE)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from .errors import DownloadError

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except LocalEntryNotFoundError:
        raise DownloadError(f"{repo}/{filename}: not in the Hugging Face cache and cannot be downloaded "
                            f"(offline or unreachable)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise DownloadError(f"{repo}/{filename}: download failed ({str(e).splitlines()[0]})") from None


DEFAULT_QUANT = "Q4_K_M"  # what `-hf user/repo` picks without a tag, as llama.cpp does


def pick_gguf(names: list[str], quant: str | None) -> tuple[str, str | None]:
    """(model file, mmproj file or None) among a repo's file names, as llama.cpp's -hf picks them:
    the model GGUF whose name holds the quant tag (Q4_K_M without one; the only one if the repo
    has one), and a GGUF with "mmproj" in its name."""
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    projectors = [n for n in ggufs if "mmproj" in n.lower()]
    models = [n for n in ggufs if n not in projectors]
    tag = (quant or DEFAULT_QUANT).lower()
    hits = [n for n in models if tag in Path(n).name.lower()]
    if not hits and quant is None and len(models) == 1:
        hits = models
    if len(hits) != 1:
        have = ", ".join(Path(n).name for n in models) or "none"
        raise FlowMMError(f"-hf: {'no' if not hits else 'more than one'} model GGUF matches {quant or DEFAULT_QUANT!r} "
                          f"(model GGUFs in the repo: {have})")
    return hits[0], (projectors[0] if projectors else None)


def _hf_pick(spec: str) -> tuple[Path, Path | None]:
    """-hf user/repo[:quant]: list the repo (or, offline, its cached snapshot), pick, download."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from .errors import DownloadError

    repo, _, quant = spec.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise FlowMMError(f"-hf {spec!r}: expected user/repo[:quant]")
    try:
        names = HfApi().list_repo_files(repo)
    except Exception:  # offline, unreachable, or HF_HUB_OFFLINE: the cached snapshot decides
        try:
            folder = Path(snapshot_download(repo_id=repo, allow_patterns=["*.gguf"], local_files_only=True))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
            raise DownloadError(f"-hf {repo}: cannot list the repo and nothing of it is cached") from None
        names = [str(f.relative_to(folder)) for f in folder.rglob("*.gguf")]
    model, mmproj = pick_gguf(names, quant or None)
    return _hf_file(repo, model), (_hf_file(repo, mmproj) if mmproj else None)


def _print_stats(r: dict) -> None:
    print(f"method {r['method']}, {r['schedule'].replace('_', '-')}: {r['turns']} turns, {r['positions']} positions "
          f"seen; merges waited for {r['merges']} ({r['merge_seconds']:.2f} s), after replies "
          f"{r['background_merges']} ({r['background_merge_seconds']:.2f} s)"
          f"{'; merging now' if r['merging_in_background'] else ''}")
    print(f"KV cells in use {r['cells']} of a fixed {r['buffer_cells']}-cell buffer; merged down to <= {r['budget_cells']} "
          f"after each turn")
    print(f"KV memory {_human_bytes(r['kv_bytes'])} in use, {_human_bytes(r['buffer_bytes'])} allocated (never grows); "
          f"full cache would hold {_human_bytes(r['full_equivalent_bytes'])}")
    print(f"compression {r['compression']:.1f}x; prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} tok/s")
    if r["recalled_tokens"]:
        print(f"recall: {r['recalled_tokens']} tokens of merged text re-read before the turns that named them")


def _stream_reply(session) -> None:
    gen = session.reply()
    try:
        for piece in gen:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        gen.close()
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()


def read_message(read=input) -> str:
    '''One message: a line, or every line of a block that opens with """ and ends at a line
    ending in """ (as in Ollama). End of input inside a block ends the block.'''
    line = read("> ")
    if not line.lstrip().startswith('"""'):
        return line
    rest = line.lstrip()[3:]
    if rest.rstrip().endswith('"""'):
        return rest.rstrip()[:-3]
    lines = [rest] if rest else []
    while True:
        try:
            line = read("... ")
        except EOFError:
            break
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            break
        lines.append(line)
    return "\n".join(lines)


def _use_line_editing() -> None:
    """Line editing on a terminal: readline reads the terminal raw, so a pasted line is not cut at
    the kernel's 4095-character limit of a cooked terminal line."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (input() uses it once imported)
        except ImportError:
            pass


class TerminalProgress:
    """Conversation.on_progress on a terminal: a stderr bar (tqdm) with tokens/s for a long
    prefill and for a merge the turn waits for; notes on their own line. Never on a pipe."""

    MIN_TOKENS = 256  # shorter prefills show no bar

    def __init__(self, stream=None):
        self.stream, self.bar, self.what = stream or sys.stderr, None, None

    def __call__(self, what: str, done: int, total: int, note: str = "") -> None:
        if what == "note":
            self.close()
            print(note, file=self.stream)
            return
        if total < self.MIN_TOKENS:
            return
        if self.bar is None or self.what != what:
            from tqdm import tqdm

            self.close()
            label = "prefill" if what == "prefill" else "merge (repeat pass)"
            self.bar, self.what = tqdm(total=total, desc=label, unit="tok", file=self.stream, leave=False), what
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _send(session, text: str, images: list[str]) -> None:
    clean = valid_text(text)
    if clean != text.replace("\x00", ""):
        print("note: bytes that are not valid UTF-8 were replaced by U+FFFD")
    try:
        session.add_user_turn(clean, images=images)
    finally:
        images.clear()
        if isinstance(session.on_progress, TerminalProgress):
            session.on_progress.close()
    _stream_reply(session)
    if session.merge_error:
        print(f"note: the merge after the last reply failed ({session.merge_error}); the cache was kept as it was",
              file=sys.stderr)
        session.merge_error = None


def _model_source(args: argparse.Namespace) -> tuple[Path, str | None]:
    """(text model, mmproj) from -hf, --hf-repo/--hf-file, -m, or the embedded default model."""
    if args.kv_type_v and args.kv_type_v != args.kv_type:
        raise FlowMMError(f"-ctv {args.kv_type_v} differs from -ctk {args.kv_type}: the merged cache keeps K and V "
                          f"in one type")
    if args.hf:
        model, found = _hf_pick(args.hf)
        return model, args.mmproj or found
    if args.hf_repo:
        if not args.hf_file:
            raise FlowMMError("--hf-repo needs --hf-file (the GGUF inside the repo)")
        model = _hf_file(args.hf_repo, args.hf_file)
        return model, _hf_file(args.hf_repo, args.hf_mmproj) if args.hf_mmproj else args.mmproj
    model = Path(args.model) if args.model else default_model.ensure(progress=lambda s: print(s, file=sys.stderr))
    return model, args.mmproj


def _engine_settings(args: argparse.Namespace) -> dict:
    """The engine.Engine settings chat and serve share, from their common flags."""
    return dict(method=args.method, budget=args.budget, policy=args.policy, kv_type=args.kv_type, n_ctx=args.ctx,
                n_threads=args.threads, **_placement(args), max_reply=args.max_tokens,
                temperature=args.temp, seed=args.seed, chat_template=args.chat_template, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty, flash_attn=args.flash_attn,
                schedule=args.schedule.replace("-", "_"), recall_tokens=args.recall)


def cmd_serve(args: argparse.Namespace) -> int:
    from .bindings import runtime
    from .app.engine import Engine
    from .app import chat_api
    from .app.server import Limits, serve

    runtime.quiet_native_logs()
    if not 0 < args.port < 65536:
        raise FlowMMError(f"--port {args.port} is outside 1..65535")
    media_dir = None
    if args.allowed_local_media:
        media_dir = Path(args.allowed_local_media).resolve()
        if not media_dir.is_dir():
            raise FlowMMError(f"--allowed-local-media {args.allowed_local_media}: not a directory")
    if args.timeout is not None and args.timeout <= 0:
        raise FlowMMError(f"--timeout {args.timeout} must be positive (seconds)")
    limits = Limits(chat_api.MediaPolicy(media_dir, args.max_image_bytes), args.max_prompt_tokens, args.timeout)
    model, mmproj = _model_source(args)
    engine = Engine(model, mmproj, n_slots=args.parallel, system_prompt=None, max_image_bytes=args.max_image_bytes,
                    **_engine_settings(args))
    with engine:
        facts = engine.model.facts
        print(f"{facts.name}{' + ' + Path(str(mmproj)).name if mmproj else ''}: {args.parallel} slots sharing "
              f"{args.ctx} cells, {args.method} (importance: {engine.importance_state()}) to {engine.budget_cells} "
              f"cells each; {engine.template.why}",
              file=sys.stderr)
        print(f"listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        serve(engine, args.host, args.port, Path(model).name, args.api_key, args.max_tokens, limits=limits)
    return 0


def _grammar(args: argparse.Namespace) -> str | None:
    """The GBNF text of --grammar-file, or the grammar of --json-schema (JSON text or a file)."""
    from .app import chat_api

    if args.grammar_file is not None:
        try:
            return args.grammar_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise FlowMMError(f"--grammar-file {args.grammar_file}: cannot read it ({e})") from None
    if args.json_schema is None:
        return None
    text = args.json_schema
    if not text.lstrip().startswith("{") and Path(text).is_file():
        text = Path(text).read_text()
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise FlowMMError(f"--json-schema is not JSON ({e})") from None
    try:
        return chat_api.grammar_for({"type": "json_schema", "json_schema": {"schema": schema}})
    except chat_api.FormatError as e:
        raise FlowMMError(f"--json-schema: {e}") from None


def cmd_chat(args: argparse.Namespace) -> int:
    from .bindings import runtime
    from .app.session import Session

    runtime.quiet_native_logs()
    # any bytes in: undecodable input reaches valid_text as surrogates instead of raising; any text out
    sys.stdin.reconfigure(errors="surrogateescape")
    sys.stdout.reconfigure(errors="replace")
    model, mmproj = _model_source(args)
    session = Session(model, mmproj, grammar=_grammar(args), **_engine_settings(args),
                      **({} if args.system_prompt is None else {"system_prompt": args.system_prompt or None}))
    with session:
        facts = session.model.facts
        pol = session.policy
        rho = ((f"rho per layer from the {'shipped ' if args.policy == 'auto' else ''}policy"
                + (", importance predicted" if pol.predictor is not None else "")) if pol else
               "rho estimated from each prompt (no --policy)" if args.method == "flowmm" else "")
        print(f"{facts.name} ({facts.architecture}, {facts.n_layer} layers){' + ' + Path(str(mmproj)).name if mmproj else ''}: "
              f"{args.method} (importance: {session.engine.importance_state()}), budget {session.budget_cells} cells "
              f"of {args.ctx}, KV {args.kv_type}"
              f"{'; ' + rho if rho else ''}", file=sys.stderr)
        print(session.template.why, file=sys.stderr)
        if sys.stderr.isatty():
            session.listen(TerminalProgress())
        if args.prompt is not None:
            _send(session, args.prompt, list(args.image or []))
            return 0
        print("type /help for commands", file=sys.stderr)
        _use_line_editing()
        images: list[str] = list(args.image or [])
        while True:
            try:
                line = read_message()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print("\n(use /quit or Ctrl-D to leave)")
                continue
            cmd, _, rest = line.strip().partition(" ")
            rest = rest.strip()
            try:
                if cmd == "/quit":
                    return 0
                elif cmd == "/help":
                    print(HELP)
                elif cmd == "/stats":
                    _print_stats(session.report())
                elif cmd == "/reset":
                    session.reset()
                    images.clear()
                    print("conversation cleared")
                elif cmd == "/image":
                    if session.projector is None:
                        raise FlowMMError("this model has no mmproj, so it cannot take images (start with --mmproj)")
                    if not rest:
                        raise FlowMMError("/image needs a file name")
                    prepared = session.projector.prepare(rest)  # readable and decodable now, not at the next message
                    prepared.close()
                    if prepared.note:
                        print(prepared.note)
                    images.append(rest)
                    print(f"image attached: {rest}")
                elif cmd == "/file":
                    if not rest:
                        raise FlowMMError("/file needs a file name")
                    try:
                        data = Path(rest).read_bytes()
                    except OSError as e:
                        raise FlowMMError(f"{rest}: cannot read the file ({e.strerror or e})") from None
                    print(f"sending {rest} ({len(data)} bytes)")
                    _send(session, data.decode("utf-8", "surrogateescape"), images)
                elif cmd in ("/save", "/load"):
                    if not rest:
                        raise FlowMMError(f"{cmd} needs a file name")
                    (session.save if cmd == "/save" else session.load)(rest)
                    print(f"{'saved to' if cmd == '/save' else 'loaded'} {rest}")
                elif cmd.startswith("/"):
                    raise FlowMMError(f"unknown command {cmd} (/help lists them)")
                elif line.strip():
                    _send(session, line, images)
            except FlowMMError as e:
                print(f"error: {e}")
            except KeyboardInterrupt:
                print("\n[interrupted; the turn was dropped]")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibration_pass
    from .bindings import runtime
    from .bindings.multimodal import Projector

    runtime.quiet_native_logs()
    model = Path(args.model) if args.model else default_model.ensure(progress=lambda s: print(s, file=sys.stderr))
    facts = gguf_file.read_text_model(model)
    if not facts.supported:
        raise FlowMMError(f"{model}: architecture '{facts.architecture}' is not supported by FlowMM merging "
                          f"({', '.join(gguf_file.SUPPORTED_ARCHITECTURES)} only)")
    if args.mmproj:
        from .bindings.multimodal import check_pair

        check_pair(facts, gguf_file.read_projector(args.mmproj))
    if not 0.0 <= args.theta <= 1.0:
        raise FlowMMError(f"--theta {args.theta} is outside [0, 1]")
    prompts = calibration_pass.load_prompts(args.prompts) if args.prompts else None
    policy = calibration_pass.calibrate(model, prompts, prompts_name=str(args.prompts or "builtin"),
                                   projector=(lambda m: Projector(args.mmproj, m, n_threads=args.threads or 2))
                                   if args.mmproj else None,
                                   theta=args.theta, n_threads=args.threads, progress=not args.quiet,
                                   flash_attn=args.flash_attn, distill_docs=args.distill,
                                   distill_tokens=args.distill_tokens, **_placement(args))
    policy.save(args.out)
    print(f"policy for {facts.name}: theta {policy.theta}, {policy.calibration['n_prompts']} prompts"
          f"{' with images' if args.mmproj else ' (image spans played by labelled text)'}")
    for layer, (rho, mode) in enumerate(zip(policy.rho, policy.modes)):
        print(f"  layer {layer:3d}  rho {rho:.4f}  {mode}-modal")
    n_cross = policy.modes.count("cross")
    print(f"{n_cross} cross-modal and {len(policy.rho) - n_cross} intra-modal layers")
    if policy.predictor is not None:
        info = policy.predictor.info
        print(f"importance predictor: {info['n_documents']} documents, {info['n_tokens']} tokens; rank correlation "
              f"with the repeat pass on {info['held_back_documents']} held-back documents {info['held_back_spearman_mean']:.3f}"
              f" (per layer {min(info['held_back_spearman_per_layer']):.2f}-{max(info['held_back_spearman_per_layer']):.2f})")
    print(f"written to {args.out}")
    return 0


def _csv(text: str, kind=str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FlowMMError(f"cannot read {text!r} as a comma-separated list") from None


def _model_arg(value: str | None) -> Path:
    if value in tiny.SHAPES:
        return Path(tiny.ensure_models(tiny.SHAPES[value])[0])
    return Path(value) if value else default_model.ensure(progress=lambda s: print(s, file=sys.stderr))


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate, ruler_tasks, tasks
    from .bindings import runtime
    from .calibration import policy as policy_mod

    runtime.quiet_native_logs()
    model = _model_arg(args.model)
    budgets = _csv(args.budgets, float)
    if any(not 0 < b <= 1 for b in budgets):
        raise FlowMMError(f"budgets must be ratios in (0, 1]: {args.budgets}")
    methods = _csv(args.methods)
    policy = policy_mod.choose(args.policy, model)
    for m in methods:  # an unknown name fails here, before any model is loaded
        if m != "full":
            registry.resolve(m, policy)
    if args.tasks:
        task_list = tasks.load_tasks(args.tasks)
    elif args.milebench:
        task_list = tasks.load_milebench(args.milebench, args.limit)
    elif args.suite == "builtin":
        task_list = tasks.builtin_suite(_csv(args.lengths, int), args.per_kind)
    else:
        from .evaluation import image_tasks

        families = _csv(args.families)
        text_families = [f for f in families if f not in image_tasks.FAMILIES]
        image_families = [f for f in families if f in image_tasks.FAMILIES]
        ruler_tasks.check_families(text_families)  # before the model is loaded
        if image_families and not args.mmproj:
            args.mmproj = str(glyph.ensure(model))  # the constructed projector that reads its pages
        with runtime.Model(model) as m:  # lengths in the model's own tokens
            count = lambda text: len(m.tokenize(text, add_special=False))  # noqa: E731
            task_list = ruler_tasks.generate(text_families, _csv(args.lengths, int), args.per_kind, args.seed,
                                             count_tokens=count) if text_families else []
            if image_families:
                task_list += image_tasks.generate(image_families, _csv(args.lengths, int), args.per_kind, args.seed,
                                                  glyph.Codebook.load(args.mmproj), m, count_tokens=count)
    task_list = task_list[: args.limit] if args.limit else task_list
    if not task_list:
        raise FlowMMError("no tasks to run")
    if "flowmm" in methods and policy is None:
        print("flowmm: no --policy, so rho per layer is estimated from each prompt's observation window", file=sys.stderr)
    rows = evaluate.run(model, task_list, methods, budgets, policy, args.kv_type, args.threads, args.json,
                          progress=not args.quiet, mmproj=args.mmproj, mode=args.question, flash_attn=args.flash_attn,
                          placement=_placement(args),
                          idle_teacher=args.idle_teacher, recall_tokens=args.recall)
    summary = evaluate.summarize(rows)
    tables = [evaluate.score_grid(summary, args.question), evaluate.markdown(summary)]
    if args.by_family:
        by_family = evaluate.summarize(rows, by_family=True)
        tables += [evaluate.family_grid(by_family, args.question, b) for b in budgets]
    print("\n\n".join(tables))
    if args.markdown:
        Path(args.markdown).write_text("\n\n".join(tables) + "\n")
    if args.plot:
        from .evaluation.plots import plot_scores

        plot_scores(summary, args.plot)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses

    from .evaluation import benchmark
    from .bindings import runtime
    from .calibration import policy as policy_mod

    runtime.quiet_native_logs()
    model = _model_arg(args.model)
    rows = benchmark.run(model, _csv(args.lengths, int), _csv(args.budgets, float), _csv(args.methods),
                         _csv(args.kv_types), combos=args.combos, n_decode=args.decode, n_threads=args.threads, progress=not args.quiet,
                         flash_attn=args.flash_attn, stock_lib=args.stock_lib,
                         policy=policy_mod.choose(args.policy, model), placement=_placement(args))
    table = benchmark.markdown(rows) + "\n\n" + "\n".join(f"- {line}" for line in benchmark.targets(rows))
    print(table)
    print(f"process peak RSS {benchmark.peak_rss_mib():.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model), "rows": [dataclasses.asdict(r) for r in rows],
                                               "peak_rss_mib": benchmark.peak_rss_mib()}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.plot:
        from .evaluation.plots import plot_bench

        plot_bench(rows, args.plot)
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line (`error: ...`), not the usage block too."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (--help lists the options)\n")


def at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value
    return parse


def output_file(text: str) -> Path:
    """An output path whose folder exists (created now) and is writable: checked before the work."""
    path = Path(text)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot create the folder {path.parent} ({e.strerror or e})") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path} cannot be written")
    return path


def _combos(text: str) -> tuple[tuple[str, str], ...]:
    """bench --combos: METHOD:KV pairs, or none."""
    if text == "none":
        return ()
    pairs = tuple(tuple(p.split(":")) for p in _csv(text))
    if any(len(p) != 2 or p[1] not in ("f16", "q8_0", "q4_0") for p in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected METHOD:KV pairs with KV f16, q8_0 or q4_0 "
                                         "(flowmm:q8_0), or none")
    return pairs


def _stock_lib(text: str) -> str | Path | None:
    """bench --stock-lib, as benchmark.run takes it: "auto", None for none, or a folder holding a
    libllama (checked before the work)."""
    if text in ("auto", "none"):
        return None if text == "none" else text
    if not (Path(text) / paths.LIBLLAMA).is_file():
        raise argparse.ArgumentTypeError(f"{text} holds no {paths.LIBLLAMA}")
    return Path(text)


def _add_flash_attn(p: argparse.ArgumentParser) -> None:
    p.add_argument("-fa", "--flash-attn", dest="flash_attn", choices=["on", "off", "auto"], default="auto",
                   help="flash attention, as llama.cpp's -fa (auto: where the device supports it; default)")


def _add_engine_flags(p: argparse.ArgumentParser, budget: str, share: str, ctx: int, recall_tokens: int) -> None:
    """The flags chat and serve share: the model, the merge, the KV buffer, sampling. llama.cpp's
    names (llama-cli, llama-server, llama-mtmd-cli) first; this project's older long names stay as aliases."""
    p.add_argument("-m", "--model", help="text model GGUF (default: the embedded Qwen2.5 Coder 0.5B Instruct)")
    p.add_argument("--mmproj", help="vision projector GGUF")
    p.add_argument("-hf", "--hf", dest="hf", metavar="USER/REPO[:QUANT]",
                   help="a Hugging Face repo: its GGUF with that quant tag (default Q4_K_M) and its mmproj, as llama.cpp")
    p.add_argument("--hf-repo", help="Hugging Face repo to take the model from (with --hf-file)")
    p.add_argument("--hf-file", help="the model GGUF in --hf-repo")
    p.add_argument("--hf-mmproj", help="the mmproj GGUF in --hf-repo")
    p.add_argument("--method", default="flowmm",
                   help=f"flowmm (default), or one of: {', '.join(n for n in registry.known_names() if n != 'flowmm')}")
    p.add_argument("--budget", default=budget,
                   help=f"cells each conversation keeps after a merge: a ratio of {share} ({budget}, default), a count "
                        f"(512) or a size (24MiB)")
    p.add_argument("--policy", default="auto",
                   help="a policy file from `calibrate` (FlowMM's per-layer modes and importance predictor); "
                        "'auto' (default): the one the package ships for this model, if any; 'none': no policy")
    p.add_argument("--schedule", choices=[k.replace("_", "-") for k in merge_schedule.SCHEDULES], default="reply-first",
                   help="reply-first (default): a turn that fits the free room is answered from the whole cache and "
                        "merged after the reply, while you read; blocking: merged before the reply")
    p.add_argument("--recall", type=int, default=recall_tokens, metavar="N",
                   help=f"tokens of earlier text a user turn may re-read: the sentences it names that merges folded "
                        f"away, quoted in the turn before its text (default {recall_tokens}; 0: off)")
    p.add_argument("-ctk", "--cache-type-k", "--kv-type", dest="kv_type", default="f16", choices=["f16", "q8_0", "q4_0"],
                   help="KV cache type (K and V share it: -ctv must match)")
    p.add_argument("-ctv", "--cache-type-v", dest="kv_type_v", choices=["f16", "q8_0", "q4_0"],
                   help="V cache type; must equal -ctk")
    p.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=int, default=ctx,
                   help=f"KV buffer in cells, allocated once (default {ctx})")
    p.add_argument("-t", "--threads", type=int, default=None)
    _add_flash_attn(p)
    _add_placement_flags(p)
    p.add_argument("-n", "--n-predict", "--max-tokens", dest="max_tokens", type=int, default=256, help="longest reply")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy, default)")
    p.add_argument("--top-k", type=int, default=40, help="top-k sampling (<= 0: off; default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p sampling (1.0: off; default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p sampling (0.0: off; default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty on the last 64 tokens (1.0: off, default)")
    p.add_argument("-s", "--seed", type=int, default=0, help="sampling seed (-1: random)")
    p.add_argument("--chat-template", help="one of llama.cpp's template names (chatml, llama2, vicuna, gemma, "
                   "llama3, ...) or a Jinja file (default: the GGUF's own; without one, vicuna for a llama model "
                   "with an mmproj, else chatml)")


def _add_placement_flags(p: argparse.ArgumentParser) -> None:
    """Where the layers and their KV cache live, as llama.cpp's tools say it."""
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="gpu_layers", type=int, default=0,
                   help="layers to offload to the GPU backend (or to the --rpc servers)")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                   help="llama.cpp RPC servers whose devices take the -ngl layers and their KV cache")
    p.add_argument("-ts", "--tensor-split", default=None, metavar="N0,N1,...",
                   help="shares of the offloaded layers per device, in llama.cpp's device order (`info` lists it)")


def _placement(args: argparse.Namespace) -> dict:
    """runtime.Model's placement settings from the flags, with the --rpc servers' devices
    registered first (so -ngl can place layers on them)."""
    from .bindings import rpc, runtime

    rpc.add_servers(args.rpc)
    return dict(n_gpu_layers=args.gpu_layers, tensor_split=runtime.check_tensor_split(args.tensor_split))


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="python -m flowmm_edge",
                                 description="FlowMM KV-cache merging for multimodal GGUF models on llama.cpp")
    ap.add_argument("--version", action="version", version=f"flowmm-edge native {native.flowmm_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)

    p = sub.add_parser("chat", help="multi-turn chat with images and a bounded KV cache")
    _add_engine_flags(p, budget="0.25", share="--ctx", ctx=4096, recall_tokens=recall.DEFAULT_TOKENS)
    p.add_argument("-sys", "--system-prompt", dest="system_prompt", default=None,
                   help="the system message (default: a short 'answer briefly' one; '' for none)")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--image", action="append", help="an image for --prompt or the first message (repeatable)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("-j", "--json-schema", help="every reply is JSON valid against this schema (JSON text or a "
                                                  "file), as llama-cli's --json-schema")
    form.add_argument("--grammar-file", type=Path, help="every reply follows this GBNF grammar (root rule 'root')")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible server; its conversations share one merged KV buffer")
    # off in serve by default: a client's messages reach the model as it sent them
    _add_engine_flags(p, budget="0.5", share="a slot's share, --ctx / --parallel", ctx=8192, recall_tokens=0)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("-np", "--parallel", type=int, default=4, help="slots: conversations held at once (default 4)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request but /health")
    p.add_argument("--allowed-local-media", metavar="DIR", default=None,
                   help="also read image_url paths (or file:// URLs) under DIR, symlinks resolved (default: data URLs only)")
    p.add_argument("--max-image-bytes", type=at_least(1), default=MAX_IMAGE_BYTES,
                   help="largest image a request may carry or name, in bytes (default 20 MiB, as OpenAI's)")
    p.add_argument("--max-prompt-tokens", type=at_least(1), default=None,
                   help="a request whose messages tokenize to more is refused with 400 before any work "
                        "(default: 8 slot shares, 8 x --ctx / --parallel)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds a request may take from arrival to its last token; past it, 408 (default: none)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("calibrate", help="write a per-layer merging policy for a model")
    p.add_argument("-m", "--model", help="text model GGUF (default: the embedded model)")
    p.add_argument("--mmproj", help="vision projector GGUF: calibrate on images")
    p.add_argument("--prompts", help="JSONL of {\"segments\": [...]} prompts (default: a small built-in set)")
    p.add_argument("--out", required=True, type=output_file, help="the policy JSON to write")
    p.add_argument("--theta", type=float, default=0.25, help="cross-modal threshold on rho (default 0.25, the paper's range 0.2-0.3)")
    p.add_argument("-t", "--threads", type=at_least(1), default=None)
    _add_flash_attn(p)
    _add_placement_flags(p)
    p.add_argument("--distill", type=at_least(0), default=0, metavar="N",
                   help="also distil the repeat pass into an importance predictor on N documents of the built-in "
                        "corpus (docs/METHOD.md, 'Learned importance'; 0: no predictor)")
    p.add_argument("--distill-tokens", type=at_least(256), default=2048, help="tokens per distillation document")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("bench", help="KV memory and speed, side by side")
    p.add_argument("-m", "--model", help="text model GGUF, or 'tiny' / 'llava-1.5-7b' for the synthetic ones (default: the embedded model)")
    p.add_argument("--lengths", default="1024,2048,4096", help="context lengths in tokens")
    p.add_argument("--budgets", default="0.05,0.1,0.2,0.35,0.5")
    p.add_argument("--methods", default="streaming,h2o,snapkv,lookm,flowmm",
                   help=f"comma-separated, of: {', '.join(registry.known_names())}")
    p.add_argument("--kv-types", default="f16,q8_0,q4_0")
    p.add_argument("--combos", default="flowmm:q8_0", type=_combos,
                   help="METHOD:KV pairs also run on a quantized cache (of --kv-types), comma-separated, or none "
                        "(default flowmm:q8_0)")
    p.add_argument("--decode", type=at_least(1), default=32, help="tokens decoded after each merge")
    p.add_argument("--policy", default="auto",
                   help="a policy file for flowmm; 'auto' (default): the one the package ships for the model, if "
                        "any; 'none'")
    p.add_argument("-t", "--threads", type=at_least(1), default=None)
    _add_flash_attn(p)
    _add_placement_flags(p)
    p.add_argument("--json", type=output_file, help="write the rows as JSON")
    p.add_argument("--markdown", type=output_file, help="write the table as Markdown")
    p.add_argument("--plot", type=output_file, help="write a PNG: KV memory and decode speed against context length")
    p.add_argument("--stock-lib", default="auto", type=_stock_lib,
                   help="folder of the stock llama.cpp's libllama timed against this build (default auto: the one "
                        "'python scripts/build_native.py --stock' builds, if built; none: leave it out)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="answer quality of the methods against the full cache")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tasks", help="JSONL task file")
    src.add_argument("--milebench", help="MileBench DATA folder (<Task>/<Task>.json + images)")
    src.add_argument("--suite", choices=["ruler", "builtin"], default="ruler",
                     help="a generated suite: the RULER-style families (default) or the original planted facts")
    p.add_argument("--question", choices=["after", "inside", "followup", "followup-idle"], default="after",
                   help="when the question meets the compressed cache: decoded after the context was compressed "
                        "(default), inside the compressed prompt, or in later chat turns through the real session "
                        "(followup: each merged before the answer; followup-idle: chat's reply-first schedule with a "
                        "pause after each reply for the idle merge, which takes the predictor where one exists, else the "
                        "teacher)")
    p.add_argument("--idle-teacher", action="store_true",
                   help="followup-idle: the idle merges take the teacher (the repeat pass) where a predictor exists "
                        "(chat's default is the predictor)")
    p.add_argument("--recall", type=int, default=0, metavar="N",
                   help="after, followup and followup-idle: each question re-reads up to N tokens of the sentences it names that the "
                        "merge folded away, as chat's --recall does (default 0: off); each compressed method then "
                        "merges to its budget less N cells, so the cache that answers holds no more than the budget")
    p.add_argument("-m", "--model", help="text model GGUF (default: the embedded model)")
    p.add_argument("--mmproj", help="vision projector GGUF for tasks with images")
    p.add_argument("--families", default=",".join(KEPT_FAMILIES),
                   help=f"families to generate: RULER-style (of {', '.join(ALL_FAMILIES)}; default: those the "
                        f"default model answers with the full cache, docs/RESULTS.md) or with the answer in glyph "
                        f"page images ({', '.join(IMAGE_FAMILIES)}; --mmproj defaults to the model's glyph projector)")
    p.add_argument("--lengths", default="2048", help="context lengths (tokens) of the generated suite, e.g. 2048,4096,8192")
    p.add_argument("--per-kind", "--per-family", type=at_least(1), default=2,
                   help="tasks per family and length in the generated suite")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated suite")
    p.add_argument("--by-family", action="store_true", help="also print, per budget, a table of families by methods")
    p.add_argument("--methods", default="flowmm,flowmm:no-flow,flowmm:no-sensitivity,flowmm:no-both,lookm,snapkv,h2o,streaming",
                   help=f"comma-separated, of: {', '.join(registry.known_names())}")
    p.add_argument("--budgets", default="0.2")
    p.add_argument("--policy", default="auto",
                   help="a policy file from `calibrate` for flowmm; 'auto' (default): the one the package ships for "
                        "the model, if any; 'none'")
    p.add_argument("-ctk", "--cache-type-k", "--kv-type", dest="kv_type", default="f16", choices=["f16", "q8_0", "q4_0"])
    p.add_argument("--limit", type=at_least(1), default=None, help="at most this many tasks")
    p.add_argument("-t", "--threads", type=at_least(1), default=None)
    _add_flash_attn(p)
    _add_placement_flags(p)
    p.add_argument("--json", type=output_file, help="write rows and summary as JSON (after every task)")
    p.add_argument("--markdown", type=output_file, help="write the tables as Markdown")
    p.add_argument("--plot", type=output_file, help="write a PNG: score against budget per method")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("glyph", help="the glyph projector for a text model, and pages it reads (docs/GLYPH.md)")
    p.add_argument("--text-model", type=Path, default=None, help="text model GGUF (default: the embedded default model)")
    p.add_argument("--out", type=Path, default=None, help="mmproj file to write (default: the cache, written once)")
    p.add_argument("--bits", type=int, default=glyph.BITS, help=f"bits per code: 2**bits tokens (default {glyph.BITS})")
    p.add_argument("--grid", type=int, default=glyph.GRID,
                   help=f"patches per side: grid**2 tokens a page (default {glyph.GRID})")
    p.add_argument("--mmproj", type=Path, default=None, help="render with this glyph mmproj (default: the one above)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--render", metavar="TEXT", help="render TEXT as page PNGs")
    src.add_argument("--render-file", type=Path, metavar="FILE", help="render a file's text as page PNGs")
    p.add_argument("--png", type=Path, default=Path("glyph.png"), help="first page (later ones: NAME-2.png, ...)")
    p.set_defaults(func=cmd_glyph)

    p = sub.add_parser("info", help="native library, backend and model facts")
    p.add_argument("-m", "--model", help="a text model GGUF to describe (default: the embedded model, if assembled)")
    p.add_argument("--mmproj", help="a vision projector GGUF to describe")
    _add_placement_flags(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("rpc-server", help="serve this machine's CPU as a llama.cpp RPC device (llama.cpp's rpc-server)")
    p.add_argument("-H", "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("-p", "--port", type=int, default=50052, help="port (default 50052, as llama.cpp's rpc-server)")
    p.add_argument("-t", "--threads", type=at_least(1), default=None, help="CPU threads (default: all cores)")
    p.set_defaults(func=cmd_rpc_server)
    return ap


def cmd_rpc_server(args: argparse.Namespace) -> int:
    from .bindings import rpc

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: ggml-rpc has no authentication or encryption; "
              "anyone who reaches the port can use this machine's memory and compute", file=sys.stderr)
    if not 0 < args.port < 65536:
        raise FlowMMError(f"-p/--port must be from 1 to 65535, not {args.port}")
    endpoint = f"{args.host}:{args.port}"
    print(f"rpc-server: this machine's CPU backend at {endpoint} ({args.threads or os.cpu_count()} threads); "
          f"clients: --rpc {endpoint}", file=sys.stderr)
    rpc.serve(endpoint, args.threads)
    return 0


def cmd_glyph(args: argparse.Namespace) -> int:
    """The glyph projector for a text model (written once into the cache, or to --out); with
    --render, a text as page PNGs it reads exactly (docs/GLYPH.md)."""
    from .bindings import runtime

    text_model = args.text_model or default_model.ensure()
    try:
        if args.mmproj is not None:
            mmproj = args.mmproj
        elif args.out is not None:
            mmproj = glyph.write_mmproj(text_model, args.out, bits=args.bits, grid=args.grid)
            print(mmproj)
        else:
            mmproj = glyph.ensure(text_model, bits=args.bits, grid=args.grid)
            print(mmproj)
        if args.render is not None or args.render_file is not None:
            runtime.quiet_native_logs()
            text = args.render if args.render is not None else args.render_file.read_text(encoding="utf-8")
            book = glyph.Codebook.load(mmproj)
            with runtime.Model(text_model) as model:
                tokens = book.tokenize(text, model)
            for k, page in enumerate(book.pages(tokens)):
                out = args.png if k == 0 else args.png.with_name(f"{args.png.stem}-{k + 1}{args.png.suffix}")
                out.write_bytes(book.render(page))
                print(f"{out}: {len(page)} tokens")
    except (glyph.GlyphError, OSError) as e:
        raise FlowMMError(str(e)) from None
    return 0


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
