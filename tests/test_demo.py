"""`make run`'s demo end to end on a small params file, through the real command line."""

import json
import subprocess
import sys

import yaml


def test_demo_writes_plot_and_table(tmp_path):
    params = {
        "seed": 3,
        "demo": {"n_samples": 300, "steps": 20},
        "variants": {
            "vp": {
                "sde": {"type": "vp"},
                "parameterization": {"type": "eps"},
                "samplers": [{"method": "dpm_solver", "steps": [10, 20]}, {"method": "ode"}],
            },
            "ncsn": {
                "sde": {"type": "ncsn", "sigma_min": 0.05, "sigma_max": 8.0, "num_scales": 30},
                "parameterization": {"type": "score", "scale_by_sigma": True},
                "samplers": [{"method": "ald", "steps_each": 20, "step_lr": 1.0e-4}],
            },
        },
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "scorelab", "demo", "--params", str(path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "samplers.json").read_text())
    runs = report["runs"]
    assert [(r["variant"], r["method"], r["steps"]) for r in runs] == [
        ("vp", "dpm_solver", 10), ("vp", "dpm_solver", 20), ("vp", "ode", None), ("ncsn", "ald", None)
    ]
    assert [r["nfe"] for r in runs][:2] == [10, 20]
    assert runs[3]["nfe"] == 30 * 20 + 1
    # with the exact score every sampler lands near the data (the floor at N=300 is ~0.3-0.5)
    assert all(r["sliced_w2"] < 2 * report["baseline_sliced_w2"] + 0.1 for r in runs)
    assert (out / "samplers.png").stat().st_size > 10_000
    assert "| vp | vp | dpm_solver | 10 | 10 |" in (out / "samplers.md").read_text()


def test_demo_refuses_bad_params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\nvariants: {}\n")
    proc = subprocess.run([sys.executable, "-m", "scorelab", "demo", "--params", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "variants" in proc.stderr
    assert not (tmp_path / "o").exists()
