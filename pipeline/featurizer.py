"""DVC stage `featurizer`: train the feature extractor of the image distances, once per dataset.

    python pipeline/featurizer.py --params params.yaml [--out outputs/featurizer] [--root .]

Image data: trains a DigitClassifier (deterministic, seed from params) on the prepared train split and
writes <out>/classifier.pt, <out>/ref_test.npz and <out>/ref_train.npz (mu, sigma of the test and train
features) and <out>/metrics.json ({"test_accuracy", "train_seconds", ...}). 2-D data: only
<out>/metrics.json, saying why nothing was trained (format: scorelab.featurizer).
Exit codes: 0 done, 2 invalid params, 1 the dataset is missing or cannot be used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scorelab.cli import load_or_report
from scorelab.data import DataError
from scorelab.failures import run_stage
from scorelab.featurizer import FeaturizerError, build_featurizer
from scorelab.layout import METRICS_FILE, Layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default=None, help="default: outputs/featurizer")
    parser.add_argument("--root", default=".", help="repository root (the dataset path is relative to it)")
    parser.add_argument("--debug", action="store_true", help="show a failure's traceback instead of one line")
    args = parser.parse_args(argv)
    return run_stage("featurizer", lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    params = load_or_report(args.params)
    if params is None:
        return 2
    root = Path(args.root).resolve()
    out = Path(args.out) if args.out else Layout(root).featurizer
    try:
        metrics = build_featurizer(params, root=root, out_dir=out)
    except (FeaturizerError, DataError) as e:
        print(f"featurizer: {e}", file=sys.stderr)
        return 1
    if "skipped" in metrics:
        print(f"featurizer: skipped ({metrics['skipped']}) -> {out / METRICS_FILE}")
    else:
        print(f"featurizer: test accuracy {metrics['test_accuracy']:.4f} after {metrics['train_seconds']:.1f}s "
              f"of training -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
