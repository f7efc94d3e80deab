"""The `mixer-compile` command line: thin subcommands over the library modules.

`mixer-compile --spec X --target Y -o DIR` (no subcommand) is `compile`. Errors from user
input (MixerCompileError) are printed as one line, `error: ...`, with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from mixer_compile.errors import MACHINE_FIXES, MixerCompileError
from mixer_compile.util.interrupt import SIGNALS

DEFAULT_SPEC = "mixer_b16"
SUBCOMMANDS = ("compile", "specs", "show", "targets", "export-onnx", "import-onnx", "resize-weights", "viz", "report", "tune")


def _spec_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_SPEC, ranges: bool = False,
               from_weights: bool = False) -> None:
    if from_weights:  # _load_spec reads the spec off --weights when --spec is not given
        p.add_argument("--spec", type=_path,
                       help="preset name or .toml/.json spec file (default: read off the shapes of "
                            f"--weights, else {DEFAULT_SPEC})")
    else:
        p.add_argument("--spec", type=_path, default=default,
                       help=f"preset name or .toml/.json spec file (default {default})")
    if ranges:
        p.add_argument("--batch", type=_batch, help="batch size the module is built for, or a range MIN-MAX that "
                                                    "one artifact serves (e.g. 1-16; default: the spec's, 1)")
    else:
        p.add_argument("--batch", type=_at_least(1), help="batch size the module is built for (default: the spec's, 1)")
    p.add_argument("--gelu", choices=("tanh", "erf"),
                   help="GELU flavour; default: from the weights (timm: erf, .npz: tanh, random: tanh)")


def _batch(text: str) -> tuple[int, int]:
    """N or MIN-MAX (1 <= MIN <= MAX); the compile driver says what is too large."""
    parts = text.split("-")
    if 1 <= len(parts) <= 2 and all(part.strip().isdigit() for part in parts):
        low, high = int(parts[0]), int(parts[-1])
        if 1 <= low <= high:
            return low, high
    raise argparse.ArgumentTypeError(f"expected a batch size N >= 1 or a range MIN-MAX with 1 <= MIN <= MAX "
                                     f"(e.g. 8 or 1-16), got '{text}'")


def _path(text: str) -> str:
    """A path argument: `~` expanded (as a shell does unquoted), an empty one refused (an unset
    shell variable would otherwise mean the default, or the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
    path = os.path.expanduser(text)
    try:
        Path(path).resolve()
    except RuntimeError:  # a symlink loop before Python 3.13: raised as 3.13 does, for main to say
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
    return path


def _at_least(low: int) -> Callable[[str], int]:
    """An integer option's type that refuses values under `low`, as argparse does a bad choice."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got '{text}'")
        return value
    return parse


def _load_spec(args: argparse.Namespace):
    from mixer_compile.model.spec import load_spec

    batch = args.batch[1] if isinstance(args.batch, tuple) else args.batch
    if args.spec is None and getattr(args, "weights", None):  # the checkpoint's own configuration
        from mixer_compile.frontends.torch_module import checkpoint_spec

        return checkpoint_spec(args.weights, gelu=args.gelu, batch=batch or 1)
    return load_spec(args.spec or DEFAULT_SPEC, batch=batch, gelu=args.gelu)


def _code_for(target: dict) -> list[str]:
    """What the code was built for, beyond the target's name: the CPU and the cores its
    parallel loops are split for, or the GPU's architecture where the name is not it and the
    CPU its host code runs on; for a host CPU, the features its name implies and this machine
    hides (target.py, `mcpu: host`)."""
    config = target["config"]
    if config.get("mcpu"):
        hidden = [str(f)[1:] for f in config.get("mattr") or [] if str(f).startswith("-")]
        return [config["mcpu"] + (f" without {'/'.join(hidden)}" if hidden else "")] + \
            ([f"{config['num-cores']} cores"] if config.get("num-cores") else [])
    host = config.get("host") if isinstance(config.get("host"), dict) else {}
    return ([config["arch"]] if config.get("arch", target["name"]) != target["name"] else []) + \
        ([f"{host['mcpu']} host"] if host.get("mcpu") else [])


def cmd_compile(args: argparse.Namespace) -> int:
    from mixer_compile.compiler import CompileOptions, compile_model

    spec = _load_spec(args)
    name = spec.fingerprint()
    if isinstance(args.batch, tuple) and args.batch[0] != args.batch[1]:
        name = name.replace(f"-b{spec.batch}-", f"-b{args.batch[0]}-{args.batch[1]}-")
    out = Path(args.output) if args.output else Path("out") / name
    if args.trials is not None and not args.tune:
        print("warning: --trials has no effect without --tune", file=sys.stderr)
    if args.choose_form and args.form:
        raise MixerCompileError(f"--choose-form builds and times every form, so --form {args.form} would be ignored; "
                                "give one of them")
    opts = CompileOptions(spec=spec, target=args.target, weights=Path(args.weights) if args.weights else None,
                          seed=args.seed, form=args.form or CompileOptions.form, dtype=args.dtype, embed_weights=args.embed_weights, out_dir=out,
                          tune=args.tune, trials=args.trials or CompileOptions.trials, db=Path(args.db) if args.db else None,
                          choose_form=args.choose_form, batches=args.batch)
    r = compile_model(opts)
    s = r.spec
    batch = f"batches {r.metadata.batch['min']}-{r.metadata.batch['max']}" if r.metadata.batch else f"batch {s.batch}"
    print(f"compiled {s.name} ({s.image_size[0]}x{s.image_size[1]}, patch {s.patch_size}, {batch}, "
          f"{s.resolved_gelu} GELU) for {r.metadata.target['name']} "
          f"[{', '.join(_code_for(r.metadata.target) + [r.metadata.precision['dtype']])}]")
    print(f"  params     {s.param_count():,}   {s.flops_per_image() / 1e9:.2f} GFLOP/image")
    print(f"  weights    {r.metadata.weights}")
    print(f"  validation {r.validation.summary()}")
    if r.metadata.batch:
        checked = [v["batch"] for v in r.metadata.validation.get("batches", [])] or [r.validation.batch]
        print(f"  batches    {r.metadata.batch['min']}-{r.metadata.batch['max']} served by entries "
              f"{', '.join(map(str, r.metadata.batch['entries']))} (validated at batch "
              f"{', '.join(map(str, checked))})")
    if r.metadata.tuning:
        t = r.metadata.tuning
        print(f"  schedules  {t['kernels']} kernels: {len(t['tuned'])} from records, {len(t.get('defaults', []))} "
              f"default, {len(t['untuned'])} unscheduled; " + (f"records from {', '.join(t['databases'])}"
              if t["databases"] else "no tuning records for this target (`mixer-compile tune` refines the defaults)"))
        if "form_choice" in t:
            print("  form       " + ", ".join(f"{f} {d['ms']:.2f} ms" if d["ms"] is not None else f"{f} not timed"
                                          for f, d in t["form_choice"]["figures"].items())
                  + f" -> {t['form_choice']['chosen']}")
    print("  timings    " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))
    print(f"  artifact   {r.artifact}  (load with mixer_compile.runtime.load)")
    return 0


def cmd_specs(args: argparse.Namespace) -> int:
    from mixer_compile.model.spec import PRESETS

    print(f"{'preset':<10} {'image':>7} {'patch':>5} {'C':>5} {'D_S':>5} {'D_C':>5} {'blocks':>6} "
          f"{'S':>4} {'params':>12} {'GFLOP/img':>9}")
    for s in PRESETS.values():
        print(f"{s.name:<10} {s.image_size[0]:>7} {s.patch_size:>5} {s.hidden_dim:>5} {s.tokens_mlp_dim:>5} "
              f"{s.channels_mlp_dim:>5} {s.num_blocks:>6} {s.tokens:>4} {s.param_count():>12,} "
              f"{s.flops_per_image() / 1e9:>9.2f}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from mixer_compile.backend.target import get_target
    from mixer_compile.compose import target_graph
    from mixer_compile.ir import build_graph, to_text

    spec = _load_spec(args)
    if args.after == "none":
        graph, reports = build_graph(spec), []
    else:  # exactly the graph a build for the target lowers
        graph, reports = target_graph(spec, get_target(args.target), args.form, args.dtype, args.after)
    for r in reports:
        print("// " + r.summary())
    print(to_text(graph))
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from mixer_compile.backend.target import known_targets

    for name, data in known_targets().items():
        aliases = f" (aliases: {', '.join(data['aliases'])})" if data.get("aliases") else ""
        print(f"{name:<10} {data.get('description', '')}{aliases}")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from mixer_compile.tools.export_onnx import export_onnx

    r = export_onnx(_load_spec(args), Path(args.output), Path(args.weights) if args.weights else None,
                    seed=args.seed, form=args.form)
    print(f"exported {r.spec.fingerprint()} ({r.form} form, dynamic batch) to {r.path}")
    print("  nodes      " + ", ".join(f"{k} {v}" for k, v in sorted(r.node_counts.items())))
    for v in r.validations:
        print(f"  onnxruntime batch {v.batch}: {v.summary()}")
    return 0


def cmd_import_onnx(args: argparse.Namespace) -> int:
    from mixer_compile.tools.import_onnx import compile_onnx

    r = compile_onnx(Path(args.model), Path(args.output), target=args.target, form=args.form, batch=args.batch)
    s = r.imported.spec
    print(f"imported {args.model}: {s.num_blocks} blocks, {s.image_size[0]}x{s.image_size[1]}, patch {s.patch_size}, "
          f"C {s.hidden_dim}, D_S {s.tokens_mlp_dim}, D_C {s.channels_mlp_dim}, {s.num_classes} classes, "
          f"{s.resolved_gelu} GELU")
    print(f"  checkpoint {r.checkpoint}  spec {r.spec_file}")
    if s.resolved_gelu == "erf":  # a .npz read without a spec is taken for the official JAX weights (tanh)
        print(f"  (use them together, --spec {r.spec_file} --weights {r.checkpoint}: the spec says erf GELU)")
    print(f"  recognised model vs onnxruntime: {r.recognition.summary()}")
    print(f"  compiled vs reference:           {r.compiled.validation.summary()}")
    print(f"  compiled vs onnxruntime:         "
          f"{r.against_onnx.summary() if r.against_onnx else 'not run here (a build for another machine)'}")
    print(f"  artifact   {r.compiled.artifact}")
    return 0


def _image_size(text: str) -> tuple[int, int]:
    from mixer_compile.errors import SpecError

    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SpecError(f"--image-size must be N or HxW (e.g. 448 or 448x672), got '{text}'")
    return int(parts[0]), int(parts[-1])


def cmd_resize_weights(args: argparse.Namespace) -> int:
    from mixer_compile.frontends.resize import resize_checkpoint

    spec = _load_spec(args)
    given = Path(args.spec) if args.spec and Path(args.spec).is_file() else None
    large, spec_file = resize_checkpoint(Path(args.weights), spec, _image_size(args.image_size), Path(args.output),
                                         given)
    k = large.tokens // spec.tokens
    print(f"resized {args.weights} from {spec.image_size[0]}x{spec.image_size[1]} to "
          f"{large.image_size[0]}x{large.image_size[1]}: S {spec.tokens} -> {large.tokens}, "
          f"D_S {spec.tokens_mlp_dim} -> {large.tokens_mlp_dim} ({k} block-diagonal copies)")
    print(f"  weights {args.output}  spec {spec_file}")
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from mixer_compile.tools.viz import assemble, save_picture, token_mixing_units
    from mixer_compile.frontends import load_weights

    spec = _load_spec(args)
    weights, _ = load_weights(Path(args.weights), spec)
    units = token_mixing_units(weights, spec, args.block, args.units)
    picture, _, columns = assemble(units, spec.grid, args.columns)
    height, width = save_picture(picture, args.output, args.scale)
    rows = -(-units.shape[1] // columns)
    of_all = f" (all the block has; --units asked for {args.units})" if units.shape[1] < args.units else ""
    print(f"drew {units.shape[1]} token-mixing units of block {args.block}{of_all} ({spec.grid[0]}x{spec.grid[1]} "
          f"each, {rows}x{columns} tiles, {width}x{height} px) to {args.output}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mixer_compile.backend.target import get_target
    from mixer_compile.tools.report import write_report
    from mixer_compile.tools.report.compare import estimate_lines

    model = (_load_spec(args), args.form, args.dtype, get_target(args.target).config) if args.spec else None
    files = write_report(args.inputs, Path(args.output), model,
                         warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    c = files.comparison
    print(f"report on {len(c.logs)} input(s), {len(c.rows)} kernels ({len(c.missing())} not in every input)")
    for line in estimate_lines(c):
        print("  " + line)
    print(f"  {files.html}\n  {files.markdown}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from mixer_compile.backend.target import get_target
    from mixer_compile.compose import model_tasks
    from mixer_compile.tune.database import open_database, user_db_dir
    from mixer_compile.tune.gemms import tune_model_gemms
    from mixer_compile.tune.search import tune

    spec, target = _load_spec(args), get_target(args.target)
    db_dir = Path(args.db) if args.db else user_db_dir(target)
    if args.ship_to:
        from mixer_compile.tune.ship import check_writable

        check_writable(Path(args.ship_to), target)
    runner = None
    if args.rpc_tracker or args.rpc_key:
        from mixer_compile.tune.fleet import parse_tracker, rpc_runner

        here = parse_tracker(args.rpc_tracker or "", args.rpc_key)
        runner = rpc_runner(here)
        print(f"measuring on the RPC tracker {here.address}, key {here.key}", file=sys.stderr)
    print(f"tuning {spec.fingerprint()} ({args.form}) for {target.name} [{target.config.get('mcpu') or target.config.get('arch', '')}], "
          f"{args.trials} trials per kernel, database {db_dir}", file=sys.stderr)
    batches = None
    if isinstance(args.batch, tuple) and args.batch[0] != args.batch[1]:  # every entry of the range
        from mixer_compile.artifact.format import BatchRange

        batches = BatchRange.of(*args.batch)
    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    # the library GEMMs first: measured on this machine's GPU (tune/gemms.py)
    gemm_records = tune_model_gemms(spec, target, args.form, args.dtype, batches, say) if runner is None else []
    tasks = model_tasks(spec, target, args.form, args.dtype, args.trials, batches)
    summary = tune(tasks, target, db_dir, say=say, runner=runner)
    print(f"tuned {spec.fingerprint()} for {target.name}: {summary.tuned_now} trials measured now, "
          f"{summary.seconds / 60:.1f} min; database {db_dir}")
    for line in summary.table(open_database(db_dir), target):
        print(line)
    if summary.interrupted:
        print("interrupted: every measured record is kept; run the same command again to resume", file=sys.stderr)
        return 130
    if args.ship_to:
        from mixer_compile.tune.ship import ship

        for line in ship(target, db_dir, Path(args.ship_to), [t.mod for t in tasks], gemm_records):
            print(f"shipped {line}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as ours: one line, `error: ...`, exit status 2 (not its usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def parser() -> argparse.ArgumentParser:
    from mixer_compile.passes.context import DTYPES
    from mixer_compile.passes.pipeline import FORMS

    top = _Parser(prog="mixer-compile", description="Compile MLP-Mixer models with TVM.")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile, validate and write an artifact (the default command)")
    _spec_args(p, ranges=True, from_weights=True)
    p.add_argument("--target", default="llvm", help="target name (see `mixer-compile targets`), default llvm")
    p.add_argument("--weights", type=_path, help="checkpoint: official .npz, or timm .pth/.safetensors")
    p.add_argument("--seed", type=_at_least(0), default=0, help="seed of the random init when no --weights (default 0)")
    p.add_argument("--form", choices=list(FORMS), help="IR form to lower (default matmul)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="weights and activations (sums stay float32; default float32)")
    p.add_argument("--embed-weights", action="store_true", help="bake the weights into the library")
    p.add_argument("-o", "--output", type=_path, help="artifact directory (default out/<spec fingerprint>)")
    p.add_argument("--tune", action="store_true", help="tune the kernels that have no records first (CPU; slow)")
    p.add_argument("--trials", type=_at_least(1), help="with --tune: trials per large kernel (default 64)")
    p.add_argument("--db", type=_path, help="tuning database directory (default: the user cache); shipped records are "
                               "merged in, the best record of each kernel wins")
    p.add_argument("--choose-form", action="store_true",
                   help="build every IR form (matmul, conv), time each here, keep the fastest (CPU; "
                        "builds the model once per form; default: --form)")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("specs", help="list the presets with parameter counts and GFLOPs")
    p.set_defaults(fn=cmd_specs)

    p = sub.add_parser("show", help="print the IR of a spec, optionally after a pass")
    _spec_args(p)
    p.add_argument("--target", default="llvm", help="the target whose build to show (default llvm, the host CPU)")
    p.add_argument("--form", choices=list(FORMS), default="matmul")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="precision (default float32)")
    p.add_argument("--after", default=None, help="stop after this pass ('none' for the literal graph)")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("targets", help="list the named targets")
    p.set_defaults(fn=cmd_targets)

    p = sub.add_parser("export-onnx", help="export the (conv or matmul) IR form to ONNX, validated in ONNX Runtime")
    _spec_args(p, from_weights=True)
    p.add_argument("--weights", type=_path,
                   help="checkpoint: official .npz, or timm .pth/.safetensors (default: random init)")
    p.add_argument("--seed", type=_at_least(0), default=0, help="seed of the random init when no --weights (default 0)")
    p.add_argument("--form", choices=list(FORMS), default="conv", help="IR form to export (default conv)")
    p.add_argument("-o", "--output", type=_path, required=True, help="the .onnx file to write")
    p.set_defaults(fn=cmd_export_onnx)

    p = sub.add_parser("import-onnx", help="compile a Mixer given as an ONNX file (recognised into spec + weights)")
    p.add_argument("model", type=_path, help="the .onnx file (e.g. a timm MlpMixer exported with torch.onnx.export)")
    p.add_argument("--target", default="llvm", help="target name (see `mixer-compile targets`), default llvm")
    p.add_argument("--form", choices=list(FORMS), default="matmul", help="IR form to lower (default matmul)")
    p.add_argument("--batch", type=_at_least(1), help="batch to build for when the file's batch is dynamic (default 1)")
    p.add_argument("-o", "--output", type=_path, required=True,
                   help="artifact directory; the recognised checkpoint and spec go beside it as DIR.npz, DIR.json")
    p.set_defaults(fn=cmd_import_onnx)

    p = sub.add_parser("resize-weights", help="expand a checkpoint to a higher resolution (paper, Appendix C)")
    _spec_args(p, from_weights=True)
    p.add_argument("--weights", type=_path, required=True, help="checkpoint: official .npz, or timm .pth/.safetensors")
    p.add_argument("--image-size", required=True, help="new image size, N or HxW, an integer multiple of the spec's")
    p.add_argument("-o", "--output", type=_path, required=True,
                   help="new checkpoint (same format); its spec goes beside as .json")
    p.set_defaults(fn=cmd_resize_weights)

    p = sub.add_parser("viz", help="draw the first token-mixing units' input weights (paper, section 3.4)")
    _spec_args(p, from_weights=True)
    p.add_argument("--weights", type=_path, required=True, help="checkpoint: official .npz, or timm .pth/.safetensors")
    p.add_argument("--block", type=_at_least(0), default=0, help="which block's token-mixing MLP (default 0)")
    p.add_argument("--units", type=_at_least(1), default=64, help="how many units, from the first (default 64)")
    p.add_argument("--columns", type=_at_least(1), help="tiles per row (even; default about square)")
    p.add_argument("--scale", type=_at_least(1), default=8, help="pixels per weight (default 8)")
    p.add_argument("-o", "--output", type=_path, required=True, help="the .png file to write")
    p.set_defaults(fn=cmd_viz)

    p = sub.add_parser("report", help="compare tuning logs (databases or artifacts): HTML page + Markdown summary")
    p.add_argument("inputs", type=_path, nargs="+", metavar="DB_OR_ARTIFACT",
                   help="MetaSchedule database directories or artifact directories; the first is the baseline")
    p.add_argument("-o", "--output", type=_path, required=True, help="report directory (report.html, report.md)")
    _spec_args(p, default=None)
    p.add_argument("--form", choices=list(FORMS), default="matmul", help="IR form of --spec (default matmul)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="precision of --spec (default float32)")
    p.add_argument("--target", default="llvm", help="target --spec was tuned for (default llvm)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("tune", help="tune the kernels of a spec with MetaSchedule into a database (resumable)")
    _spec_args(p, ranges=True)
    p.add_argument("--target", default="llvm", help="target name (see `mixer-compile targets`), default llvm")
    p.add_argument("--form", choices=list(FORMS), default="matmul", help="IR form to tune (default matmul)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="precision (default float32)")
    p.add_argument("--trials", type=_at_least(1), default=64,
                   help="trials per large kernel; small kernels get a quarter (default 64)")
    p.add_argument("--db", type=_path, help="database directory (default: the user cache, "
                               "$MIXER_COMPILE_CACHE/tuning/<target> or ~/.cache/mixer-compile/tuning/<target>)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="measure on the devices of this TVM RPC tracker (builds stay local)")
    p.add_argument("--rpc-key", metavar="KEY", help="with --rpc-tracker: the key the RPC servers registered under")
    p.add_argument("--ship-to", type=_path, metavar="DIR",
                   help="when tuning is done, merge the best record of each of this model's kernels into this "
                        "schedules tree (a checkout's schedules/: the records the wheel ships)")
    p.set_defaults(fn=cmd_tune)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with _noting_interrupts() as interrupts:  # from the first instant: a Ctrl-C while modules load is one line too
        try:
            return _run(argv)
        except MixerCompileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # the reader went away (`mixer-compile specs | head -1`): stop quietly, as cat does
            _stdout_to_devnull()
            return 141
        except KeyboardInterrupt:
            return _interrupted(interrupts)
        except OSError as exc:
            if exc.errno not in MACHINE_FIXES:
                raise
            print(f"error: {exc.filename or 'writing the output'}: {exc.strerror}; {MACHINE_FIXES[exc.errno]}",
                  file=sys.stderr)
            _stdout_to_devnull()  # stdout may be what failed: nothing more to flush at exit
            return 2
        except Exception:
            # a Ctrl-C inside TVM's C++ (a build) comes out as a TVM error, not a KeyboardInterrupt
            if interrupts:
                return _interrupted(interrupts)
            raise


def _run(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        # compile, the default command, takes no positional argument: a word here is a mistyped command
        near = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1)
        print(f"error: unknown command '{argv[0]}'; " + (f"did you mean '{near[0]}'?" if near else
              f"the commands are {', '.join(SUBCOMMANDS)} (see `mixer-compile --help`)"), file=sys.stderr)
        return 2
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv.insert(0, "compile")
    args = parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    return args.fn(args)



def _stdout_to_devnull() -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _interrupted(signals: list[int]) -> int:
    """The exit of a run stopped by a signal: one line, and 128 + its number, as a shell reports it."""
    last = signals[-1] if signals else signal.SIGINT
    print("interrupted" + ("" if last == signal.SIGINT else f" ({signal.Signals(last).name})"), file=sys.stderr)
    return 128 + last


@contextlib.contextmanager
def _noting_interrupts() -> Iterator[list[int]]:
    """Ctrl-C, and SIGTERM (what `timeout`, `kill` and CI runners send), raise KeyboardInterrupt,
    so that every `finally` runs (no staging directory left beside `-o`), and are noted in the
    list it yields, so that main can tell the error a signal became inside TVM from a real
    failure. (The tuner takes both over while it searches: util/interrupt.py.)"""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def note(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, note) for s in SIGNALS}
    try:
        yield seen
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
