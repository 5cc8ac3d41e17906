"""DVC stage `sample`: draw samples of one trained variant with each of its configured samplers.

    python pipeline/sample.py --params params.yaml --variant vp [--model outputs/train/vp/model.pt]
        [--out outputs/samples/vp] [--n N] [--seeds S ...] [--batch-size B] [--workers W]

n, seeds, batch size and workers come from the `sample:` section of params; the flags override them.
The samplers are those of the variant in params (they do not change the trained weights, so editing
them needs no retraining). Chunks run as Ray tasks on ray.address's cluster (else a local Ray), one
GPU each with ray.use_gpu (then sample.gpu_batch_size samples a chunk). Resumes an interrupted run: complete chunks are kept. Writes
<out>/<setting>/seed<k>/chunk-*.npz and manifest.json, <out>/<setting>/grid.png and <out>/summary.json
(format: scorelab.generate). Exit codes: 0 done, 2 invalid params or unknown variant, 1 missing or
mismatched model file, or sampling failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scorelab.checkpoint import CheckpointError
from scorelab.cli import load_or_report
from scorelab.failures import run_stage
from scorelab.generate import GenerateError, generate
from scorelab.layout import Layout, stage_command
from scorelab.rng import MAX_SEED
from scorelab.runtime import RuntimeSetupError
from scorelab.schema import show


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--model", default=None, help="default: outputs/train/<variant>/model.pt")
    parser.add_argument("--out", default=None, help="default: outputs/samples/<variant>")
    parser.add_argument("--n", type=int, default=None, help="samples per setting and seed (sample.n)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="sample.seeds")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per chunk, one Ray task (sample.batch_size)")
    parser.add_argument("--workers", type=int, default=None, help="Ray tasks in flight, 1 CPU each (sample.workers)")
    parser.add_argument("--root", default=".", help="repository root (default paths)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show a failure's traceback instead of one line")
    args = parser.parse_args(argv)
    return run_stage(f"sample {args.variant}", lambda: _run(args), debug=args.debug,
                     reading=f"model file {args.model or Layout(Path(args.root)).model(args.variant)}")


def _run(args: argparse.Namespace) -> int:
    params = load_or_report(args.params, args.variant, root=args.root)
    if params is None:
        return 2
    cfg = params.sample
    n = cfg.n if args.n is None else args.n
    seeds = list(cfg.seeds) if args.seeds is None else args.seeds
    batch_size = cfg.batch_size if args.batch_size is None else args.batch_size
    workers = cfg.workers if args.workers is None else args.workers
    if n < 1 or batch_size < 1 or workers < 1:
        print("--n, --batch-size and --workers must be >= 1", file=sys.stderr)
        return 2
    if not all(0 <= s <= MAX_SEED for s in seeds) or len(set(seeds)) != len(seeds):
        print(f"--seeds must be distinct integers in [0, {MAX_SEED}] (got {show(seeds)})", file=sys.stderr)
        return 2
    layout = Layout(Path(args.root))
    model = Path(args.model) if args.model else layout.model(args.variant)
    out = Path(args.out) if args.out else layout.samples(args.variant)
    if not model.is_file():
        print(f"sample {args.variant}: model file {model} not found; run the train stage first "
              f"({stage_command('train', args.variant)}, or dvc repro)", file=sys.stderr)
        return 1

    try:
        rows = generate(model, out, n_samples=n, seeds=seeds, batch_size=batch_size, num_workers=workers,
                        progress=not args.no_progress, variant=params.variants[args.variant],
                        address=params.ray.address, connect_timeout_s=params.ray.connect_timeout_s,
                        use_gpu=params.ray.use_gpu, gpu_batch_size=cfg.gpu_batch_size,
                        diverged_above=cfg.diverged_above, bf16=cfg.bf16)
    except (GenerateError, CheckpointError, RuntimeSetupError) as e:  # CheckpointError: an unreadable or
        # mismatched model file; RuntimeSetupError: no Ray cluster at ray.address
        print(f"sample {args.variant}: {e}", file=sys.stderr)
        return 1
    for key in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == key]
        nfes = [n for r in mine for n in (r["nfe"] if isinstance(r["nfe"], list) else [r["nfe"]])]
        nfe_text = str(nfes[0]) if len(set(nfes)) == 1 else f"{sum(nfes) / len(nfes):.0f} (mean per chunk)"
        drawn = sum(r["chunks_drawn"] for r in mine)
        reused = sum(r["chunks_reused"] for r in mine)
        diverged = [r for r in mine if r["diverged"]]
        warning = "" if not diverged else (
            f" DIVERGED in {len(diverged)} seed(s): max |x| " + ", ".join(
                "not finite" if r["max_abs"] is None else f"{r['max_abs']:.3g}" for r in diverged)
            + f" > sample.diverged_above = {cfg.diverged_above:g}; it will be reported, not scored")
        print(f"{key}: {len(mine)} seed(s) x {n} samples, NFE {nfe_text}, "
              f"{sum(r['seconds'] for r in mine):.2f}s sampling, {drawn} chunk(s) drawn, {reused} reused "
              f"-> {out / key}{warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
