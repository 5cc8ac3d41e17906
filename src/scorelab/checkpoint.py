"""The files a trained model lives in, and nothing else: Ray Train checkpoints (state.pt) and exported
weights (model.pt), their digests, and building the ScoreModel they hold.

    model = build_model(variant, data_shape)                 # the network a variant config describes
    save_state(folder, model=..., ema=..., optimizer=..., step=..., config_hash=..., run_id=...)
    state = load_state(folder, expected_hash)                # CheckpointMismatchError for another config
    export_model(state, variant, data_shape, out / "model.pt")  # the chosen EMA, where there are several
    trained = load_trained(out / "model.pt")                 # TrainedModel: EMA weights in eval mode

Both files are one torch.save of plain containers and tensors, read back with weights_only=True (no
pickled code runs), and carry the sha256 of their own contents: a file that still loads after being
damaged or altered is caught when the digest is recomputed. A file without that digest (written before
scorelab recorded one, or with the key removed) is refused unless the environment variable
SCORELAB_ACCEPT_UNDIGESTED_MODELS=1 accepts such legacy files, unchecked.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import storage
from .config import VariantConfig
from .modality import modality_of
from .nets import build_net, net_config, state_dict_mismatch
from .parameterization import ScoreModel

STATE_FILE = "state.pt"
DIGEST_KEY = "sha256"  # in state.pt and model.pt: the sha256 of the rest of the file's contents
LEGACY_ENV = "SCORELAB_ACCEPT_UNDIGESTED_MODELS"  # "1": load files without DIGEST_KEY, unchecked


class CheckpointError(RuntimeError):
    """A checkpoint or model file that cannot be used: written for another configuration or architecture."""


class CheckpointMismatchError(CheckpointError):
    pass


class CheckpointCorruptError(CheckpointMismatchError):
    """A checkpoint or model file that is truncated, unreadable, or whose contents no longer match the
    sha256 recorded in it when it was written."""


def build_model(variant: VariantConfig, data_shape: tuple[int, ...]) -> ScoreModel:
    """The variant's network (params' `net`, else the modality's default) behind its parameterisation."""
    net_cfg = variant.net or net_config({"type": modality_of(data_shape).default_net})
    param = variant.parameterization.model_dump()
    kind = param.pop("type")
    return ScoreModel(build_net(net_cfg, data_shape), variant.sde.build(), kind=kind, **param)


def check_same_model(variant: VariantConfig, trained: VariantConfig, model_path: Path) -> None:
    """Sampling and evaluation need the SDE, parameterisation and network the weights were trained with."""
    keys = {"sde", "parameterization", "net"}
    if variant.model_dump(mode="json", include=keys) != trained.model_dump(mode="json", include=keys):
        raise CheckpointMismatchError(f"{model_path} was trained with a different sde, parameterization or net than "
                                      "the variant in params: rerun the train stage")


def content_sha256(obj: Any) -> str:
    """sha256 of a checkpoint's contents (nested dicts, lists, tensors with their dtypes and shapes,
    numbers, strings). Stored in the file it describes, so the file stays one atomic write, and a file
    that still loads after being damaged or altered is caught when the digest is recomputed."""
    h = hashlib.sha256()

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(b"D%d" % len(o))
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(b"L%d" % len(o))
            for v in o:
                walk(v)
        else:
            h.update(f"S{type(o).__name__}:{o!r}".encode())

    walk(obj)
    return h.hexdigest()


def _save_atomic(obj: dict[str, Any], path: Path) -> Path:
    """torch.save, flushed to disk, whole or not at all (storage.atomic_path), with the contents' sha256."""
    with storage.atomic_path(path, fsync=True) as tmp:
        torch.save({**obj, DIGEST_KEY: content_sha256(obj)}, tmp)
    return path


def _load_verified(path: Path, what: str, hint: str, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load(weights_only=True), then the recorded sha256 checked against the contents. A file
    without one is refused unless LEGACY_ENV is "1": dropping the key must not skip the check."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated or tampered files fail in many ways
        raise CheckpointCorruptError(f"{what} {path} is unreadable ({type(e).__name__}: {e}): {hint}") from None
    if not isinstance(blob, dict):
        raise CheckpointCorruptError(f"{what} {path} is not a scorelab file (holds {type(blob).__name__}): {hint}")
    recorded = blob.pop(DIGEST_KEY, None)
    if recorded is None:
        if os.environ.get(LEGACY_ENV) == "1":
            return blob
        raise CheckpointCorruptError(
            f"{what} {path} has no {DIGEST_KEY} of its contents (written by an older scorelab, or altered): {hint}; "
            f"or set {LEGACY_ENV}=1 to load such a file unchecked")
    if recorded != content_sha256(blob):
        raise CheckpointCorruptError(
            f"{what} {path} is unreadable: its contents do not match the sha256 recorded when it was written "
            f"(damaged or modified on disk): {hint}")
    return blob


def save_state(directory: Path, **state: Any) -> Path:
    """Write atomically, with the contents' sha256 (see _save_atomic)."""
    return _save_atomic(state, Path(directory) / STATE_FILE)


def load_state(directory: Path, expected_hash: str | None) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    try:
        state = _load_verified(path, "checkpoint", "remove this checkpoint folder to resume from the one before "
                               "it, or the run's folder to start fresh")
    except FileNotFoundError:
        raise CheckpointMismatchError(f"checkpoint {directory} has no {STATE_FILE}") from None
    if expected_hash is not None and state.get("config_hash") != expected_hash:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written for configuration {str(state.get('config_hash'))[:12]}, "
            f"not this one ({expected_hash[:12]}): it cannot be resumed; change ray.storage_path or "
            "remove the old run to start fresh"
        )
    return state


# ---------------------------------------------------------------------------------------------
# Trained weights, in a form scorelab loads back without executing code


@dataclass
class TrainedModel:
    model: ScoreModel  # EMA weights, eval mode
    variant: VariantConfig
    data_shape: tuple[int, ...]
    step: int
    config_hash: str
    run_id: str
    ema: str | None = None  # which candidate EMA the weights are, where training chose among several


def write_model(weights: dict[str, torch.Tensor], variant: VariantConfig, data_shape: tuple[int, ...], path: Path,
                *, step: int, config_hash: str, run_id: str = "", ema: str | None = None) -> Path:
    """A model file load_trained accepts: ScoreModel weights, what rebuilds the model, and the digest.
    ema: the name of the candidate EMA the weights are, recorded where training chose among several."""
    blob = {"weights": weights, "variant": variant.model_dump(mode="json"), "data_shape": list(data_shape),
            "step": int(step), "config_hash": config_hash, "run_id": run_id}
    return _save_atomic(blob if ema is None else {**blob, "ema": ema}, Path(path))


def chosen_ema(state: dict[str, Any]) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(name, state_dict) of the EMA a checkpoint exports: the candidate its EMA selection chose (the classic
    EMA or one of the power profiles in state["ema_profiles"]), or (None, the EMA) without a selection."""
    selection = state.get("ema_selection")
    if selection is None:
        return None, state["ema"]
    chosen = selection["chosen"]
    return chosen, state.get("ema_profiles", {}).get(chosen, state["ema"])


def export_model(state: dict[str, Any], variant: VariantConfig, data_shape: tuple[int, ...], path: Path) -> Path:
    """model.pt: the exported EMA's weights of the ScoreModel (chosen_ema) plus what is needed to rebuild it."""
    name, ema = chosen_ema(state)
    ema_weights = {k[len("module."):]: v for k, v in ema.items() if k.startswith("module.")}
    return write_model(ema_weights, variant, data_shape, path, step=state["step"],
                       config_hash=state["config_hash"], run_id=state["run_id"], ema=name)


def load_trained(path: Path | str, device: str | torch.device = "cpu") -> TrainedModel:
    """Raises CheckpointCorruptError (naming the file) for a truncated, unreadable or altered file."""
    blob = _load_verified(Path(path), "model file", "rerun the stage that wrote it", map_location=device)
    variant = VariantConfig.model_validate(blob["variant"])
    shape = tuple(blob["data_shape"])
    model = build_model(variant, shape)
    try:
        model.load_state_dict(blob["weights"])
    except RuntimeError as e:
        raise CheckpointMismatchError(f"model file {path} holds weights of another architecture than its variant "
                                      f"config builds ({state_dict_mismatch(e)}): rerun the stage that wrote it"
                                      ) from None
    model.to(device).eval()
    return TrainedModel(model, variant, shape, blob["step"], blob["config_hash"], blob["run_id"], blob.get("ema"))
