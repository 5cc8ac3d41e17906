"""DVC stage `tune`: a Ray Tune sweep over SDEs and noise schedules; the winner becomes variant `tuned`.

    python pipeline/tune.py --params params.yaml [--out outputs/tune] [--featurizer outputs/featurizer]

The search space, budget and objective are params.yaml's `tune:` section (scorelab.config.TuneConfig).
Each trial trains through Ray Train inside Ray Tune; ASHA stops the trials that fall behind. Rerunning
a sweep that was killed resumes it: finished trials are kept, the others continue from their last
checkpoint. Writes <out>/best_variant.yaml (the winner's configuration: `python pipeline/train.py
--params params.yaml --variant tuned` trains it at the train: budget, and the sample and evaluate stages
take `--variant tuned` like any variant), <out>/trials.csv (every trial: configuration, objective and its
standard error over seeds, steps reached, time), <out>/metrics.json (the winner, the objective's noise, the
early rungs' agreement with the final order) and <out>/objective_vs_params.png.
Exit codes: 0 done, 2 invalid params (or no tune section), 1 the sweep failed, 143 stopped by SIGTERM
(130 by SIGINT): Ray Tune saved the sweep's state, and rerunning the stage resumes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scorelab.checkpoint import CheckpointError
from scorelab.cli import load_or_report, print_problems
from scorelab.config import ConfigError
from scorelab.data import DataError
from scorelab.failures import run_stage
from scorelab.layout import Layout
from scorelab.runtime import RuntimeSetupError
from scorelab.tracking import TrackingError
from scorelab.training import TrainingError
from scorelab.tune import SweepInterrupted, TuneError, run_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=None, help="default: outputs/tune")
    parser.add_argument("--featurizer", default=None, help="default: outputs/featurizer (image data only)")
    parser.add_argument("--root", default=".", help="repository root (MLflow store, relative paths)")
    parser.add_argument("--debug", action="store_true", help="show a failure's traceback instead of one line")
    args = parser.parse_args(argv)
    return run_stage("tune", lambda: _run(args), debug=args.debug,
                     reading="a checkpoint of this sweep")


def _run(args: argparse.Namespace) -> int:
    params = load_or_report(args.params)
    if params is None:
        return 2
    if params.tune is None:
        print(f"{args.params}: has no tune: section; nothing to sweep", file=sys.stderr)
        return 2
    layout = Layout(Path(args.root))
    out = Path(args.out) if args.out else layout.tune
    featurizer = Path(args.featurizer) if args.featurizer else layout.featurizer
    try:
        result = run_sweep(params, root=layout.root, data_dir=layout.dataset(params.data.dataset_dir),
                           featurizer_dir=featurizer, out_dir=out)
    except ConfigError as e:  # a space that is only invalid once sigma_max "auto" is known
        print_problems(args.params, e.problems)
        return 2
    except SweepInterrupted as e:
        print(f"tune: {e}", file=sys.stderr)
        return e.exit_code
    except (TuneError, TrainingError, CheckpointError, DataError, TrackingError, RuntimeSetupError) as e:
        print(f"tune: {e}", file=sys.stderr)
        return 1
    m, best = result.metrics, result.best
    print(f"tuned: {m['trials']} trials ({m['search']}: {m['finished']} finished, {m['stopped_early']} stopped early "
          f"by ASHA, {m['failed']} failed) in {m['seconds']:.1f}s" + (" (resumed)" if m["resumed"] else ""))
    for r in result.rows:
        obj = "-" if r["objective"] is None else f"{r['objective']:.4g}" + (
            f" ± {r['objective_se']:.2g}" if r["objective_se"] is not None else "")
        print(f"  trial {r['trial']}: {r['label']}, lr {r['lr']:g}, ema {r['ema_decay']:g} -> {m['objective_metric']} "
              f"{obj} at step {r['steps']}/{r['max_steps']} [{r['status']}]")
    for rung in m["rung_agreement"]:
        print(f"  at step {rung['step']}: {rung['agree']} of {rung['pairs']} pairs of finished trials already in "
              "their final order")
    print(f"best: trial {best['trial']} ({best['label']}), {m['objective_metric']} {best['objective']:.4g}; "
          f"{out / 'best_variant.yaml'} (trained next as variant tuned, sampled like {m['samplers_from']}); "
          f"MLflow run {m['mlflow_run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
