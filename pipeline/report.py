"""DVC stage `report`: compare every variant's evaluation in one Markdown report, figures and MLflow.

    python pipeline/report.py --params params.yaml [--root .] [--out reports] [--no-mlflow]

Reads outputs/train/<variant>/metrics.json, outputs/eval/<variant>/metrics.json and the sample grids
of each variant in params (with a tune: section also of `tuned`, and outputs/tune/trials.csv and
metrics.json); writes <out>/comparison.md, fid_vs_nfe.png, fid_vs_nfe.csv, samples.png, metrics.json,
sweep.png (with a tune: section) and (when the MLflow store has the runs' loss histories) loss_curves.png,
and logs a "comparison" run to MLflow (format: scorelab.report). --no-mlflow leaves MLflow alone (no loss curves).
Prints the path of comparison.md. Exit codes: 0 done, 2 invalid params, 1 a missing or malformed input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scorelab.cli import load_or_report
from scorelab.failures import run_stage
from scorelab.report import ReportError, build_report
from scorelab.tracking import resolve_tracking_uri, run_ui_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".", help="repository root (inputs under outputs/, MLflow store)")
    parser.add_argument("--out", default=None, help="default: <root>/reports")
    parser.add_argument("--no-mlflow", action="store_true", help="neither read from nor log to MLflow")
    parser.add_argument("--debug", action="store_true", help="show a failure's traceback instead of one line")
    args = parser.parse_args(argv)
    return run_stage("report", lambda: _run(args), debug=args.debug,
                     reading="an evaluation or training metrics file")


def _run(args: argparse.Namespace) -> int:
    params = load_or_report(args.params)
    if params is None:
        return 2
    root = Path(args.root).resolve()
    try:
        result = build_report(params, root=root, out_dir=Path(args.out) if args.out else None,
                              log_to_mlflow=not args.no_mlflow)
    except ReportError as e:
        print(f"report: {e}", file=sys.stderr)
        return 1
    for note in result["notes"]:
        print(f"report: note: {note}", file=sys.stderr)
    link = result["mlflow_run_id"] and run_ui_url(resolve_tracking_uri(params.mlflow.tracking_uri, root),
                                                  result["mlflow_run_id"])
    if link:
        print(f"report: MLflow: {link}", file=sys.stderr)
    print(result["files"]["comparison"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
