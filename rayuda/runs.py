"""A trained run, found and rebuilt: a run or trial folder, a search's winner, or an MLflow model URI.

The library half of ``python -m rayuda.predict``, shared with :mod:`rayuda.hpo.registry` (which logs a run's G as an
MLflow model and reads it back through :func:`load_run`): :func:`resolve_run` turns any RUN into a
:class:`LoadedRun` (G on the CPU in eval mode, with its resolved config). It talks to MLflow only through
:func:`client_for` and :func:`mlflow_uri`, both here, so nothing below the command line imports the tracker.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from rayuda.config import ConfigError
from rayuda.data import DatasetError, class_names

WEIGHTS = {"best": "best_model.pt", "final": "model.pt"}
#: Inside an MLflow model logged by rayuda: the files that rebuild G (see rayuda.hpo.registry.log_winner_model).
MODEL_FILES = "extra_files"
MODEL_CONFIG, MODEL_STATE = "config.yaml", "state_dict.pt"
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class RunError(ValueError):
    """A RUN that cannot be rebuilt; the one-line message names the file at fault."""


def oneline(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@dataclass
class LoadedRun:
    """A rebuilt G (CPU, eval mode) with the resolved config it was trained with."""

    config: dict[str, Any]
    model: torch.nn.Module
    weights: str

    @property
    def class_names(self) -> list[str]:
        return class_names(self.config["protocol"])

    @property
    def preprocessing(self) -> str:
        """How images become G's input (``model.preprocessing``; runs from before the key: ``imagenet``)."""
        return self.config["model"].get("preprocessing", "imagenet")

    @property
    def size(self) -> tuple[int, int] | None:
        """The (H, W) images are resized to before G, as target images in training (``data.target.size``, else
        ``data.size``); None: own size."""
        data = self.config["data"]
        size = (data.get("target") or {}).get("size") or data["size"]
        if size is None:
            return None
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ------------------------------------------------------------------------------------------ finding the run


def pick_trial(search_dir: Path) -> tuple[Path, str]:
    """The trial folder of ``search_dir`` whose ``summary.json`` has the highest ``best_score``, and a note."""
    scored = []
    for summary in sorted(search_dir.glob("work/trials/*/summary.json")):
        try:
            score = float(json.loads(summary.read_text())["best_score"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if math.isfinite(score):
            scored.append((score, summary.parent))
    if not scored:
        raise RunError(f"{search_dir / 'work' / 'trials'}: no finished trial (no */summary.json with a best_score)")
    score, trial = max(scored, key=lambda item: item[0])  # ties: the first in name order
    return trial, f"search {search_dir}: picked trial {trial.name} (best_score {score:.4f}, best of {len(scored)})"


def locate(run: str) -> tuple[Path, str | None]:
    """The run folder RUN names (a search folder → its confirmed winner, or without one its best-scoring trial)
    and a note on how it was chosen."""
    path = Path(run).expanduser()
    if not path.exists():
        raise RunError(f"{path}: no such run folder, search folder or MLflow model URI")
    if not path.is_dir():
        raise RunError(f"{path}: RUN must be a folder (run, trial or search) or an MLflow model URI")
    if (path / "config.yaml").is_file():
        return path, None
    winner = path / "work" / "winner.json"  # written by rayuda.tune: the confirmed winner's run folder
    if winner.is_file():
        try:
            record = json.loads(winner.read_text())
            return path / record["run"], f"search {path}: its winner {record['run']} ({record['why']})"
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunError(f"{winner}: unreadable ({err})") from None
    if (path / "best.yaml").is_file() or (path / "work" / "trials").is_dir():
        return pick_trial(path)
    raise RunError(f"{path / 'config.yaml'}: missing (not a run folder; a search folder has best.yaml and "
                   "work/trials/)")


# ---------------------------------------------------------------------------------------- rebuilding G


def load_config(path: Path, shown: str | None = None) -> dict[str, Any]:
    """The resolved config in ``path``, validated against the method's defaults (unknown keys are errors)."""
    from rayuda.methods import resolve_config

    shown = shown or str(path)
    if not path.is_file():
        raise RunError(f"{shown}: missing")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise RunError(f"{shown}: cannot read the config ({oneline(err)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("method"), str):
        raise RunError(f"{shown}: not a resolved rayuda config (a mapping with a 'method' key)")
    try:
        return resolve_config(data["method"], None, path)
    except ConfigError as err:
        raise RunError(f"{shown}: cannot rebuild the config: {oneline(err)}") from None


def load_state(path: Path, shown: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict of tensors; ``weights_only=True``, so no arbitrary object is ever unpickled."""
    shown = shown or str(path)
    if not path.is_file():
        raise RunError(f"{shown}: missing")
    try:
        with warnings.catch_warnings():  # torch warns about some files it then refuses: the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # what torch.load(weights_only=True) refuses: no plain tensors
        raise RunError(f"{shown}: not a plain state dict (torch.load with weights_only=True refuses it)") from None
    except Exception as err:  # noqa: BLE001 — any unreadable file is one error line
        raise RunError(f"{shown}: not a readable state dict ({oneline(err)[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"{shown}: not a state dict (a mapping of parameter names to tensors)")
    return state


def build_model(cfg: dict[str, Any], state: dict[str, torch.Tensor], shown_cfg: str, shown_state: str
                ) -> torch.nn.Module:
    """G as ``cfg['model']`` describes it (random init, no pretrained file needed), loaded with ``state``."""
    from rayuda.models import build_segmenter

    try:
        model = build_segmenter({**cfg["model"], "init": "random"}, len(class_names(cfg["protocol"])))
    except (ValueError, DatasetError) as err:
        raise RunError(f"{shown_cfg}: cannot build its model ({oneline(err)})") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        raise RunError(f"{shown_state}: does not fit the model of {shown_cfg}: {', '.join(parts)}")
    model.load_state_dict(state)
    return model.eval()


def load_run(run_dir: str | Path, weights: str = "best") -> LoadedRun:
    """G of a run or trial folder with its ``best_model.pt`` (``weights="best"``) or ``model.pt`` (``"final"``)."""
    run_dir = Path(run_dir)
    cfg_path, state_path = run_dir / "config.yaml", run_dir / WEIGHTS[weights]
    cfg = load_config(cfg_path)
    model = build_model(cfg, load_state(state_path), str(cfg_path), str(state_path))
    return LoadedRun(cfg, model, str(state_path))


def client_for(uri: str):
    """An MLflow client on ``uri`` as both tracking and registry store (never a registry pinned globally by
    other code)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def mlflow_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URI set to ``uri`` for the block, then restored: for the MLflow calls
    that take no URI (``mlflow.pytorch.log_model`` / ``load_model``). Downloads pass theirs instead
    (:func:`load_model_uri`), so ``predict`` leaves the globals alone."""
    import mlflow

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def model_location(uri: str, tracking_uri: str) -> str:
    """Where the model a ``models:/`` URI names is stored, looked up in the store ``tracking_uri`` (tracking and
    registry): ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/NAME/latest`` (the highest version),
    ``models:/NAME/STAGE`` or ``models:/MODEL_ID``. Other URIs are returned as they are.

    MLflow's own download resolves a ``models:/`` URI through its *global* registry URI whatever it is passed
    (``ModelsArtifactRepository._get_model_uri_infos``, MLflow 3.17), so rayuda resolves it with its own client."""
    if not uri.startswith("models:/"):
        return uri
    client, ref = client_for(tracking_uri), uri[len("models:/"):].strip("/")
    name, _, suffix = ref.partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif not suffix:  # a logged model's id (models:/m-...)
        return client.get_logged_model(name).artifact_location
    elif suffix.isdigit():
        version = client.get_model_version(name, suffix)
    elif suffix.lower() == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise RunError(f"{uri}: registered model {name!r} has no version in {tracking_uri}")
        version = max(versions, key=lambda v: int(v.version))
    else:  # a stage
        versions = client.get_latest_versions(name, [suffix])
        if not versions:
            raise RunError(f"{uri}: registered model {name!r} has no version in stage {suffix!r}")
        version = versions[0]
    if getattr(version, "model_id", None):
        return client.get_logged_model(version.model_id).artifact_location
    return client.get_model_version_download_uri(name, version.version)


def load_model_uri(uri: str, tracking_uri: str) -> LoadedRun:
    """G of an MLflow model logged by :func:`rayuda.hpo.registry.log_winner_model`, rebuilt from its config and
    state dict (the model's ``extra_files``); its pickle-free ``pt2`` export is not needed here. Everything
    goes through ``tracking_uri``; MLflow's global URIs are left as they are."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="rayuda-model-") as tmp:
        try:
            location = model_location(uri, tracking_uri)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                             tracking_uri=tracking_uri, registry_uri=tracking_uri))
        except RunError:
            raise
        except Exception as err:  # noqa: BLE001 — MLflow raises many kinds; the user needs one line
            raise RunError(f"{uri}: cannot download the model from {tracking_uri} ({oneline(err)})") from None
        files = local / MODEL_FILES
        shown_cfg, shown_state = f"{uri} ({MODEL_FILES}/{MODEL_CONFIG})", f"{uri} ({MODEL_FILES}/{MODEL_STATE})"
        if not (files / MODEL_CONFIG).is_file():
            raise RunError(f"{shown_cfg}: missing; not a model logged by rayuda")
        cfg = load_config(files / MODEL_CONFIG, shown_cfg)
        state = load_state(files / MODEL_STATE, shown_state)
    return LoadedRun(cfg, build_model(cfg, state, shown_cfg, shown_state), shown_state)


def resolve_run(run: str, weights: str = "best", tracking_uri: str | None = None) -> tuple[LoadedRun, str | None]:
    """Any RUN (folder, trial, search, MLflow URI) → the rebuilt G and a note on which run was chosen."""
    if run.startswith(URI_SCHEMES):
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():  # MLflow would create it
            raise RunError(f"{uri[len('sqlite:///'):]}: no MLflow store there to find {run} in (see --mlflow-uri)")
        return load_model_uri(run, uri), None
    run_dir, note = locate(run)
    return load_run(run_dir, weights), note


class LogitsModule(torch.nn.Module):
    """G as an MLflow model serves it: an ImageNet-normalised N×3×H×W float32 batch → N×C×H×W logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from rayuda.models import predict_logits

        return predict_logits(self.model, images, images.shape[-2:])
