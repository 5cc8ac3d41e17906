"""DVC stage `prepare`: write the dataset that params.yaml's `data` section names (see scorelab.data).

    python pipeline/prepare.py --params params.yaml

Reads only the `data` and `seed` sections. Exit codes: 0 done, 2 invalid params, 1 the data could not
be prepared (missing files, no network for a download, unreadable images).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from scorelab.cli import print_problems
from scorelab.config import ConfigError
from scorelab.data import DataError, parse_data_config, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)

    try:
        raw = yaml.safe_load(Path(args.params).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        print(f"{args.params}: cannot read params: {e}", file=sys.stderr)
        return 2
    if not isinstance(raw, dict):
        print(f"{args.params}: top level must be a mapping", file=sys.stderr)
        return 2
    problems: list[str] = []
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed: must be an integer >= 0 (got {seed!r})")
    try:
        cfg = parse_data_config(raw.get("data"))
    except ConfigError as e:
        problems += e.problems
    if problems:
        print_problems(args.params, problems)
        return 2

    try:
        m = prepare(cfg, seed)
    except DataError as e:
        print(f"prepare: {e}", file=sys.stderr)
        return 1
    shape = "x".join(map(str, m.shape))
    print(f"prepared {m.source} (seed {m.seed}) in {cfg.dataset_dir}: {m.counts['train']} train / "
          f"{m.counts['test']} test rows of shape {shape} {m.dtype}, {len(m.shards)} shard(s), "
          f"checksum {m.checksum[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
