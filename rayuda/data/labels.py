"""Label protocols and id → train-id lookup tables.

A *protocol* is the list of classes a run trains on:

- ``19``: the standard Cityscapes train ids (road … bicycle).
- ``16``: the SYNTHIA 16 (road, sidewalk, building, wall, fence, pole, traffic light, traffic sign,
  vegetation, sky, person, rider, car, bus, motorcycle, bicycle), renumbered 0..15 in that order.
- ``13``: the SYNTHIA 16 without wall, fence and pole, renumbered 0..12.

Cityscapes (and GTA5, which uses the same ids) are mapped with the official table of
``cityscapesscripts.helpers.labels``; SYNTHIA ids with :data:`SYNTHIA_CLASSES`. Every lookup table maps a
raw label value to a train id of the protocol, 255 (= ignore) for classes outside it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS

IGNORE = 255
PROTOCOLS = (19, 16, 13)

#: SYNTHIA-RAND-CITYSCAPES label id → Cityscapes class name (the 16 classes shared with Cityscapes).
SYNTHIA_CLASSES = {
    3: "road", 4: "sidewalk", 2: "building", 21: "wall", 5: "fence", 7: "pole", 15: "traffic light",
    9: "traffic sign", 6: "vegetation", 1: "sky", 10: "person", 17: "rider", 8: "car", 19: "bus",
    12: "motorcycle", 11: "bicycle",
}  # fmt: skip
#: SYNTHIA-RAND-CITYSCAPES defines ids 0..22; ids without a Cityscapes counterpart are ignored.
SYNTHIA_NUM_IDS = 23

_SYNTHIA16 = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle",
]  # fmt: skip
_DROPPED_IN_13 = {"wall", "fence", "pole"}


class DatasetError(ValueError):
    """Bad dataset input; the one-line message names the file or directory at fault."""


class PairSizeError(DatasetError):
    """An image and its label that decode fine but differ in size (the stock GTA5 has such pairs); what
    ``data.bad_pairs`` decides about (:mod:`rayuda.data.verify`). ``image_size``/``label_size``: (W, H)."""

    def __init__(self, message: str, image_size: tuple[int, int], label_size: tuple[int, int]):
        super().__init__(message)
        self.image_size, self.label_size = tuple(image_size), tuple(label_size)


def _check_protocol(protocol: int) -> int:
    if protocol not in PROTOCOLS:
        valid = ", ".join(map(str, PROTOCOLS))
        raise DatasetError(f"protocol {protocol!r} is not supported; valid protocols: {valid}")
    return int(protocol)


def class_names(protocol: int = 19) -> list[str]:
    """The protocol's class names, in train-id order (Cityscapes spelling, e.g. ``"traffic light"``)."""
    protocol = _check_protocol(protocol)
    if protocol == 19:
        named = sorted((lb.trainId, lb.name) for lb in _CITYSCAPES_LABELS if 0 <= lb.trainId < IGNORE)
        return [name for _, name in named]
    if protocol == 16:
        return list(_SYNTHIA16)
    return [name for name in _SYNTHIA16 if name not in _DROPPED_IN_13]


def _lut(id_to_name: Mapping[int, str], protocol: int) -> np.ndarray:
    index = {name: i for i, name in enumerate(class_names(protocol))}
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for raw, name in id_to_name.items():
        lut[raw] = index.get(name, IGNORE)
    return lut


def cityscapes_lut(protocol: int = 19) -> np.ndarray:
    """Cityscapes label id (0..33, as in ``*_gtFine_labelIds.png`` and GTA5) → train id; 256 uint8 entries."""
    names19 = set(class_names(19))
    table = {lb.id: lb.name for lb in _CITYSCAPES_LABELS if lb.id >= 0 and lb.name in names19}
    return _lut(table, protocol)


def synthia_lut(protocol: int = 16) -> np.ndarray:
    """SYNTHIA label id → train id (by class name; classes outside the 16 are never present)."""
    return _lut(SYNTHIA_CLASSES, protocol)


def cityscapes_ids() -> list[int]:
    """The label ids defined by the Cityscapes table (0..33; ``license plate`` = -1 never occurs in a PNG)."""
    return sorted(lb.id for lb in _CITYSCAPES_LABELS if lb.id >= 0)


def train_id_lut(dataset: str, protocol: int = 19) -> np.ndarray:
    """Lookup table of a dataset family: ``"cityscapes"`` / ``"gta5"`` (Cityscapes ids) or ``"synthia"``."""
    if dataset in ("cityscapes", "gta5"):
        return cityscapes_lut(protocol)
    if dataset == "synthia":
        return synthia_lut(protocol)
    raise DatasetError(f"no label table for dataset {dataset!r}; valid: cityscapes, gta5, synthia")


def mapping_lut(mapping: object, protocol: int, where: str) -> tuple[np.ndarray, list[int]]:
    """Lookup table of a user mapping (the ``mapping`` of a folder dataset's ``classes.yaml``).

    ``mapping`` maps raw pixel values (0..65535) to a class name of the 19 Cityscapes classes, a train id of
    the protocol, or ``255`` / ``"ignore"``. A class the protocol drops (e.g. ``wall`` under 13) maps to
    255. Returns the table (65536 uint8 entries) and the sorted raw values the mapping defines; ``where``
    names the file in error messages.
    """
    if not isinstance(mapping, Mapping) or not mapping:
        raise DatasetError(f"{where}: 'mapping' must be a non-empty mapping of raw pixel value -> class name")
    names, index = class_names(19), {name: i for i, name in enumerate(class_names(protocol))}
    lut = np.full(65536, IGNORE, dtype=np.uint8)
    for raw, target in mapping.items():
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 65536:
            raise DatasetError(f"{where}: mapping key {raw!r} is not a pixel value in 0..65535")
        if (isinstance(target, str) and target.strip().lower() == "ignore") or target == IGNORE:
            continue
        if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(index):
            lut[raw] = target
        elif isinstance(target, str) and target in names:
            lut[raw] = index.get(target, IGNORE)
        else:
            raise DatasetError(
                f"{where}: mapping {raw}: {target!r} is neither a class name ({', '.join(names)}), "
                f"a train id 0..{len(index) - 1}, nor 255/ignore"
            )
    return lut, sorted(int(k) for k in mapping)


def palette(protocol: int) -> np.ndarray:
    """RGB of each train id of ``protocol``: its class's official Cityscapes colour (by name, so the 16- and
    13-class protocols get the right colours too); every other value, 255 (ignore) included, black."""
    from cityscapesscripts.helpers.labels import name2label

    colours = np.zeros((256, 3), dtype=np.uint8)
    for train_id, name in enumerate(class_names(protocol)):
        colours[train_id] = name2label[name].color
    return colours
