"""End to end: wall time and peak memory of each stage of `dvc repro`, then of a no-op re-run.

    .venv/bin/python bench/dag_end_to_end.py                  # the committed params.yaml (about 12 min)
    .venv/bin/python bench/dag_end_to_end.py --params presets/toy2d.yaml --csv /tmp/toy.csv

Copies the repository (tracked and untracked, not ignored, files) to a temporary folder, then runs the
DAG there one stage at a time in DVC's own order (`dvc repro --single-item <stage>`), sampling every
0.5 s the memory of the stage's whole process tree: the stage script, the Ray processes it starts (GCS,
raylet, workers, Train and Tune actors) and their children. Memory is the proportional set size (PSS:
pages shared between processes, such as torch's libraries, counted once in total, not once per
process, as a sum of RSS would). Peak = the largest sum seen.
Writes one CSV row per stage, plus `total` and `noop` (a second `dvc repro` with nothing to do).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]


def copy_repo(dest: Path, params: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:  # the project's files, never a run's record (dvc.lock, reports/)
        if name != "dvc.lock" and not name.startswith(("reports/", "outputs/")) and (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    shutil.copy2(params, dest / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def stage_order(repo: Path, env: dict[str, str]) -> list[str]:
    """The stages in the order `dvc repro` runs them (from `dvc dag --md`'s topological listing)."""
    out = subprocess.run([env["DVC"], "dag", "--dot"], cwd=repo, env=env, capture_output=True, text=True,
                         check=True).stdout
    nodes, edges = [], []
    for line in out.splitlines():
        line = line.strip().rstrip(";")
        if "->" in line:
            a, b = (s.strip().strip('"') for s in line.split("->"))
            edges.append((a, b))
        elif line.startswith('"'):
            nodes.append(line.strip('"'))
    order, done = [], set()
    while len(order) < len(nodes):  # Kahn's algorithm, ties in listing order: deterministic
        for n in nodes:
            if n not in done and all(a in done for a, b in edges if b == n):
                order.append(n)
                done.add(n)
                break
    return order


def _pss(p: psutil.Process) -> int:
    try:
        return p.memory_full_info().pss
    except (psutil.AccessDenied, AttributeError):  # no smaps: fall back to RSS
        return p.memory_info().rss


def run_measured(cmd: list[str], cwd: Path, env: dict[str, str], interval: float = 0.5) -> tuple[float, int, int]:
    """(seconds, peak PSS bytes of the process tree, exit code)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            rss = 0
            for p in tree:
                try:
                    rss += _pss(p)
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(interval)
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        sys.stderr.write(err[-3000:])
    return time.perf_counter() - start, peak, proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--csv", type=Path, default=REPO / "docs" / "bench" / "dag_end_to_end.csv")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run just these stages, in DAG order, and no no-op re-run (a smoke test)")
    args = parser.parse_args(argv)

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "DVC": str(bin_dir / "dvc")}
    tmp = Path(tempfile.mkdtemp(prefix="scorelab-e2e-"))
    rows = []
    try:
        copy_repo(tmp, args.params.resolve())
        stages = stage_order(tmp, env)
        if args.only:
            unknown = sorted(set(args.only) - set(stages))
            if unknown:
                print(f"--only: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(stages)}", file=sys.stderr)
                return 2
            stages = [s for s in stages if s in args.only]
        total_start = time.perf_counter()
        for stage in stages:
            seconds, peak, rc = run_measured([env["DVC"], "repro", "--single-item", stage], tmp, env)
            rows.append({"stage": stage, "seconds": round(seconds, 2), "peak_pss_mib": round(peak / 2**20, 1)})
            print(f"{stage:20s} {seconds:8.1f} s  peak {peak / 2**20:8.1f} MiB", flush=True)
            if rc != 0:
                print(f"stage {stage} failed (exit {rc})", file=sys.stderr)
                return 1
        rows.append({"stage": "total", "seconds": round(time.perf_counter() - total_start, 2),
                     "peak_pss_mib": max(r["peak_pss_mib"] for r in rows)})
        if not args.only:
            seconds, peak, rc = run_measured([env["DVC"], "repro"], tmp, env)
            rows.append({"stage": "noop", "seconds": round(seconds, 2), "peak_pss_mib": round(peak / 2**20, 1)})
            print(f"{'noop re-run':20s} {seconds:8.1f} s  peak {peak / 2**20:8.1f} MiB")
            if rc != 0:
                return 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["stage", "seconds", "peak_pss_mib"])
        writer.writeheader()
        writer.writerows(rows)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"-> {args.csv} ({machine}; params {yaml.safe_load(args.params.read_text())['data']['source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
