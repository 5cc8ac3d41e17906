"""Each benchmark entry point runs at a tiny size, so the scripts cannot rot (their numbers are not checked)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_throughput_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--steps", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "train_throughput.csv").read_text().count("\n") == 4  # header + 3 settings


def test_gpu_train_runs_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_train.py"), "--steps", "2", "--cpu-smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "gpu_train.csv").exists()
