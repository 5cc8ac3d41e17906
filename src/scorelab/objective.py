"""The distance of a model's samples to held-out data: what ranks the sweep's trials (scorelab.tune) and
the candidate EMAs at the end of training (scorelab.training, with power EMA profiles).

    objective = Objective(metric, data, featurizer, "dpm_solver", 10, {}, n_samples=256, seeds=2, seed=0,
                          data_shape=(1, 8, 8))
    objective(model, step)   # {"objective": mean over seeds, "objective_se": its standard error, ...}

Samples of one sampler at one NFE valid for every SDE family, against the test split: the domain Frechet
distance on the featurizer stage's classifier features for images, the sliced Wasserstein-2 distance for
2-D points. A loss would not do: an eps-predicting VP model and a score-predicting VE model have denoising
losses of different scales. Seed k of the objective draws the same noise for every model it is called
with, so two models are compared on the same draws.

A module of its own so that scorelab.training can use it without importing scorelab.tune (which imports
training).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .features import load_classifier
from .layout import CLASSIFIER_FILE, REF_TEST_FILE
from .modality import Modality, modality_of
from .runtime import Shipment, unpack

OBJECTIVE = "objective"  # the metric Tune minimises, and the key of the objective's value


@dataclass
class Objective:
    """Called by training.train_loop's rank 0: a sweep's with the EMA model at each checkpoint step, the EMA
    selection's with every candidate EMA at the last step. Picklable: it travels to the workers."""

    metric: str  # "domain_fd" (images) or "sliced_w2" (2-D points)
    data: Shipment  # the prepared dataset (2-D points: the test split is the reference)
    featurizer: Shipment | None  # images: the featurizer stage's classifier and test statistics
    method: str
    steps: int | None
    options: dict[str, Any]
    n_samples: int
    seeds: int  # independent draws of n_samples: the objective is their mean, their spread its noise
    seed: int
    data_shape: tuple[int, ...]
    _reference: Any = field(default=None, repr=False)

    @property
    def modality(self) -> Modality:
        return modality_of(self.data_shape)

    def _load(self) -> Any:
        from .data import read_split

        if not self.modality.is_image:
            return read_split(unpack(self.data), "test")
        folder = unpack(self.featurizer)
        clf, _ = load_classifier(folder / CLASSIFIER_FILE)
        with np.load(folder / REF_TEST_FILE) as z:
            return clf, z["mu"], z["sigma"]

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        from .sampling import sample

        if self._reference is None:
            self._reference = self._load()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        start = time.perf_counter()
        values, nfe = [], 0
        for k in range(self.seeds):  # seed k of the objective: the same noise for every trial and step
            out = sample(model, model.sde, (self.n_samples, *self.data_shape), method=self.method, steps=self.steps,
                         seed=self.seed + k, device=device, **self.options)
            values.append(self._distance(out.x))
            nfe = out.nfe
        model.train(was_training)
        mean = float(np.mean(values))
        noise = {"objective_se": float(np.std(values, ddof=1) / math.sqrt(len(values)))} if len(values) > 1 else {}
        return {OBJECTIVE: mean, **noise, f"objective_{self.metric}": mean, "objective_nfe": float(nfe),
                "objective_seconds": time.perf_counter() - start}

    def _distance(self, samples: torch.Tensor) -> float:
        # a diverged model still gets a (large) finite distance, which ASHA can rank
        x = torch.nan_to_num(samples.float().cpu(), nan=0.0, posinf=1e6, neginf=-1e6)
        if not self.modality.is_image:
            from .metrics import sliced_wasserstein

            return float(sliced_wasserstein(x, self._reference, n_projections=256, seed=0))
        from .features import domain_frechet

        clf, mu, sigma = self._reference
        x = torch.from_numpy(self.modality.from_stored(self.modality.to_stored(x.numpy())))  # as samples are stored
        return float(domain_frechet(clf, x, mu, sigma))
