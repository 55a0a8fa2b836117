"""Datasets (GTA5, SYNTHIA, Cityscapes, your own folder, the embedded minicity), label protocols and the
joint image/label transform. Entry point: :func:`open_dataset`."""

from __future__ import annotations

from rayuda.data.datasets import (
    SPECS,
    SegmentationDataset,
    open_cityscapes,
    open_dataset,
    open_folder,
    open_gta5,
    open_synthia,
    with_pseudo_labels,
)
from rayuda.data.labels import (
    PROTOCOLS,
    DatasetError,
    cityscapes_lut,
    class_names,
    synthia_lut,
    train_id_lut,
)
from rayuda.data.transforms import Transform

__all__ = [
    "PROTOCOLS",
    "SPECS",
    "DatasetError",
    "SegmentationDataset",
    "Transform",
    "class_names",
    "cityscapes_lut",
    "open_cityscapes",
    "open_dataset",
    "open_folder",
    "open_gta5",
    "open_synthia",
    "synthia_lut",
    "train_id_lut",
    "with_pseudo_labels",
]
