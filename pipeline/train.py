"""DVC stage `train`: train one variant through Ray Train and export its EMA weights.

    python pipeline/train.py --params params.yaml --variant vp [--out outputs/train/vp]

Resumes the variant's run from its latest checkpoint when one exists. Writes <out>/model.pt
(load with scorelab.checkpoint.load_trained), <out>/config.json, <out>/samples_final.png and
<out>/metrics.json, and logs the weights to the variant's MLflow run as an MLflow model that samples
(scorelab.mlflow_model; not logging it is reported, not a failure). A variant with ema.profiles keeps power EMAs
besides its EMA and exports the best of them (scored with the featurizer stage's classifier for images:
outputs/featurizer). Exit codes: 0 done, 2 invalid params,
1 training failed, 143 stopped by SIGTERM (preemption) after checkpointing the step it was at: run it
again to resume from there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scorelab.checkpoint import CheckpointError
from scorelab.cli import load_or_report
from scorelab.data import DataError
from scorelab.failures import run_stage
from scorelab.layout import Layout
from scorelab.mlflow_model import publish
from scorelab.runtime import RuntimeSetupError
from scorelab.tracking import TrackingError, resolve_tracking_uri
from scorelab.training import TrainingError, TrainingPreempted, train_variant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--out", default=None, help="default: outputs/train/<variant>")
    parser.add_argument("--root", default=".", help="repository root (MLflow store, relative paths)")
    parser.add_argument("--debug", action="store_true", help="show a failure's traceback instead of one line")
    args = parser.parse_args(argv)
    return run_stage(f"train {args.variant}", lambda: _run(args), debug=args.debug,
                     reading="a checkpoint of this run")


def _run(args: argparse.Namespace) -> int:
    params = load_or_report(args.params, args.variant, root=args.root)
    if params is None:
        return 2
    layout = Layout(Path(args.root))
    out = Path(args.out) if args.out else layout.train(args.variant)
    try:
        result = train_variant(params, args.variant, root=layout.root, data_dir=layout.dataset(params.data.dataset_dir),
                               out_dir=out, featurizer_dir=layout.featurizer)
    except TrainingPreempted as e:
        print(f"train {args.variant}: {e}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as if the signal had ended it: schedulers read it as preempted
    except (TrainingError, CheckpointError, DataError, TrackingError, RuntimeSetupError) as e:
        print(f"train {args.variant}: {e}", file=sys.stderr)
        return 1
    logged = publish(resolve_tracking_uri(params.mlflow.tracking_uri, layout.root), result.run_id, result.model_path)
    print(f"trained {args.variant}: {result.steps} steps in {result.seconds:.1f}s, final loss "
          f"{result.final_loss:.4f}; weights {result.model_path}; MLflow run {result.run_id}; {logged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
