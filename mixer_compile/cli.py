"""The `mixer-compile` command line: thin subcommands over the library modules.

`mixer-compile --spec X --target Y -o DIR` (no subcommand) is `compile`. Errors from user
input (MixerCompileError) are printed as one line, `error: ...`, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixer_compile.errors import MixerCompileError

DEFAULT_SPEC = "mixer_b16"
SUBCOMMANDS = ("compile", "specs", "show", "targets")


def _spec_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_SPEC) -> None:
    p.add_argument("--spec", default=default, help=f"preset name or .toml/.json spec file (default {default})")
    p.add_argument("--batch", type=int, help="batch size the module is built for (default: the spec's, 1)")
    p.add_argument("--gelu", choices=("tanh", "erf"),
                   help="GELU flavour; default: from the weights (timm: erf, .npz: tanh, random: tanh)")


def _load_spec(args: argparse.Namespace):
    from mixer_compile.spec import load_spec

    return load_spec(args.spec, batch=args.batch, gelu=args.gelu)


def cmd_compile(args: argparse.Namespace) -> int:
    from mixer_compile.driver import CompileOptions, compile_model

    spec = _load_spec(args)
    out = Path(args.output) if args.output else Path("out") / spec.fingerprint()
    opts = CompileOptions(spec=spec, target=args.target, weights=Path(args.weights) if args.weights else None,
                          seed=args.seed, form=args.form, embed_weights=args.embed_weights, out_dir=out)
    r = compile_model(opts)
    s = r.spec
    print(f"compiled {s.name} ({s.image_size[0]}x{s.image_size[1]}, patch {s.patch_size}, batch {s.batch}, "
          f"{s.resolved_gelu} GELU) for {r.metadata['target']['name']} "
          f"[{r.metadata['target']['config'].get('mcpu', '')}]")
    print(f"  params     {s.param_count():,}   {s.flops_per_image() / 1e9:.2f} GFLOP/image")
    print(f"  weights    {r.metadata['weights']}")
    print(f"  validation {r.validation.summary()}")
    print("  timings    " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))
    print(f"  artifact   {r.artifact}  (load with mixer_compile.runtime.load)")
    return 0


def cmd_specs(args: argparse.Namespace) -> int:
    from mixer_compile.spec import PRESETS

    print(f"{'preset':<10} {'image':>7} {'patch':>5} {'C':>5} {'D_S':>5} {'D_C':>5} {'blocks':>6} "
          f"{'S':>4} {'params':>12} {'GFLOP/img':>9}")
    for s in PRESETS.values():
        print(f"{s.name:<10} {s.image_size[0]:>7} {s.patch_size:>5} {s.hidden_dim:>5} {s.tokens_mlp_dim:>5} "
              f"{s.channels_mlp_dim:>5} {s.num_blocks:>6} {s.tokens:>4} {s.param_count():>12,} "
              f"{s.flops_per_image() / 1e9:>9.2f}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from mixer_compile.ir import build_graph, to_text
    from mixer_compile.passes.pipeline import passes_for, run_passes

    names = () if args.after == "none" else passes_for(args.form, args.after)
    graph, reports = run_passes(build_graph(_load_spec(args)), names)
    for r in reports:
        print("// " + r.summary())
    print(to_text(graph))
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from mixer_compile.targets import known_targets

    for name, data in known_targets().items():
        aliases = f" (aliases: {', '.join(data['aliases'])})" if data.get("aliases") else ""
        print(f"{name:<10} {data.get('description', '')}{aliases}")
    return 0


def parser() -> argparse.ArgumentParser:
    from mixer_compile.passes.pipeline import FORMS

    top = argparse.ArgumentParser(prog="mixer-compile", description="Compile MLP-Mixer models with TVM.")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile, validate and write an artifact (the default command)")
    _spec_args(p)
    p.add_argument("--target", default="llvm", help="target name (see `mixer-compile targets`), default llvm")
    p.add_argument("--weights", help="checkpoint: official .npz, or timm .pth/.safetensors")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init when no --weights (default 0)")
    p.add_argument("--form", choices=list(FORMS), default="matmul", help="IR form to lower (default matmul)")
    p.add_argument("--embed-weights", action="store_true", help="bake the weights into the library")
    p.add_argument("-o", "--output", help="artifact directory (default out/<spec fingerprint>)")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("specs", help="list the presets with parameter counts and GFLOPs")
    p.set_defaults(fn=cmd_specs)

    p = sub.add_parser("show", help="print the IR of a spec, optionally after a pass")
    _spec_args(p)
    p.add_argument("--form", choices=list(FORMS), default="matmul")
    p.add_argument("--after", default=None, help="stop after this pass ('none' for the literal graph)")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("targets", help="list the named targets")
    p.set_defaults(fn=cmd_targets)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "compile")
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except MixerCompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
