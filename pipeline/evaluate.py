"""DVC stage `evaluate`: distances of one variant's samples to the test split, against NFE, with a
real-vs-real baseline at the same sample size and the model's bits/dim of test images.

    python pipeline/evaluate.py --params params.yaml --variant vp [--samples outputs/samples/vp]
        [--featurizer outputs/featurizer] [--model outputs/train/vp/model.pt] [--out outputs/eval/vp]
        [--root .] [--no-mlflow] [--bpd-samples N] [--probes K]

--bpd-samples and --probes override params.evaluate's values. Inception FID is computed when local weights
exist (params.evaluate.inception_weights, $SCORELAB_INCEPTION_WEIGHTS or the torch hub cache; nothing is
downloaded), and required when params.evaluate.require_inception is true.

The features, distances and likelihood are computed as one Ray task on the cluster of ray.address (or
$RAY_ADDRESS), on a GPU with ray.use_gpu; with no cluster named, in this process, without starting Ray.

Writes <out>/metrics.json (only once everything is computed) and <out>/fid_vs_nfe.csv (format:
scorelab.evaluate), and logs the distances at step = NFE, the baseline, bits/dim and the files into the
variant's MLflow training run. Exit codes: 0 done, 2 invalid params, arguments or unknown variant,
1 a missing input (the message names the file and the stage that makes it), samples that fail their
checks (the message names the setting's folder), Inception weights that are required but absent, or
invalid (the message names the file or the params field), an unreachable cluster, or a failed Ray task.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scorelab.checkpoint import CheckpointError
from scorelab.cli import load_or_report
from scorelab.data import DataError
from scorelab.evaluate import EvaluateError, evaluate_variant
from scorelab.failures import run_stage
from scorelab.layout import METRICS_FILE, Layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--samples", default=None, help="default: outputs/samples/<variant>")
    parser.add_argument("--featurizer", default=None, help="default: outputs/featurizer")
    parser.add_argument("--model", default=None, help="default: outputs/train/<variant>/model.pt")
    parser.add_argument("--out", default=None, help="default: outputs/eval/<variant>")
    parser.add_argument("--root", default=".", help="repository root (dataset, MLflow store, default paths)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to the variant's MLflow run")
    parser.add_argument("--bpd-samples", type=int, default=None,
                        help="test images for bits/dim (2-D data: test points for the log-likelihood); 0 skips "
                             "(default: params evaluate.bpd_samples)")
    parser.add_argument("--probes", type=int, default=None,
                        help="Hutchinson probes per image for bits/dim (default: params evaluate.probes)")
    parser.add_argument("--debug", action="store_true", help="show a failure's traceback instead of one line")
    args = parser.parse_args(argv)
    return run_stage(f"evaluate {args.variant}", lambda: _run(args), debug=args.debug,
                     reading=f"samples under {args.samples or Layout(Path(args.root)).samples(args.variant)} or model file {args.model or Layout(Path(args.root)).model(args.variant)}")


def _run(args: argparse.Namespace) -> int:
    params = load_or_report(args.params, args.variant, root=args.root)
    if params is None:
        return 2
    # given flags override params.evaluate (which pydantic has already checked)
    bpd_samples = params.evaluate.bpd_samples if args.bpd_samples is None else args.bpd_samples
    probes = params.evaluate.probes if args.probes is None else args.probes
    if bpd_samples < 0 or probes < 1:
        print("--bpd-samples must be >= 0 and --probes >= 1", file=sys.stderr)
        return 2
    root = Path(args.root).resolve()
    layout, name = Layout(root), args.variant
    try:
        metrics = evaluate_variant(
            params, name,
            samples_dir=Path(args.samples) if args.samples else layout.samples(name),
            featurizer_dir=Path(args.featurizer) if args.featurizer else layout.featurizer,
            model_path=Path(args.model) if args.model else layout.model(name),
            out_dir=(out := Path(args.out) if args.out else layout.eval(name)),
            root=root, bpd_samples=bpd_samples, probes=probes, log_to_mlflow=not args.no_mlflow,
        )
    except (EvaluateError, DataError, CheckpointError) as e:
        print(f"evaluate {name}: {e}", file=sys.stderr)
        return 1
    primary = metrics["primary_metric"]

    def pm(d: dict) -> str:
        mean, ci = d.get(f"{primary}_mean"), d.get(f"{primary}_ci")
        if d.get("diverged"):  # the sample stage's guard: not scored
            return f"DIVERGED (max |x| {'not finite' if d['max_abs'] is None else format(d['max_abs'], '.3g')})"
        return "n/a" if mean is None else f"{mean:.4g}" + ("" if ci is None else f" [{ci[0]:.4g}, {ci[1]:.4g}]")

    level = metrics["intervals"]["level"]
    print(f"{name}: N = {metrics['n_per_seed']} per seed, {metrics['seeds']} seed(s); "
          f"{primary}: mean over seeds [{level:.0%} interval: {metrics['intervals'][primary].split(':')[0]}]")
    for key, r in metrics["settings"].items():
        print(f"  {key:<24} NFE {r['nfe']!s:>6}  {pm(r)}")
    print(f"  {'real-vs-real baseline':<24} {'N ' + str(metrics['baseline']['n']):>10}  {pm(metrics['baseline'])}")
    if metrics["inception_fid"] is None:
        print(f"  Inception FID: not computed ({metrics['inception_fid_reason']})")
    else:
        print(f"  Inception FID: {metrics['inception_fid_reason']}")
    lik = metrics.get("bits_per_dim") or metrics.get("test_loglik")
    if lik:
        unit = "bits/dim" if "bits_per_dim" in metrics else "nats (test log-likelihood)"
        err = "" if lik["stderr"] is None else f" ± {lik['stderr']:.3g}"
        print(f"  {unit}: {lik['mean']:.4g}{err}")
    where = metrics["computed_on"]
    node = where["node"] + (f", Ray node {where['ray_node_id'][:12]}" if where["ray_node_id"] else "")
    print(f"  computed on {node} ({where['device']})")
    print(f"-> {out / METRICS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
