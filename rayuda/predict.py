"""``python -m rayuda.predict RUN --images PATH``: segment a folder of images with a trained run.

RUN is a run folder (``python -m rayuda.train``'s ``--out``) or a Tune trial folder (``config.yaml`` and
``best_model.pt`` / ``model.pt``), a search folder ``STORAGE/NAME`` (the run of its confirmed winner,
``work/winner.json``; without one, its trial with the highest ``best_score`` in ``work/trials/*/summary.json``),
or an MLflow model URI (``models:/rayuda-cram@champion``: the latest confirmed winner; ``models:/rayuda-cram/3``,
``runs:/...``) logged by :func:`rayuda.hpo.registry.log_winner_model`.

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
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rayuda.config import ConfigError
from rayuda.data import DatasetError, open_dataset
from rayuda.data.datasets import IMAGE_SUFFIXES
from rayuda.data.labels import palette
from rayuda.data.transforms import OwnLabelSize
from rayuda.engine.accel import pick_device
from rayuda.runs import WEIGHTS, LoadedRun, RunError, oneline, resolve_run

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
            raise DatasetError(f"{path}: cannot read image ({oneline(err)})") from None

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
            raise DatasetError(f"{path}: cannot read image ({oneline(err)})") from None
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
        try:
            device = pick_device(args.device)
        except ConfigError as err:
            raise RunError(f"--device: {err}") from None
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
        print(f"error: {oneline(err)}", file=sys.stderr)
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
