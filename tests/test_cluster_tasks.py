"""Stage work as cluster tasks: a real two-node Ray cluster whose head has no CPUs (as a KubeRay head),
so that every task must land on the other node. Sampling is checked here; the isolated topology of
cluster/local_topology.sh (a worker that cannot see the repository at all) checks the whole DAG.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scorelab.generate import BlockedScore, generate, load_samples
from scorelab.modality import modality_of
from scorelab.runtime import check_storage_shared
from scorelab.sampling import sample
from scorelab.checkpoint import load_trained

sys.path.insert(0, str(Path(__file__).parent))
from test_generate import ANCESTRAL, DDIM, make_model, variant  # noqa: E402


@pytest.fixture(scope="module")
def headless_cluster():
    """A head with 0 CPUs and a worker node with 2: every task and worker runs on the worker node."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    cluster.wait_for_nodes()
    yield ray.get_runtime_context().get_node_id(), worker.node_id
    ray.shutdown()
    cluster.shutdown()


def test_sampling_chunks_run_on_the_worker_node_and_match_in_process_sampling(headless_cluster, tmp_path):
    head, worker = headless_cluster
    v = variant([DDIM, ANCESTRAL])
    model_path = make_model(tmp_path / "model.pt", v, (2,))
    rows = generate(model_path, tmp_path / "samples", n_samples=20, seeds=[0, 5], batch_size=6, num_workers=2,
                    progress=False)
    assert len(rows) == 4 and all(r["chunks_drawn"] == 4 for r in rows)
    drawn_on = {w for r in rows for w in r["drawn_on"]}
    assert drawn_on == {f"{worker[:12]}/cpu"}, (drawn_on, head[:12])

    trained = load_trained(model_path)
    for setting, method, steps in [("ddim-4", "ddim", 4), ("ancestral-6", "ancestral", 6)]:
        for seed in (0, 5):
            ref = sample(BlockedScore(trained.model, 64), trained.model.sde, (20, 2), method=method, steps=steps,
                         seed=seed, indices=torch.arange(20))
            expected = modality_of((2,)).to_stored(ref.x.numpy())
            assert np.array_equal(load_samples(tmp_path / "samples", setting, seed), expected), (setting, seed)


def test_a_storage_folder_every_node_sees_passes_the_check(headless_cluster, tmp_path):
    """Both nodes share this machine's disk: the probe is seen everywhere, and removed. (A folder one
    node cannot see is refused in cluster/local_topology.sh, whose worker has a mount namespace of its own.)"""
    check_storage_shared(str(tmp_path / "shared"))
    assert (tmp_path / "shared").is_dir() and not list((tmp_path / "shared").iterdir())
