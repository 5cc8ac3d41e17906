"""MLflow as the comparison surface, read back through MLflow's own client from a real sqlite store in
tmp_path: the experiment's kind, the metric key every variant shares at step = NFE, and each variant's
weights as an mlflow.pyfunc model that samples."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import torch

from scorelab import tracking
from scorelab.checkpoint import build_model, export_model
from scorelab.evaluate import _log as log_evaluation
from scorelab.mlflow_model import MODEL_NAME, SampleRequestError, log_sampler_model, publish
from scorelab.sampling import sample
from scorelab.variant_config import VariantConfig

MLP = {"type": "mlp", "hidden": 32, "layers": 2, "emb_dim": 16}
UNET = {"type": "unet", "channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One sqlite store for the module (creating one takes seconds), also MLflow's process-wide URI:
    models:/ URIs resolve through it."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = tracking.resolve_tracking_uri("", root)
    mlflow.set_tracking_uri(uri)
    yield uri, root
    mlflow.set_tracking_uri(None)


@pytest.fixture
def store(db, request):
    """(uri, experiment id): an experiment of its own for each test."""
    uri, root = db
    return uri, tracking.experiment_id(uri, f"scorelab-{request.node.name}", root)


# ---------------------------------------------------------------------------------------------
# The experiment: MLflow's model-training kind, and a link that opens that view


def test_every_stage_s_run_sits_in_one_experiment_of_the_model_training_kind(db):
    uri, root = db
    name = tracking.experiment_name(None, "digits")
    # as the train stage, the tune stage and the report stage open their runs
    variant = tracking.open_run(uri, name, root, "key-vp", "vp", {"variant": "vp"})
    sweep = tracking.start_or_resume_run(uri, tracking.experiment_id(uri, name, root), "sweep", "tune", {})
    report = tracking.open_run(uri, name, root, "comparison-x", "comparison", {"scorelab.stage": "report"})
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert {client.get_run(r).info.experiment_id for r in (variant, sweep, report)} == {exp.experiment_id}
    link = tracking.run_ui_url(uri, report)
    assert link == f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}?workflowType=machine_learning"


def test_an_older_experiment_gets_the_kind_and_a_chosen_kind_is_kept(db):
    uri, root = db
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("scorelab-old")  # made before scorelab set the kind
    chosen = client.create_experiment("scorelab-mine", tags={"mlflow.experimentKind": "genai_development"})
    assert tracking.experiment_id(uri, "scorelab-old", root) == old
    assert tracking.experiment_id(uri, "scorelab-mine", root) == chosen
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_ui_link_names_the_server_without_its_credentials():
    assert (tracking.ui_url("https://user:secret@mlflow.example:8443/", "7")
            == "https://mlflow.example:8443/#/experiments/7?workflowType=machine_learning")


def test_the_installed_mlflow_ui_knows_the_kind_and_the_view_parameter():
    """The UI bundle of the installed MLflow: the tag's value and the workflowType view that ui_url asks for
    (a newer MLflow that renamed them fails here, not silently in a browser)."""
    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    text = "".join(p.read_text(errors="ignore") for p in bundle.glob("*.js"))
    for needle in ('"mlflow.experimentKind"', '"custom_model_development"', '"workflowType"',
                   'MACHINE_LEARNING="machine_learning"'):
        assert needle in text, needle


# ---------------------------------------------------------------------------------------------
# One key that overlays every variant: the best setting at each NFE


def test_best_at_each_step_is_the_lowest_value_per_step():
    points = [(20, 3.0), (10, 5.0), (20, 2.5), (10, None), (40, math.nan), (40, 7.0), (10, 6.0)]
    assert tracking.best_at_each_step(points) == [(10, 5.0), (20, 2.5), (40, 7.0)]
    assert tracking.best_at_each_step([]) == []


# the five variants' sampler settings as params.yaml has them: (method, NFE, domain_fd mean)
SETTINGS = {
    "ddpm": [("ancestral", 100, 31.0), ("ddim", 10, 52.0), ("ddim", 20, 40.0)],
    "ncsn": [("ald", 100, 61.0)],
    "vp": [("dpm_solver", 10, 45.0), ("dpm_solver", 20, 35.0), ("ode", 86.4, 33.0), ("euler_maruyama", 50, 48.0)],
    "subvp": [("dpm_solver", 10, 47.0), ("dpm_solver", 20, 36.0), ("ode", 86.4, 30.0)],
    "ve": [("heun", 19, 44.0), ("heun", 39, 38.0), ("pc", 100, 50.0), ("ald", 100, 42.0)],  # two at NFE 100
}


def test_every_variant_logs_the_best_setting_at_each_nfe_under_one_key(store, tmp_path):
    uri, exp = store
    runs = {}
    for variant, rows in SETTINGS.items():
        runs[variant] = tracking.start_or_resume_run(uri, exp, f"key-{variant}", variant, {})
        out = tmp_path / "eval" / variant
        out.mkdir(parents=True)
        (out / "metrics.json").write_text("{}")
        (out / "fid_vs_nfe.csv").write_text("variant\n")
        metrics = {"settings": {f"{m}-{i}": {"method": m, "steps": None, "nfe": nfe, "domain_fd_mean": fd}
                                for i, (m, nfe, fd) in enumerate(rows)},
                   "baseline": {"domain_fd_mean": 12.0}, "diverged": []}
        log_evaluation(tracking.RunLogger(uri, runs[variant]), metrics, "domain_fd", tmp_path / "none", out)

    client = mlflow.MlflowClient(uri)
    expected = {  # worked out by hand from SETTINGS: the lowest distance at each (rounded) NFE
        "ddpm": [(10, 52.0), (20, 40.0), (100, 31.0)],
        "ncsn": [(100, 61.0)],
        "vp": [(10, 45.0), (20, 35.0), (50, 48.0), (86, 33.0)],
        "subvp": [(10, 47.0), (20, 36.0), (86, 30.0)],
        "ve": [(19, 44.0), (39, 38.0), (100, 42.0)],
    }
    for variant, run_id in runs.items():
        history = client.get_metric_history(run_id, "eval_domain_fd_best")
        assert sorted((m.step, m.value) for m in history) == expected[variant], variant
        # the per-sampler keys stay beside it
        assert {k for k in client.get_run(run_id).data.metrics if k.startswith("eval_domain_fd_")} >= {
            f"eval_domain_fd_{m}" for m, _, _ in SETTINGS[variant]}
    # MLflow's own search finds the key in all five runs: Compare overlays them on one chart
    found = client.search_runs([exp], filter_string="metrics.eval_domain_fd_best > 0")
    assert {r.info.run_id for r in found} == set(runs.values())


# ---------------------------------------------------------------------------------------------
# The weights as an MLflow model that samples


def make_model(path: Path, variant: dict, data_shape: tuple[int, ...], run_id: str) -> tuple[Path, VariantConfig]:
    v = VariantConfig.model_validate(variant)
    torch.manual_seed(0)
    model = build_model(v, data_shape)
    with torch.no_grad():  # the U-Net's output layer starts at zero: perturb so the score depends on x
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {"ema": {"module." + k: t for k, t in model.state_dict().items()}, "step": 7, "config_hash": "x",
             "run_id": run_id}
    return export_model(state, v, data_shape, path), v


@pytest.fixture
def points_model(store, tmp_path):
    """A 2-D VP variant whose config gives dpm_solver a grid other than its default, logged to a finished run."""
    uri, exp = store
    run_id = tracking.start_or_resume_run(uri, exp, "key-vp", "vp", {})
    tracking.RunLogger(uri, run_id).finish()
    variant = {"sde": {"type": "vp"}, "parameterization": {"type": "eps"}, "net": MLP,
               "samplers": [{"method": "dpm_solver", "steps": [10], "grid": "uniform"}]}
    path, v = make_model(tmp_path / "vp" / "model.pt", variant, (2,), run_id)
    return uri, exp, run_id, path, v


def test_a_variant_s_model_loads_through_pyfunc_and_samples_as_scorelab_does(points_model):
    uri, exp, run_id, path, v = points_model
    model_uri = log_sampler_model(uri, run_id, path)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # logging a model did not reopen the run
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert (logged.name, logged.source_run_id, logged.experiment_id) == (MODEL_NAME, run_id, exp)
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]

    for loaded_from in (model_uri, f"runs:/{run_id}/{MODEL_NAME}"):
        model = mlflow.pyfunc.load_model(loaded_from)
        x = model.predict({"n": 16, "sampler": "dpm_solver", "steps": 20})
        assert x.shape == (16, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["n", "sampler", "steps", "seed"]
    assert sig.outputs.inputs[0].shape == (-1, 2)

    # scorelab's own sampler with the variant's options (its uniform grid) and seed 0
    net = build_model(v, (2,))
    net.load_state_dict(torch.load(path, weights_only=True)["weights"])
    net.eval()
    ref = sample(net, net.sde, (16, 2), method="dpm_solver", steps=20, seed=0, grid="uniform").x.numpy()
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)
    default_grid = sample(net, net.sde, (16, 2), method="dpm_solver", steps=20, seed=0).x.numpy()
    assert not np.allclose(x, default_grid, atol=1e-3)  # the config's grid was used, not the default

    seeded = model.predict({"n": 16, "sampler": "dpm_solver", "steps": 20, "seed": 3})
    assert not np.allclose(seeded, x)
    first = model.predict({"n": 4, "sampler": "dpm_solver", "steps": 20})
    np.testing.assert_allclose(first, x[:4], rtol=1e-5, atol=1e-5)  # sample i does not depend on n
    ode = model.predict({"n": 8, "sampler": "ode"})  # adaptive: no steps; a sampler the variant lacks
    assert ode.shape == (8, 2) and np.isfinite(ode).all()

    # the model carries scorelab's code, so it loads where scorelab is not installed
    files = {a.path for a in client.list_logged_model_artifacts(logged.model_id, "code/scorelab")}
    assert {"code/scorelab/sampling.py", "code/scorelab/checkpoint.py"} <= files
    # the stage rerun with the same weights: the same model, no second one
    assert log_sampler_model(uri, run_id, path) == model_uri
    assert len(client.search_logged_models([exp])) == 1


BAD_REQUESTS = [
    ({"n": 0, "sampler": "dpm_solver", "steps": 20}, "predict input: n: must be >= 1 (got 0)"),
    ({"n": 4, "sampler": "dpm", "steps": 20}, "unknown sampling method 'dpm'; valid: ancestral,"),
    ({"n": 4, "sampler": "ald", "steps": 20}, "'ald' is not defined for 'vp' SDEs; valid for 'vp': ancestral,"),
    ({"n": 4, "sampler": "dpm_solver"}, "predict input: steps: sampler 'dpm_solver' needs steps"),
    ({"n": 4, "sampler": "ode", "steps": 20}, "predict input: steps: sampler 'ode' picks its own steps"),
    ({"n": 4, "sampler": "ddim", "steps": 0}, "predict input: steps: must be >= 1 (got 0)"),
    ({"n": 4, "sampler": "ddim", "steps": 5, "seed": -1}, "predict input: seed: must be >= 0 (got -1)"),
]


def test_a_bad_request_is_one_error_naming_the_key(points_model):
    uri, _, run_id, path, _ = points_model
    model = mlflow.pyfunc.load_model(log_sampler_model(uri, run_id, path))
    for request, message in BAD_REQUESTS:
        with pytest.raises(SampleRequestError) as e:
            model.predict(request)
        assert message in str(e.value) and "\n" not in str(e.value), (request, str(e.value))


def test_an_image_variant_samples_images_and_ncsn_uses_its_own_ladder(store, tmp_path):
    uri, exp = store
    run_id = tracking.start_or_resume_run(uri, exp, "key-ncsn", "ncsn", {})
    variant = {"sde": {"type": "ncsn", "sigma_min": 0.01, "sigma_max": 8.0, "num_scales": 4},
               "parameterization": {"type": "score", "scale_by_sigma": True}, "net": UNET,
               "samplers": [{"method": "ald", "steps_each": 2}]}
    path, _ = make_model(tmp_path / "ncsn" / "model.pt", variant, (1, 8, 8), run_id)
    model = mlflow.pyfunc.load_model(log_sampler_model(uri, run_id, path))
    x = model.predict({"n": 3, "sampler": "ald"})  # steps omitted: NCSN's 4 levels
    assert x.shape == (3, 1, 8, 8) and np.isfinite(x).all()
    assert model.metadata.signature.outputs.inputs[0].shape == (-1, 1, 8, 8)


def test_publish_says_why_a_model_was_not_logged_and_does_not_raise(store, tmp_path):
    uri, exp = store
    run_id = tracking.start_or_resume_run(uri, exp, "key-x", "x", {})
    missing = tmp_path / "nowhere" / "model.pt"
    line = publish(uri, run_id, missing)
    assert line.startswith("not logged as an MLflow model (") and str(missing) in line and "\n" not in line
