"""`tensorgate build`: writes the bundled models into a model repository (the artifacts built from
code with fixed seeds, byte-identical each time), and optionally TensorRT plans of them.

    tensorgate build                     # every bundled model into ./engines
    tensorgate build --out /srv/models   # another repository
    tensorgate build --only mlp          # one model
    tensorgate build --tensorrt          # also a TensorRT plan of each: <out>/<name>_trt/
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tensorgate.server.bundled import BENCH_MODELS, BUNDLED, STATEFUL, BuildError, build
from tensorgate.server.bundled.plans import build_plan

DEFAULT_OUT = Path("engines")


def add_build_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "build",
        help="write the bundled models into a model repository",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    add_build_arguments(parser)
    parser.set_defaults(func=run)


def add_build_arguments(parser: argparse.ArgumentParser, out: Path = DEFAULT_OUT) -> None:
    parser.add_argument(
        "--out", type=Path, default=out, help=f"model repository to fill (default: {out})"
    )
    parser.add_argument("--only", action="append", choices=BUNDLED, help="model to build")
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite config.toml (and model.py) files already there (default: keep them)",
    )
    parser.add_argument("--bench", action="store_true", help="also build the benchmark models")
    parser.add_argument("--tensorrt", action="store_true", help="also build TensorRT plans")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp16")
    parser.add_argument("--instances", type=int, default=2, help="optimization profiles")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument(
        "--no-version-compatible",
        dest="version_compatible",
        action="store_false",
        help="plans only the same TensorRT version can run (not the lean runtime)",
    )


def run(args: argparse.Namespace, prog: str = "tensorgate build") -> int:
    names: list[str] = list(args.only or BUNDLED)
    if args.bench:
        names += [name for name in BENCH_MODELS if name not in names]
    for i, name in enumerate(names, 1):
        written = build(name, args.out, force=args.force)
        if written.is_file():
            size = f"{written.stat().st_size / 1e6:.1f} MB"
            print(f"[{i}/{len(names)}] {name}: {written} ({size})", flush=True)
        else:
            files = ", ".join(sorted(p.name for p in written.iterdir()))
            print(f"[{i}/{len(names)}] {name}: {written} ({files})", flush=True)
    if not args.tensorrt:
        return 0
    for i, name in enumerate(names, 1):
        if (
            name in BENCH_MODELS
            or name in STATEFUL
            or not (args.out / name / "model.onnx").exists()
        ):
            continue
        try:
            plan = build_plan(
                name,
                args.out,
                precision=args.precision,
                instances=args.instances,
                batch=(args.min_batch, args.opt_batch, args.max_batch),
                version_compatible=args.version_compatible,
            )
        except BuildError as exc:
            print(f"{prog}: cannot build TensorRT plans: {exc}. The ONNX models were built.")
            return 2
        print(f"[{i}/{len(names)}] {name}_trt: {plan} ({plan.stat().st_size / 1e6:.1f} MB)")
    return 0


def main(argv: Sequence[str] | None = None, out: Path = DEFAULT_OUT, prog: str = "") -> int:
    """The builder as a program of its own (build_engines.py in a checkout)."""
    parser = argparse.ArgumentParser(prog=prog or None, description=__doc__.splitlines()[0])
    add_build_arguments(parser, out)
    return run(parser.parse_args(argv), prog or "tensorgate build")
