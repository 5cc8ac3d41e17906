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
