"""How a pipeline stage script ends when something outside scorelab fails: one line, not a traceback.

    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        return run_stage(f"train {args.variant}", lambda: _run(args), debug=args.debug, reading=f"model file {m}")

scorelab's own errors are caught by the scripts themselves. What escapes them from the libraries underneath
(MLflow refusing a tracking URI, Arrow a storage path, Ray finding no cluster, the file system a name, a file
missing a key) is an expected failure of the setting or file that caused it: explain() names that setting or
file in one line, the script exits 1, and any MLflow run the stage opened and did not end is marked FAILED.
Anything else is a bug and keeps its traceback, as every failure does with --debug.
"""

from __future__ import annotations

import errno
import sys
from typing import Callable

from . import tracking
from .schema import cut

# (top-level module, class name) of exception classes from libraries this module does not import (they are
# heavy, and a stage that never touched them need not load them) -> the setting they are about
_FOREIGN = {
    ("mlflow", "MlflowException"): "mlflow.tracking_uri",
    ("pyarrow", "ArrowException"): "ray.storage_path",
    ("pydantic_core", "ValidationError"): None,  # an input file's content: see `reading`
}


def _foreign(e: BaseException) -> tuple[bool, str | None]:
    for cls in type(e).__mro__:
        key = (cls.__module__.split(".")[0], cls.__name__)
        if key in _FOREIGN:
            return True, _FOREIGN[key]
    return False, None


def explain(e: BaseException, reading: str | None = None) -> str | None:
    """One line for an expected failure `e`, naming the setting or file; None for a bug. reading: the input
    file(s) the stage reads, named when a file's content is at fault (a missing key, an invalid record)."""
    what = cut(f"{type(e).__name__}: {' '.join(str(e).split()) or '(no message)'}", 240)
    found, setting = _foreign(e)
    if found and setting:
        return f"{setting}: {what}"
    if found or isinstance(e, KeyError):  # a record without a key it must have, or with an invalid value
        return f"{reading or 'an input file'} is malformed ({what}): rerun the stage that wrote it"
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
        return f"{cut(str(e.filename), 120)}: file name too long: shorten the variant name or path that forms it"
    if isinstance(e, ConnectionError):  # Ray's "no cluster found" (ray.address: auto) among others
        return f"cannot connect ({what}): check ray.address, $RAY_ADDRESS and mlflow.tracking_uri"
    if isinstance(e, OSError):
        return f"{cut(str(e.filename), 120)}: {e.strerror}" if e.filename and e.strerror else what
    if isinstance(e, (OverflowError, MemoryError)):
        return f"{what}: a params value is too large for what it sizes"
    return None


def run_stage(label: str, body: Callable[[], int], *, debug: bool = False, reading: str | None = None) -> int:
    """body()'s exit code; an expected failure (explain) printed as "label: line" with exit code 1. Either
    way a failed stage leaves no MLflow run of its own RUNNING."""
    try:
        code = body()
    except Exception as e:
        tracking.end_unfinished_runs()
        line = None if debug else explain(e, reading)
        if line is None:
            raise
        print(f"{label}: {line}", file=sys.stderr)
        return 1
    if code:
        tracking.end_unfinished_runs()
    return code
