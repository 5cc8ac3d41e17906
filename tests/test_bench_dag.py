"""Smoke test of bench/dag_end_to_end.py: two stages of the 2-D preset, measured, so the entry point cannot rot."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dag_end_to_end_measures_each_stage(tmp_path):
    out = tmp_path / "e2e.csv"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "dag_end_to_end.py"), "--params",
                           str(REPO / "presets" / "toy2d.yaml"), "--only", "prepare", "featurizer", "--csv", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["stage"] for r in rows] == ["prepare", "featurizer", "total"]
    assert all(float(r["seconds"]) > 0 and float(r["peak_pss_mib"]) > 10 for r in rows)


def test_unknown_stage_is_refused_naming_the_valid_ones(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "dag_end_to_end.py"), "--params",
                           str(REPO / "presets" / "toy2d.yaml"), "--only", "trian", "--csv", str(tmp_path / "x.csv")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown stage(s) trian" in proc.stderr and "prepare" in proc.stderr
