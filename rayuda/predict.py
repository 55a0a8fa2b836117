"""``python -m rayuda.predict RUN --images PATH``: segment a folder of images with a trained run.

RUN is a run folder (``python -m rayuda.train``'s ``--out``) or a Tune trial folder (``config.yaml`` and
``best_model.pt`` / ``model.pt``), a search folder ``STORAGE/NAME`` (the run of its confirmed winner,
``work/winner.json``; without one, its trial with the highest ``best_score`` in ``work/trials/*/summary.json``),
or an MLflow model URI (``models:/rayuda-cram@champion``: the latest confirmed winner; ``models:/rayuda-cram/3``,
``runs:/...``) logged by :func:`rayuda.tracking.log_winner_model`.

Examples::

    python -m rayuda.predict runs/cram --images /data/mycity/images --overlay
    python -m rayuda.predict rayuda_results/cram-20250101-120000 --images folder_with_labels
    python -m rayuda.predict models:/rayuda-cram@champion --images photos/ --out preds/

Outputs under ``--out``: ``labels/<name>.png`` (uint8 train ids), ``color/<name>.png`` (Cityscapes
palette), with ``--overlay`` ``overlay/<name>.png`` (image | colour, side by side), and ``metrics.json``
when ``PATH/labels`` holds labels (the ``folder:`` dataset layout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rayuda.config import ConfigError
from rayuda.data import DatasetError, class_names, open_dataset
from rayuda.data.datasets import IMAGE_SUFFIXES
from rayuda.data.labels import palette
from rayuda.data.transforms import OwnLabelSize

WEIGHTS = {"best": "best_model.pt", "final": "model.pt"}
#: Inside an MLflow model logged by rayuda: the files that rebuild G (see rayuda.tracking.log_winner_model).
MODEL_FILES = "extra_files"
MODEL_CONFIG, MODEL_STATE = "config.yaml", "state_dict.pt"
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class RunError(ValueError):
    """A RUN that cannot be rebuilt; the one-line message names the file at fault."""


def _oneline(err: BaseException) -> str:
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
        raise RunError(f"{shown}: cannot read the config ({_oneline(err)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("method"), str):
        raise RunError(f"{shown}: not a resolved rayuda config (a mapping with a 'method' key)")
    try:
        return resolve_config(data["method"], None, path)
    except ConfigError as err:
        raise RunError(f"{shown}: cannot rebuild the config: {_oneline(err)}") from None


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
        raise RunError(f"{shown}: not a readable state dict ({_oneline(err)[:200]})") from None
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
        raise RunError(f"{shown_cfg}: cannot build its model ({_oneline(err)})") from None
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
    from rayuda.tracking import client_for

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
    """G of an MLflow model logged by :func:`rayuda.tracking.log_winner_model`, rebuilt from its config and
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
            raise RunError(f"{uri}: cannot download the model from {tracking_uri} ({_oneline(err)})") from None
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


# ------------------------------------------------------------------------------------------------ images


class ImageSet(Dataset):
    """The images to segment: items ``image`` (G's input), ``label`` (train ids at the image's size, 255 =
    none) and ``index``. ``names[i]`` is the output name (relative path, no suffix), ``sizes[i]`` (H, W)."""

    def __init__(self, path: Path, size: tuple[int, int] | None, protocol: int, exclude: Path | None = None,
                 preprocessing: str = "imagenet"):
        self.transform = OwnLabelSize(size, preprocessing)  # as evaluation's data.eval_protocol=label
        self.labelled = None
        if path.is_file():
            files, root = [path], path.parent
        elif (path / "images").is_dir():  # the folder: dataset layout, labels optional
            self.labelled = open_dataset(f"folder:{path}", "train", role="target", protocol=protocol,
                                         transform=self.transform)
            files, root = [image for image, _ in self.labelled.files], path / "images"
        elif path.is_dir():
            skip = exclude.resolve() if exclude is not None else None
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith(".") and not (skip and p.resolve().is_relative_to(skip)))
            root = path
        else:
            raise DatasetError(f"{path}: no such image file or folder")
        if not files:
            raise DatasetError(f"{path}: no images (*.png, *.jpg, *.jpeg) found")
        self.files = files
        self.names = [str(p.relative_to(root).with_suffix("")) for p in files]
        seen: dict[str, Path] = {}
        for name, file in zip(self.names, files, strict=True):
            if name in seen:
                raise DatasetError(f"{file}: shares its output name {name}.png with {seen[name]}")
            seen[name] = file
        self.sizes = [self._size(p) for p in files]
        self.has_labels = bool(self.labelled is not None and self.labelled.has_labels)

    @staticmethod
    def _size(path: Path) -> tuple[int, int]:
        try:
            with Image.open(path) as im:
                return im.height, im.width
        except Exception as err:  # noqa: BLE001
            raise DatasetError(f"{path}: cannot read image ({_oneline(err)})") from None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.labelled is not None:
            item = self.labelled[index]
            return {"image": item["image"], "label": item["label"], "index": index}
        path = self.files[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as err:  # noqa: BLE001
            raise DatasetError(f"{path}: cannot read image ({_oneline(err)})") from None
        img, label = self.transform(image)
        return {"image": img, "label": label, "index": index}

    def batches(self, batch_size: int, fixed_size: bool) -> list[list[int]]:
        """Index batches of equal input size: any images when G's input size is fixed, else same-size ones."""
        groups: dict[Any, list[int]] = {}
        for i, size in enumerate(self.sizes):
            groups.setdefault(None if fixed_size else size, []).append(i)
        return [idx[i : i + batch_size] for idx in groups.values() for i in range(0, len(idx), batch_size)]


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"image": torch.stack([it["image"] for it in items]), "label": [it["label"] for it in items],
            "index": [it["index"] for it in items]}


# -------------------------------------------------------------------------------------------- prediction


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available")
    return torch.device(choice)


@torch.inference_mode()
def predict_folder(run: LoadedRun, images: ImageSet, out: Path, *, batch_size: int = 4, overlay: bool = False,
                   device: torch.device | None = None, progress_every: int = 50, log=print) -> dict[str, Any] | None:
    """Segment every image of ``images`` into ``out`` (labels/, color/, overlay/); the metrics when labelled."""
    from rayuda.metrics import Evaluator
    from rayuda.models import upsample_logits
    from rayuda.models.predict import model_align_corners

    device = device or torch.device("cpu")
    model = run.model.to(device).eval()
    colours, names = palette(run.config["protocol"]), run.class_names
    evaluator = Evaluator(len(names))
    labelled = 0
    loader = DataLoader(images, batch_sampler=images.batches(batch_size, run.size is not None), collate_fn=_collate)
    done, tic = 0, time.time()
    for batch in loader:
        logits = model(batch["image"].to(device)).logits["main"]
        for j, index in enumerate(batch["index"]):
            own = upsample_logits(logits[j : j + 1], images.sizes[index], model_align_corners(model))
            pred = own.argmax(1)[0].to(torch.uint8).cpu()
            label = batch["label"][j]
            if bool((label != 255).any()):
                evaluator.update(pred[None], label[None])
                labelled += 1
            _write(out, images.names[index], pred.numpy(), colours, images.files[index] if overlay else None)
            done += 1
            if progress_every and (done % progress_every == 0 or done == len(images)):
                log(f"  {done}/{len(images)} images ({done / max(time.time() - tic, 1e-9):.1f} img/s)")
    if not labelled:
        return None
    per_class = evaluator.per_class_iou()
    return {"miou": float(evaluator.miou()), "labelled_images": labelled,
            "per_class_iou": {n: None if np.isnan(v) else float(v) for n, v in zip(names, per_class, strict=True)}}


def _write(out: Path, name: str, pred: np.ndarray, colours: np.ndarray, image_path: Path | None) -> None:
    colour = colours[pred]
    for kind, array in (("labels", pred), ("color", colour)):
        target = out / kind / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(target)
    if image_path is not None:
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"))
        target = out / "overlay" / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([image, colour], axis=1)).save(target)


# ----------------------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rayuda.predict",
        description="Segment images with a trained run: a run or trial folder, a search folder or an MLflow model.",
        epilog="Each image is resized to the run's data.size when its config sets one (as in training), else fed "
               "at its own size; the logits are upsampled back to the image's size before the argmax.")
    parser.add_argument("run", metavar="RUN",
                        help="run or trial folder, search folder (its best trial), or MLflow model URI "
                             "(models:/rayuda-METHOD@champion: the latest confirmed winner; models:/rayuda-METHOD/N, "
                             "runs:/ID/model)")
    parser.add_argument("--images", required=True, metavar="PATH",
                        help="an image, a folder of *.png/*.jpg/*.jpeg (searched recursively), or a folder: "
                             "dataset (PATH/images, optional PATH/labels: then mIoU is reported)")
    parser.add_argument("--out", default="predictions", metavar="DIR", help="output folder (default: predictions)")
    parser.add_argument("--overlay", action="store_true", help="also write image | colour side by side")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default="best",
                        help="best_model.pt (default) or model.pt (the last iteration) of a run folder")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N",
                        help="images per forward pass (default 4; images of one input size share a batch)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="default auto: the GPU when there is one")
    parser.add_argument("--progress-every", type=int, default=50, metavar="N", help="a progress line every N images")
    parser.add_argument("--mlflow-uri", default=None, metavar="URI",
                        help="tracking/registry URI for a model URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if args.batch_size < 1:
            raise RunError(f"--batch-size must be at least 1, got {args.batch_size}")
        device = pick_device(args.device)
        run, note = resolve_run(args.run, args.weights, args.mlflow_uri)
        images = ImageSet(Path(args.images).expanduser(), run.size, run.config["protocol"], exclude=out,
                          preprocessing=run.preprocessing)
        if note:
            print(note, flush=True)
        fed = f"resized to {run.size[0]}x{run.size[1]} (data.size)" if run.size else "at its own size (no data.size)"
        print(f"{run.config['method']} from {run.weights}: {len(images)} images on {device}, each {fed}, "
              f"predictions upsampled to the image's size → {out}", flush=True)
        metrics = predict_folder(run, images, out, batch_size=args.batch_size, overlay=args.overlay, device=device,
                                 progress_every=args.progress_every, log=lambda line: print(line, flush=True))
    except (RunError, ConfigError, DatasetError) as err:
        print(f"error: {_oneline(err)}", file=sys.stderr)
        return 2
    kinds = "labels/, color/" + (", overlay/" if args.overlay else "")
    print(f"wrote {len(images)} predictions to {out} ({kinds})")
    if metrics is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print(f"mIoU {100 * metrics['miou']:.2f} over {metrics['labelled_images']} labelled images; per-class IoU:")
        for name, iou in metrics["per_class_iou"].items():
            print(f"  {name:<14} {'   n/a' if iou is None else f'{100 * iou:6.2f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
