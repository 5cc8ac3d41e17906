"""Every sampler on every SDE it applies to, driven by the exact score of the 2-D three-component
mixture: the settings of tests/test_sampling.py, with their sliced-Wasserstein-2 distance to fresh
data and their counted NFE.

    .venv/bin/python bench/samplers_exact.py [--n 8000] [--out docs/bench]

Writes <out>/samplers_exact.csv and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--out", default=str(REPO / "docs" / "bench"))
    args = parser.parse_args(argv)

    from test_sampling import CASES, GM, SDES  # the tested settings, so the table is what CI checks

    from scorelab.metrics import sliced_wasserstein
    from scorelab.sampling import SAMPLER_FAMILIES, sample

    torch.set_num_threads(1)
    data = GM.sample(args.n, generator=torch.Generator().manual_seed(123))
    floor = sliced_wasserstein(GM.sample(args.n, generator=torch.Generator().manual_seed(7)), data)
    rows = []
    for sde_name, make in SDES.items():
        sde = make()
        for method, steps, opts in CASES:
            if sde.family not in SAMPLER_FAMILIES[method]:
                continue
            if sde.discrete_times() is not None and steps is not None:
                steps = min(steps, len(sde.discrete_times()))
            start = time.perf_counter()
            result = sample(GM.score_fn(sde), sde, (args.n, 2), method=method, steps=steps, seed=1, **opts)
            rows.append({"sde": sde_name, "method": method, "options": " ".join(f"{k}={v}" for k, v in opts.items()),
                         "steps": steps if steps is not None else "adaptive", "nfe": result.nfe,
                         "sliced_w2": round(sliced_wasserstein(result.x, data), 4),
                         "seconds": round(time.perf_counter() - start, 2)})
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samplers_exact.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nN = {args.n}; data-vs-data sliced W2 at this N: {floor:.4f}\n")
    print("| SDE | method | options | steps | NFE | sliced W2 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sde']} | {r['method']} | {r['options']} | {r['steps']} | {r['nfe']} | {r['sliced_w2']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
