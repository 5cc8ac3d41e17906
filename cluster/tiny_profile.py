"""Write the tiny 2-D profile of the DAG, pointed at a cluster, as a params file.

    python cluster/tiny_profile.py OUT.yaml --ray-address 127.0.0.1:6390 \
        --tracking-uri http://127.0.0.1:5050 --storage-path /shared/ray

Starts from presets/toy2d.yaml and keeps two variants (vp, ve), a few training steps and a two-trial
sweep: enough for every stage to run on every node in a minute or two. The result is validated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from scorelab.config import parse_params

REPO = Path(__file__).resolve().parents[1]


def tiny_profile(ray_address: str, tracking_uri: str, storage_path: str) -> dict:
    params = yaml.safe_load((REPO / "presets" / "toy2d.yaml").read_text())
    mlp = {"type": "mlp", "hidden": 32, "layers": 2}
    params["data"]["toy"].update({"n_train": 2000, "n_test": 500})
    params["train"].update({"steps": 20, "batch_size": 32, "checkpoint_every": 10, "log_every": 5,
                            "warmup_steps": 0})
    params["ray"].update({"address": ray_address, "num_workers": 2, "cpus_per_worker": 1,
                          "placement_strategy": "SPREAD", "storage_path": storage_path})
    params["mlflow"] = {"tracking_uri": tracking_uri, "experiment": "scorelab-cluster-check"}
    # 20 training steps leave models that sample far outside the data: score every setting anyway (the guard's
    # own tests are tests/test_generate.py's and tests/test_evaluate.py's)
    params["sample"].update({"n": 200, "batch_size": 100, "workers": 2, "diverged_above": 1.0e12})
    params["evaluate"].update({"bpd_samples": 50})
    params["variants"] = {
        "vp": {**params["variants"]["vp"], "net": mlp, "samplers": [{"method": "dpm_solver", "steps": [5, 10]}]},
        "ve": {**params["variants"]["ve"], "net": mlp, "samplers": [{"method": "heun", "steps": [5]}]},
    }
    params["tune"].update({
        "space": [{**c, "net": mlp} for c in params["tune"]["space"][:2]], "lr": [1.0e-3], "num_trials": 2,
        "max_concurrent": 2, "steps": 10, "batch_size": 32, "eval_every": 5, "grace_period": 5,
        "objective": {"sampler": {"method": "ddim", "steps": [5]}, "n_samples": 200},
        "samplers": [{"method": "ddim", "steps": [5]}],
    })
    parse_params(params)  # the same validation as params.yaml
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--ray-address", required=True)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--storage-path", required=True)
    args = parser.parse_args()
    params = tiny_profile(args.ray_address, args.tracking_uri, args.storage_path)
    args.out.write_text(yaml.safe_dump(params, sort_keys=False))


if __name__ == "__main__":
    main()
