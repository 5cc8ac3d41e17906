import torch

# The suite is many small tensor operations on a shared 2-core machine: one intra-op thread is
# several times faster than two fighting over the cores.
torch.set_num_threads(1)


def wait_for_mlflow(url: str, proc, timeout: float = 120) -> None:
    """Return once the MLflow server at url answers /health; fail the test if it has not within timeout
    seconds or its process `proc` has exited."""
    import time
    import urllib.request

    import pytest

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"mlflow server at {url} did not come up in {timeout:g} s")


# The slow tier (`make test-slow`; `make test` runs the rest): faults injected for real, Ray clusters of
# several nodes, whole-DAG runs through dvc repro, the sweep, the benchmarks' smoke runs, and the training
# runs that restart Ray. One list, so that what `make test` leaves out is read in one place. The fast tier
# keeps the core, config, units and small end-to-end runs (a Ray Train run on the 2-D mixture, the sample
# and evaluate stages in-process).
SLOW_FILES = {"test_bench_dag.py", "test_bench_smoke.py", "test_cluster.py", "test_cluster_tasks.py",
              "test_demo.py", "test_dvc.py", "test_faults.py", "test_tune.py"}
SLOW_TESTS = {
    "test_training.py": ("test_every_variant_trains_and_is_tracked", "test_rerun_resumes_the_same_run",
                         "test_nonfinite_loss_stops", "test_killed_worker_resumes", "test_killed_driver_rerun",
                         "test_same_params_and_seed_give_bit_identical", "test_stopped_and_resumed_run_equals"),
    "test_bad_inputs.py": ("test_bad_input[resume-checkpoint-", "test_bad_input[cluster-"),
    # Langevin with 200 corrector steps per level: 18 s each; every other sampler x SDE pair stays fast
    "test_sampling.py": ("test_sampler_matches_mixture[ncsn-ald-steps_each=200",
                         "test_sampler_matches_mixture[ve-ald-steps_each=200"),
    "test_evaluate.py": ("test_evaluate_on_a_two_node_cluster", "test_a_failed_task_is_an_evaluate_error",
                         "test_inception_fid_with_local_weights", "test_featurizer_on_digits_and_toy"),
}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        name = item.path.name
        if name in SLOW_FILES or item.name.startswith(SLOW_TESTS.get(name, ("\0",))):
            item.add_marker(pytest.mark.slow)
