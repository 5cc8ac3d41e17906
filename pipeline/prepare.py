"""DVC stage `prepare`: write the dataset that params.yaml's `data` section names (see scorelab.data).

    python pipeline/prepare.py --params params.yaml

Reads only the `data` and `seed` sections. Writes only data.out_dir/<source>, which must lie inside the
working directory (the project, where dvc runs) unless data.allow_external_out_dir is true, and which it
replaces only when it holds a dataset prepare wrote. Exit codes: 0 done, 2 invalid params, 1 the data
could not be prepared (missing files, no network for a download, unreadable images, an output folder it
may not write; anything else outside scorelab fails in one line too, scorelab.failures; --debug
shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scorelab.cli import print_problems
from scorelab.config import ConfigError, load_data_params
from scorelab.data import DataError, prepare
from scorelab.failures import run_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--debug", action="store_true", help="show a failure's traceback instead of one line")
    args = parser.parse_args(argv)
    return run_stage("prepare", lambda: _run(args), debug=args.debug, reading="the data files data: names")


def _run(args: argparse.Namespace) -> int:
    try:
        cfg, seed = load_data_params(args.params)
    except ConfigError as e:
        print_problems(args.params, e.problems)
        return 2
    try:
        m = prepare(cfg, seed, root=Path.cwd())
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
