"""Segmentation datasets on disk: GTA5, SYNTHIA, Cityscapes, a plain folder, and the embedded minicity.

Every dataset is a :class:`SegmentationDataset` whose items are
``{"image": float32 3×H×W (ImageNet-normalised), "label": int64 H×W train ids (255 = ignore), "name": str}``.
Layouts (``PATH`` is the dataset root):

- ``gta5:PATH``: ``images/NNNNN.png`` with ``labels/NNNNN.png`` (Cityscapes label ids).
- ``synthia:PATH`` (SYNTHIA-RAND-CITYSCAPES): ``RGB/NNNNNNN.png`` with ``GT/LABELS/NNNNNNN.png``; labels may
  be 16-bit and multi-channel, the class id is the first channel.
- ``cityscapes:PATH``: ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png``.
- ``folder:PATH``: ``images/*.png|jpg|jpeg``, optional ``labels/<image stem>.png``. Labels hold Cityscapes
  label ids unless ``PATH/classes.yaml`` maps the raw pixel values::

      mapping:          # raw pixel value -> class name (Cityscapes spelling), train id, or 255 / ignore
        0: road
        1: sidewalk
        2: car
        9: ignore

  A class the protocol drops (e.g. ``wall`` under protocol 13) is ignored; a pixel value missing from the
  mapping is an error. Split ``train`` gives every image (unlabelled ones with all-255 labels); split
  ``val`` gives the labelled images, or, when there are no labels at all, every image with
  ``has_labels = False`` (so label-free model selection still has images).
- ``minicity``: generated on first use (:func:`rayuda.data.minicity.ensure_minicity`); the ``role``
  picks the rendering (``source`` → GTA5 layout, ``target`` → Cityscapes layout), ``minicity:source`` /
  ``minicity:target`` force one.
- ``minicity:NAME`` (``dusk``, ``night``, ``fog``, ``suburb``, ``suburb-dusk``; :data:`rayuda.data.minicity.VARIANTS`):
  the target rendering (Cityscapes layout) of a named target city, whatever the role: as ``--target`` a
  new target, as ``--source`` its oracle (trained on its target-train labels, as ``minicity:target`` is
  the default's).

GTA5 and SYNTHIA have no split folders: both ``train`` and ``val`` give all their images.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset

from rayuda.data.labels import (
    IGNORE,
    SYNTHIA_NUM_IDS,
    DatasetError,
    PairSizeError,
    cityscapes_ids,
    cityscapes_lut,
    class_names,
    mapping_lut,
    synthia_lut,
)
from rayuda.data.transforms import Transform

SPLITS = ("train", "val")
ROLES = ("source", "target")
#: The names of :data:`rayuda.data.minicity.VARIANTS` (spelled out: importing that module here would make
#: ``python -m rayuda.data.minicity`` import it twice; a test checks that the two agree).
MINICITY_VARIANTS = ("dusk", "night", "fog", "suburb", "suburb-dusk")
SPECS = ("minicity", "minicity:source", "minicity:target", *(f"minicity:{name}" for name in MINICITY_VARIANTS),
         "gta5:PATH", "synthia:PATH", "cityscapes:PATH", "folder:PATH")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

Files = list[tuple[Path, Path | None]]


def _reason(exc: BaseException) -> str:
    """An exception as one short line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _read_image(path: Path) -> Image.Image:
    """An RGB PIL image, fully decoded (so truncated files fail here, not later)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read image ({_reason(exc)})") from None


def _png_depth_and_colour(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or None for other files."""
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and len(head) == 26:
        return head[24], head[25]
    return None


def _decode_png16(path: Path) -> np.ndarray:
    """H×W×C uint16 array of a 16-bit multi-channel PNG (PIL would keep only each sample's high byte)."""
    from torchvision.io import ImageReadMode, decode_png, read_file

    try:
        return decode_png(read_file(str(path)), mode=ImageReadMode.UNCHANGED).permute(1, 2, 0).numpy()
    except Exception as exc:
        raise DatasetError(f"{path}: cannot decode 16-bit multi-channel PNG ({_reason(exc)})") from None


def _read_label(path: Path, first_channel: bool) -> np.ndarray:
    """Raw label ids as an H×W integer array; multi-channel labels keep their first channel if allowed."""
    try:
        header = _png_depth_and_colour(path)
        if header is not None and header[0] == 16 and header[1] in (2, 4, 6):  # 16-bit RGB / GA / RGBA
            arr = _decode_png16(path)
        else:
            with Image.open(path) as im:
                im.load()
                arr = np.array(im)  # P → palette indices, L → uint8, I;16 → uint16, I → int32
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"{path}: cannot read label ({_reason(exc)})") from None
    if arr.ndim == 3:
        if not first_channel:
            raise DatasetError(f"{path}: label must be a single-channel PNG of ids ({arr.shape[2]} channels)")
        arr = arr[..., 0]
    if arr.dtype.kind not in "uib":
        raise DatasetError(f"{path}: label must hold integer ids, got {arr.dtype} pixels")
    return arr


def _widen(lut256: np.ndarray) -> np.ndarray:
    """A 256-entry lookup table extended to every 16-bit value (255 beyond)."""
    lut = np.full(65536, IGNORE, dtype=np.uint8)
    lut[:256] = lut256
    return lut


def _known(ids: list[int]) -> np.ndarray:
    known = np.zeros(65536, dtype=bool)
    known[ids] = True
    return known


class SegmentationDataset(Dataset):
    """Image/label pairs mapped to the protocol's train ids.

    Attributes: ``root``, ``files`` (list of (image path, label path or None)), ``class_names``,
    ``has_labels``, ``seed`` and ``epoch`` (settable). Item ``i`` is augmented with a generator seeded by
    ``(seed, epoch, i)``, so it is deterministic. Raw label values outside the dataset's id table raise a
    :class:`DatasetError` naming the file.
    """

    def __init__(
        self,
        root: Path,
        files: Files,
        *,
        protocol: int,
        lut: np.ndarray,
        known: np.ndarray,
        ids: str,
        transform: Transform | None = None,
        seed: int = 0,
        first_channel: bool = False,
    ):
        self.root, self.files, self.protocol = Path(root), list(files), protocol
        self.class_names = class_names(protocol)
        self.has_labels = any(label is not None for _, label in self.files)
        self.transform = transform if transform is not None else Transform()
        self.seed, self.epoch = int(seed), 0
        self._lut, self._known, self._ids, self._first_channel = lut, known, ids, first_channel

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, n={len(self)}, has_labels={self.has_labels})"

    def train_ids(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Map raw label ids to train ids (uint8), rejecting ids outside the table."""
        if raw.dtype == bool:
            raw = raw.astype(np.uint8)
        if int(raw.min()) < 0 or int(raw.max()) >= len(self._known) or not self._known[raw].all():
            values = np.unique(raw)
            bad = [int(v) for v in values if not (0 <= v < len(self._known) and self._known[v])]
            shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
            raise DatasetError(f"{path}: label ids [{shown}] are not in {self._ids}")
        return self._lut[raw]

    @property
    def id_table(self) -> str:
        """A digest of the raw-id table labels are checked against (``rayuda.data.verify`` keys on it)."""
        return hashlib.sha1(self._known.tobytes() + self._lut.tobytes() + bytes([self._first_channel])).hexdigest()

    def load(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        """Item ``index`` decoded and checked, before any transform: (RGB image, train ids or None)."""
        image_path, label_path = self.files[index]
        image = _read_image(image_path)
        label = None
        if label_path is not None:
            raw = _read_label(label_path, self._first_channel)
            if raw.shape != (image.height, image.width):
                raise PairSizeError(
                    f"{label_path}: label is {raw.shape[1]}x{raw.shape[0]} pixels but image {image_path} "
                    f"is {image.width}x{image.height}", (image.width, image.height), (raw.shape[1], raw.shape[0])
                )
            label = self.train_ids(raw, label_path)
        return image, label

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        index = range(len(self.files))[index]
        image, label = self.load(index)
        image_path = self.files[index][0]
        rng = np.random.default_rng([self.seed & (2**64 - 1), self.epoch, index])
        img, lbl = self.transform(image, label, rng)
        return {"image": img, "label": lbl, "name": image_path.name}


# ---------------------------------------------------------------------------------------------- file lists


def _root(path: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise DatasetError(f"split {split!r} is not valid; valid splits: {', '.join(SPLITS)}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root directory does not exist")
    return root


def _dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} directory does not exist")
    return path


def _pair(
    images: dict[str, Path],
    labels: dict[str, Path],
    *,
    image_for: Callable[[str], Path | str],
    label_for: Callable[[str], Path],
    required: bool,
) -> Files:
    """Pair images and labels by key; a label without its image (or, if required, the reverse) is an error."""
    for key, label in labels.items():
        if key not in images:
            raise DatasetError(f"{label}: image file is missing for label (expected {image_for(key)})")
    files: Files = []
    for key, image in images.items():
        label = labels.get(key)
        if label is None and required:
            raise DatasetError(f"{label_for(key)}: label file is missing for image {image}")
        files.append((image, label))
    return files


def _by_stem(directory: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files of ``directory`` with one of ``suffixes`` (case-insensitive), keyed by stem, sorted by name. One
    directory read, no ``stat`` per file (``os.scandir``) and names sorted as strings: a run opens its datasets
    several times, and the stock GTA5 holds 25,000 images (docs/BENCHMARKS.md §17)."""
    with os.scandir(directory) as entries:
        names = sorted(e.name for e in entries if not e.name.startswith(".")
                       and os.path.splitext(e.name)[1].lower() in suffixes and e.is_file())
    found: dict[str, Path] = {}
    for name in names:
        stem = os.path.splitext(name)[0]
        if stem in found:
            raise DatasetError(f"{directory / name}: two files share the stem of {found[stem]}")
        found[stem] = directory / name
    return found


def _flat_files(root: Path, image_dir: str, label_dir: str) -> Files:
    """GTA5/SYNTHIA layout: ``root/image_dir/X.png`` with ``root/label_dir/X.png``, both required."""
    images_at, labels_at = _dir(root / image_dir, "image"), _dir(root / label_dir, "label")
    images, labels = _by_stem(images_at, (".png",)), _by_stem(labels_at, (".png",))
    if not images:
        raise DatasetError(f"{images_at}: no images (*.png) found")
    return _pair(images, labels, image_for=lambda k: images_at / f"{k}.png",
                 label_for=lambda k: labels_at / f"{k}.png", required=True)


def _by_city(directory: Path, suffix: str) -> dict[str, Path]:
    """``<city>/<name><suffix>`` files keyed by ``<city>/<name>``, sorted."""
    return {f"{f.parent.name}/{f.name[: -len(suffix)]}": f for f in sorted(directory.glob("*/*" + suffix))}


def _cityscapes_files(root: Path, split: str) -> Files:
    img_sfx, lbl_sfx = "_leftImg8bit.png", "_gtFine_labelIds.png"
    images_at = _dir(root / "leftImg8bit" / split, f"Cityscapes {split!r} image")
    labels_at = _dir(root / "gtFine" / split, f"Cityscapes {split!r} label")
    images, labels = _by_city(images_at, img_sfx), _by_city(labels_at, lbl_sfx)
    if not images:
        raise DatasetError(f"{images_at}: no images (<city>/*{img_sfx}) found")
    return _pair(images, labels, image_for=lambda k: images_at / f"{k}{img_sfx}",
                 label_for=lambda k: labels_at / f"{k}{lbl_sfx}", required=True)


# ------------------------------------------------------------------------------------------------ openers


def _cityscapes_ids() -> tuple[np.ndarray, str]:
    ids = cityscapes_ids()
    return _known(ids), f"the Cityscapes id table ({min(ids)}..{max(ids)})"


def open_gta5(path: str | Path, split: str, *, protocol: int = 19, transform: Transform | None = None,
              seed: int = 0) -> SegmentationDataset:
    """GTA5 layout (no splits: ``train`` and ``val`` both give every image)."""
    root = _root(path, split)
    known, ids = _cityscapes_ids()
    return SegmentationDataset(root, _flat_files(root, "images", "labels"), protocol=protocol,
                               lut=_widen(cityscapes_lut(protocol)), known=known, ids=ids,
                               transform=transform, seed=seed)


def open_synthia(path: str | Path, split: str, *, protocol: int = 19, transform: Transform | None = None,
                 seed: int = 0) -> SegmentationDataset:
    """SYNTHIA-RAND-CITYSCAPES layout (no splits: ``train`` and ``val`` both give every image)."""
    root = _root(path, split)
    return SegmentationDataset(root, _flat_files(root, "RGB", "GT/LABELS"), protocol=protocol,
                               lut=_widen(synthia_lut(protocol)), known=_known(list(range(SYNTHIA_NUM_IDS))),
                               ids=f"the SYNTHIA id table (0..{SYNTHIA_NUM_IDS - 1})", transform=transform,
                               seed=seed, first_channel=True)


def open_cityscapes(path: str | Path, split: str, *, protocol: int = 19, transform: Transform | None = None,
                    seed: int = 0) -> SegmentationDataset:
    """Cityscapes layout, ``leftImg8bit/<split>`` with ``gtFine/<split>`` label ids."""
    root = _root(path, split)
    known, ids = _cityscapes_ids()
    return SegmentationDataset(root, _cityscapes_files(root, split), protocol=protocol,
                               lut=_widen(cityscapes_lut(protocol)), known=known, ids=ids,
                               transform=transform, seed=seed)


def _folder_mapping(path: Path, protocol: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Lookup table, known ids and their description from a folder's ``classes.yaml``."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DatasetError(f"{path}: cannot read ({_reason(exc)})") from None
    if not isinstance(doc, dict) or set(doc) != {"mapping"}:
        raise DatasetError(f"{path}: must hold exactly one key, 'mapping' (raw pixel value -> class name)")
    lut, ids = mapping_lut(doc["mapping"], protocol, str(path))
    return lut, _known(ids), f"the mapping of {path}"


def open_folder(path: str | Path, split: str, *, protocol: int = 19, transform: Transform | None = None,
                seed: int = 0) -> SegmentationDataset:
    """Your own images, optionally labelled (see the module docstring for the layout and ``classes.yaml``)."""
    root = _root(path, split)
    images_at, labels_at, mapping_at = _dir(root / "images", "image"), root / "labels", root / "classes.yaml"
    images = _by_stem(images_at, IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"{images_at}: no images (*.png, *.jpg, *.jpeg) found")
    labels = _by_stem(labels_at, (".png",)) if labels_at.is_dir() else {}
    if labels_at.is_dir() and not labels:
        raise DatasetError(f"{labels_at}: label directory holds no *.png (remove it for unlabelled data)")
    files = _pair(images, labels, image_for=lambda k: images_at / f"{k}.png|jpg|jpeg",
                  label_for=lambda k: labels_at / f"{k}.png", required=False)
    if split == "val" and labels:
        files = [(image, label) for image, label in files if label is not None]
    if mapping_at.is_file():
        lut, known, ids = _folder_mapping(mapping_at, protocol)
    else:
        (known, ids), lut = _cityscapes_ids(), _widen(cityscapes_lut(protocol))
    return SegmentationDataset(root, files, protocol=protocol, lut=lut, known=known, ids=ids,
                               transform=transform, seed=seed)


def with_pseudo_labels(dataset: SegmentationDataset, label_dir: Path, names: list[str], what: str
                       ) -> SegmentationDataset:
    """The images of ``dataset`` named in ``names``, labelled with the train-id PNGs ``label_dir/<stem>.png``
    a pseudo-label pass wrote (an image without one is unlabelled). Same transform and seed, so image and
    pseudo-label are augmented alike. ``what`` names the labels in errors."""
    wanted = set(names)
    files = []
    for image_path, _ in dataset.files:
        if image_path.name in wanted:
            label = Path(label_dir) / f"{image_path.stem}.png"
            files.append((image_path, label if label.is_file() else None))
    if len(files) != len(wanted):
        raise DatasetError(f"{what}: {len(wanted) - len(files)} image(s) of the subset are not in {dataset.root}")
    num_classes = len(dataset.class_names)
    lut = np.full(65536, IGNORE, dtype=np.uint8)
    lut[:num_classes] = np.arange(num_classes, dtype=np.uint8)
    known = np.zeros(65536, dtype=bool)
    known[:num_classes] = known[IGNORE] = True
    return SegmentationDataset(dataset.root, files, protocol=dataset.protocol, lut=lut, known=known,
                               ids=f"train ids ({what})", transform=dataset.transform, seed=dataset.seed)


def _minicity(spec: str, rendering: str) -> tuple[Callable[..., SegmentationDataset], Path]:
    """Opener and path of minicity's ``source`` / ``target`` rendering, or of a variant's target."""
    from rayuda.data import minicity

    if rendering in minicity.VARIANTS:
        return open_cityscapes, Path(minicity.ensure_minicity(variant=rendering)) / "target"
    if rendering not in ROLES:
        valid = ", ".join(f"minicity:{name}" for name in (*ROLES, *minicity.VARIANTS))
        raise DatasetError(f"dataset spec {spec!r} is not valid: minicity has no rendering or variant "
                           f"{rendering!r}; valid: minicity, {valid}")
    opener = open_gta5 if rendering == "source" else open_cityscapes
    return opener, Path(minicity.ensure_minicity()) / rendering


_OPENERS = {"gta5": open_gta5, "synthia": open_synthia, "cityscapes": open_cityscapes, "folder": open_folder}


def open_dataset(
    spec: str,
    split: str,
    *,
    role: str,
    protocol: int = 19,
    transform: Transform | None = None,
    seed: int = 0,
) -> SegmentationDataset:
    """Open the dataset a spec names (see the module docstring) for ``split`` ("train" / "val").

    ``role`` ("source" / "target") only matters for plain ``minicity``; ``seed`` seeds the augmentation.
    """
    if split not in SPLITS:
        raise DatasetError(f"split {split!r} is not valid; valid splits: {', '.join(SPLITS)}")
    if role not in ROLES:
        raise DatasetError(f"role {role!r} is not valid; valid roles: {', '.join(ROLES)}")
    class_names(protocol)  # validates the protocol before touching the disk
    kind, _, arg = str(spec).partition(":")
    if kind == "minicity":
        opener, path = _minicity(spec, arg or role)
    elif kind in _OPENERS:
        if not arg:
            raise DatasetError(f"dataset spec {spec!r} needs a path, e.g. {kind}:/data/{kind}")
        opener, path = _OPENERS[kind], Path(arg)
    else:
        raise DatasetError(f"dataset spec {spec!r} is not valid; valid specs: {', '.join(SPECS)}")
    return opener(path, split, protocol=protocol, transform=transform, seed=seed)
