"""Command line: `python -m scorelab validate PATH`, `python -m scorelab demo --params PATH --out DIR` and
`python -m scorelab with-local-ray [--params PATH] -- CMD...` (make run: dvc repro with one local Ray)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .config import ConfigError, Params, load_params, with_tuned_variant
from .layout import TUNED_VARIANT, Layout, stage_command
from .sde import describe_schedule


def _summary(path: str, params: Params) -> str:
    variants = ", ".join(f"{name} ({v.sde.type})" for name, v in params.variants.items())
    settings = sum(len(s.step_list()) for v in params.variants.values() for s in v.samplers)
    # Each schedule as the code reads it (DDPM's betas after the 1000/N scaling): a value meant another way
    # shows here, next to alpha(T), before anything is trained.
    schedules = [f"  {name} ({v.sde.type}): {describe_schedule(v.sde.build())}" for name, v in params.variants.items()]
    return "\n".join([f"{path}: valid — seed {params.seed}; {len(params.variants)} variant(s): {variants}; "
                      f"{settings} sampler settings", *schedules])


def print_problems(path: str, problems: list[str]) -> None:
    """Every problem of a params file to stderr, one a line, after a first line that names the file, the
    count and the first problem (its field and message): what a log or CI summary shows of the failure."""
    print(f"{path}: {len(problems)} problem(s); first: {problems[0]}" if problems else f"{path}: invalid",
          file=sys.stderr)
    for p in problems:
        print(p, file=sys.stderr)


def load_or_report(path: str, variant: str | None = None, root: str | Path = ".") -> Params | None:
    """Params, or None after printing every problem to stderr (callers exit 2). With `variant`, also
    refuse a variant the file does not define; variant `tuned` (the sweep's winner) is added from the tune
    stage's outputs/tune/best_variant.yaml under `root`. Shared by this CLI and the pipeline stage scripts."""
    try:
        params = load_params(path)
        if variant == TUNED_VARIANT and params.tune is not None and variant not in params.variants:
            winner = Layout(Path(root)).tuned_variant_file
            if not winner.is_file():
                print(f"--variant {TUNED_VARIANT}: {winner} not found; the tune stage writes it "
                      f"({stage_command('tune')}, or dvc repro)", file=sys.stderr)
                return None
            params = with_tuned_variant(params, winner)
    except ConfigError as e:
        print_problems(e.source or path, e.problems)
        return None
    if variant is not None and variant not in params.variants:
        valid = [*params.variants, *([TUNED_VARIANT] if params.tune is not None else [])]
        print(f"--variant {variant!r} is not in {path}; valid: {', '.join(valid)}", file=sys.stderr)
        return None
    return params


def _validate(args: argparse.Namespace) -> int:
    params = load_or_report(args.path)
    if params is None:
        return 2
    print(_summary(args.path, params))
    return 0


def _demo(args: argparse.Namespace) -> int:
    params = load_or_report(args.params)
    if params is None:
        return 2
    from .demo import run_demo  # lazy: torch-heavy, and `validate` must not need it

    run_demo(params, Path(args.out))
    return 0


def _with_local_ray(args: argparse.Namespace) -> int:
    import math
    import os
    import subprocess

    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    if not command:
        print("with-local-ray: no command given (usage: python -m scorelab with-local-ray -- dvc repro)",
              file=sys.stderr)
        return 2
    params = load_or_report(args.params)
    if params is None:
        return 2
    if params.ray.address or os.environ.get("RAY_ADDRESS"):  # the stages go to that cluster: nothing to share
        return subprocess.call(command)
    from .runtime import with_local_ray

    # The most any stage would give its own local Ray: training, the sweep's trials, the sampling tasks.
    tune = params.tune
    needed = max(float(os.cpu_count() or 1), params.ray.num_workers * params.ray.cpus_per_worker,
                 float(params.sample.workers),
                 math.ceil(tune.cpus_needed()) if tune is not None else 0.0)
    return with_local_ray(command, needed)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scorelab", description="Score-based generative models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a params file and list every problem in it")
    p.add_argument("path", help="params file, e.g. params.yaml")
    p.set_defaults(func=_validate)

    p = sub.add_parser("demo", help="run scorelab.demo.run_demo with these params")
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_demo)

    p = sub.add_parser("with-local-ray", help="run a command (dvc repro) whose stages share one local Ray, "
                                              "started and stopped here, instead of starting one each")
    p.add_argument("--params", default="params.yaml", help="params file: the CPUs the stages need (default: params.yaml)")
    p.add_argument("command_line", nargs=argparse.REMAINDER, help="-- and the command")
    p.set_defaults(func=_with_local_ray)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 invalid usage or params)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on usage errors; report its code instead
        return e.code if isinstance(e.code, int) else 2
    return args.func(args)
