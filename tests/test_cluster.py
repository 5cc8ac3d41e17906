"""Training spread over a real two-node Ray cluster on this machine, logging to a real MLflow server."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scorelab.config import parse_params
from scorelab.data import prepare
from scorelab.tracking import TrackingError
from scorelab.checkpoint import load_trained
from scorelab.training import train_variant

sys.path.insert(0, str(Path(__file__).parent))
from conftest import wait_for_mlflow  # noqa: E402
from test_training import VARIANTS, make_params  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_mlflow(url, proc, timeout=90)
    except BaseException:
        proc.kill()
        raise
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_training_spans_both_nodes_and_logs_to_the_server(two_nodes, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    p = make_params(tmp_path, "toy2d", {"vp": VARIANTS["vp"]}, {"steps": 8, "batch_size": 16, "checkpoint_every": 4,
                                                               "log_every": 4},
                    ray={"address": two_nodes.address, "placement_strategy": "SPREAD"})
    p["mlflow"] = {"tracking_uri": mlflow_server, "experiment": "cluster-test"}
    params = parse_params(p)
    prepare(params.data, params.seed)
    result = train_variant(params, "vp", root=tmp_path, data_dir=params.data.dataset_dir, out_dir=tmp_path / "out")
    assert load_trained(result.model_path).step == 8

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.num_nodes"] == "2" and run.data.tags["ray.num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(result.run_id, "loss")] == [4, 8]
    assert "model/model.pt" in {a.path for a in client.list_artifacts(result.run_id, "model")}


def test_local_store_with_a_multi_node_cluster_is_refused(two_nodes, tmp_path):
    p = make_params(tmp_path, "toy2d", {"vp": VARIANTS["vp"]}, {"steps": 2, "batch_size": 16},
                    ray={"address": two_nodes.address})
    params = parse_params(p)
    prepare(params.data, params.seed)
    with pytest.raises(TrackingError, match="local store, but the Ray cluster has 2 nodes"):
        train_variant(params, "vp", root=tmp_path, data_dir=params.data.dataset_dir, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
