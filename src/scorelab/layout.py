"""Where each stage writes, relative to the repository root: the one spelling of every output path.

    out = Layout(root)
    out.model(variant)        # <root>/outputs/train/<variant>/model.pt (the sweep's winner `tuned` too)
    out.samples(variant)      # <root>/outputs/samples/<variant>
    out.eval_metrics(variant) # <root>/outputs/eval/<variant>/metrics.json

`dvc.yaml` stays the table of contents of the same paths (tests/test_layout.py keeps the two in
agreement); the stage scripts, the report and the error messages ask this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TUNED_VARIANT = "tuned"  # the sweep's winner, a variant of outputs/tune/best_variant.yaml (never of params.yaml)

OUTPUTS = "outputs"
METRICS_FILE = "metrics.json"
MODEL_FILE = "model.pt"
GRID_FILE = "grid.png"
TUNED_VARIANT_FILE = "best_variant.yaml"  # the tune stage's winner, as params.yaml would spell the variant
TRIALS_FILE = "trials.csv"  # the tune stage's trial table
# the featurizer stage's files (outputs/featurizer): its classifier and the reference feature statistics
CLASSIFIER_FILE = "classifier.pt"
REF_TEST_FILE = "ref_test.npz"
REF_TRAIN_FILE = "ref_train.npz"


@dataclass(frozen=True)
class Layout:
    root: Path  # the repository root

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    def dataset(self, dataset_dir: Path) -> Path:
        """params.data.dataset_dir, relative to the root unless absolute."""
        return dataset_dir if Path(dataset_dir).is_absolute() else self.root / dataset_dir

    @property
    def featurizer(self) -> Path:
        return self.root / OUTPUTS / "featurizer"

    @property
    def tune(self) -> Path:
        return self.root / OUTPUTS / "tune"

    @property
    def tuned_variant_file(self) -> Path:
        """The sweep's winner (scorelab.config.with_tuned_variant): trained, sampled and evaluated as `tuned`."""
        return self.tune / TUNED_VARIANT_FILE

    @property
    def tune_trials(self) -> Path:
        return self.tune / TRIALS_FILE

    @property
    def tune_metrics(self) -> Path:
        return self.tune / METRICS_FILE

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def headline(self) -> Path:
        """The report's metrics.json: each variant's headline, the one file dvc.yaml declares as metrics."""
        return self.reports / METRICS_FILE

    def train(self, variant: str) -> Path:
        """The train stage's folder (the sweep's winner is retrained there too, as `tuned`)."""
        return self.root / OUTPUTS / "train" / variant

    def model(self, variant: str) -> Path:
        return self.train(variant) / MODEL_FILE

    def train_metrics(self, variant: str) -> Path:
        return self.train(variant) / METRICS_FILE

    def samples(self, variant: str) -> Path:
        return self.root / OUTPUTS / "samples" / variant

    def grid(self, variant: str, setting: str) -> Path:
        return self.samples(variant) / setting / GRID_FILE

    def eval(self, variant: str) -> Path:
        return self.root / OUTPUTS / "eval" / variant

    def eval_metrics(self, variant: str) -> Path:
        return self.eval(variant) / METRICS_FILE

    def shown(self, path: Path) -> str:
        """`path` relative to the root where it lies inside it: what messages print."""
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)


def shared_root(root: Path) -> Path:
    """Where state shared by every run of the project lives (the default MLflow store, Ray's checkpoints):
    the repository DVC runs the stage for. `dvc exp run --queue`/`--temp` runs stages in a throw-away copy
    under .dvc/tmp/exps and sets DVC_ROOT to the real repository (dvc/repo/experiments/queue/base.py); a
    plain `dvc repro` sets it to the repository itself. Outside DVC: `root`."""
    return Path(os.environ.get("DVC_ROOT") or root).resolve()


STAGE_SCRIPTS = {"prepare": "prepare", "featurizer": "featurizer", "train": "train", "tune": "tune",
                 "sample": "sample", "evaluate": "evaluate", "report": "report"}


def stage_command(stage: str, variant: str | None = None) -> str:
    """How to run one stage by hand, for error messages: `python pipeline/<stage>.py ...`. The sweep's
    winner `tuned` is chosen by the tune stage, then trained, sampled and evaluated like any variant."""
    if stage == "tune":
        return "python pipeline/tune.py --params params.yaml"
    command = f"python pipeline/{STAGE_SCRIPTS[stage]}.py --params params.yaml"
    return command + (f" --variant {variant}" if variant else "")
