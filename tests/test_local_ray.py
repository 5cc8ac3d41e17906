"""`python -m scorelab with-local-ray -- CMD` (make run): CMD's stages share one real local Ray, which stops
with CMD; a stage that needs more CPUs than it has is refused; with a cluster address nothing is started."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "presets" / "digits.yaml"  # the committed default: tune's 2 concurrent trials need 3 CPUs

# What a stage does: ray_session("") as training, sampling and the sweep call it.
STAGE = textwrap.dedent("""
    import json, os, sys
    import ray
    from scorelab.runtime import RuntimeSetupError, ray_session
    with ray_session("", num_cpus=2.0):
        out = {"gcs": ray.get_runtime_context().gcs_address, "cpus": ray.cluster_resources()["CPU"],
               "env": os.environ.get("SCORELAB_LOCAL_RAY"), "api": os.environ.get("RAY_API_SERVER_ADDRESS")}
    try:
        with ray_session("", num_cpus=99.0):
            out["refused"] = None
    except RuntimeSetupError as e:
        out["refused"] = str(e)
    print("STAGE " + json.dumps(out))
    sys.exit(3)
""")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SCORELAB_LOCAL_RAY")}
    return {**env, "RAY_AUTH_MODE": "disabled"}


def _wrapped(stage: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scorelab", "with-local-ray", "--params", str(PARAMS), "--",
                           sys.executable, "-c", stage], capture_output=True, text=True, env=env, timeout=300)


def _answers(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError:
        return False


def test_stages_attach_to_the_one_local_ray_which_stops_with_the_command():
    proc = _wrapped(STAGE, _env())
    assert proc.returncode == 3, proc.stderr[-2000:]  # the command's exit code, passed on
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("STAGE "))[6:])
    assert out["gcs"] == out["env"]  # attached to the advertised Ray, not a Ray of its own
    assert out["cpus"] == max(os.cpu_count() or 1, 3)  # what the default's sweep needs
    assert out["api"] and out["api"].startswith("http://127.0.0.1:")  # Ray Train's cleaner finds this Ray
    assert "has" in out["refused"] and "needs 99" in out["refused"] and "SCORELAB_LOCAL_RAY" in out["refused"]
    assert not _answers(out["gcs"])  # stopped with the command


def test_with_a_cluster_address_the_command_runs_without_a_local_ray():
    stage = "import os; print('SHARED', os.environ.get('SCORELAB_LOCAL_RAY')); raise SystemExit(4)"
    proc = _wrapped(stage, {**_env(), "RAY_ADDRESS": "127.0.0.1:1"})
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "SHARED None" in proc.stdout and "with-local-ray: one local Ray" not in proc.stdout


def test_no_command_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "scorelab", "with-local-ray", "--params", str(PARAMS)],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2 and "no command given" in proc.stderr


def test_ray_train_polls_its_workers_every_quarter_second_unless_the_user_chose(monkeypatch, tmp_path):
    """Ray Train's default poll of 2 s made every fit wait for its workers' start and end (BENCHMARKS)."""
    from scorelab.runtime import TRAIN_POLL_ENV, torch_trainer

    def loop(config):
        pass

    monkeypatch.delenv(TRAIN_POLL_ENV, raising=False)
    torch_trainer(loop, {}, name="a", storage_path=str(tmp_path), workers=1, cpus_per_worker=1.0)
    assert os.environ[TRAIN_POLL_ENV] == "0.25"
    monkeypatch.setenv(TRAIN_POLL_ENV, "1.5")
    torch_trainer(loop, {}, name="b", storage_path=str(tmp_path), workers=1, cpus_per_worker=1.0)
    assert os.environ[TRAIN_POLL_ENV] == "1.5"
