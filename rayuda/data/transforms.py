"""Joint image/label transform (``torchvision.transforms.v2`` on ``tv_tensors.Image``/``Mask``): resize, random
crop, horizontal flip, photometric augmentations (colour jitter with hue, blur, noise), G's preprocessing.

All randomness comes from the generator passed to :meth:`Transform.__call__` (the datasets seed one per
item from ``(seed, epoch, index)``), so a transform's output is a pure function of its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The DeepLab ImageNet checkpoint (``Scale.`` keys, converted from Caffe) expects BGR in 0–255 minus this
#: per-channel mean (B, G, R), no std division (AdaptSegNet/AdvEnt's ``IMG_MEAN``).
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
#: ``model.preprocessing``: how G expects its input — torchvision's RGB [0, 1] ImageNet mean/std, or Caffe's.
PREPROCESSING = ("imagenet", "caffe")
IGNORE = 255

Generator = np.random.Generator | torch.Generator


def _pair(value: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    """``None``, an int (square) or an (H, W) pair of positive ints."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"Transform {name} must be None or (H, W) positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def normalise(img: torch.Tensor, preprocessing: str = "imagenet") -> torch.Tensor:
    """An RGB 3×H×W image (uint8, or float in [0, 1]) → G's float32 input: ``imagenet`` = RGB in [0, 1],
    ImageNet mean/std; ``caffe`` = BGR in 0–255 minus :data:`CAFFE_MEAN_BGR`, no std (the DeepLab ``Scale.``
    checkpoint's input)."""
    img = F.to_dtype(img, torch.float32, scale=True)
    if preprocessing == "imagenet":
        return F.normalize(img, list(IMAGENET_MEAN), list(IMAGENET_STD))
    if preprocessing == "caffe":
        return img.flip(-3) * 255.0 - torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float32).view(3, 1, 1)
    raise ValueError(f"model.preprocessing must be one of {', '.join(PREPROCESSING)}, got {preprocessing!r}")


def domain_setting(data_cfg, role: str, key: str):
    """``data.<role>.<key>`` (``role`` = ``source`` / ``target``) when set, else the shared ``data.<key>``."""
    own = data_cfg[role][key]
    return data_cfg[key] if own is None else own


def config_transform(cfg, role: str, train: bool) -> Transform:
    """The transform of ``role``'s images (``source`` / ``target``) from a run config: the domain's size
    (:func:`domain_setting`); for training also its crop, flip, jitter and ``data.augment``; G's
    ``model.preprocessing``."""
    data, preprocessing = cfg["data"], cfg["model"]["preprocessing"]
    size = domain_setting(data, role, "size")
    if not train:
        return Transform(size=size, preprocessing=preprocessing)
    return Transform(size=size, crop=domain_setting(data, role, "crop"), flip=data["flip"], jitter=data["jitter"],
                     preprocessing=preprocessing, **data["augment"])


def _randint(rng: Generator, n: int) -> int:
    """A random int in ``[0, n)``."""
    if isinstance(rng, torch.Generator):
        return int(torch.randint(n, (), generator=rng))
    return int(rng.integers(n))


#: ``data.augment`` keys: the photometric augmentations of training images, and their valid ranges.
AUGMENT_RANGES = {"brightness": (0.0, 1.0), "contrast": (0.0, 1.0), "saturation": (0.0, 1.0), "hue": (0.0, 0.5),
                  "blur": (0.0, 10.0), "noise": (0.0, 1.0)}


def _check_range(name: str, value: float) -> float:
    low, high = AUGMENT_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"data.augment.{name} (Transform {name}) must be in [{low}, {high}], got {value!r}")
    return float(value)


class Transform:
    """A joint image/label pipeline of ``torchvision.transforms.v2`` on ``tv_tensors.Image`` / ``Mask``: resize
    (image bilinear, label nearest) → pad to the crop (image 0, label 255, right/bottom) → random crop → random
    horizontal flip → colour jitter (brightness, contrast, saturation, hue; image only) → Gaussian blur →
    Gaussian noise → G's preprocessing (:func:`normalise`).

    Args:
        size: (H, W) to resize to, or None.
        crop: (H, W) random crop, or None; smaller inputs are padded first.
        flip: random horizontal flip with probability 0.5.
        jitter: shorthand for ``brightness = contrast = saturation = jitter`` (each a factor drawn from
            [1 - x, 1 + x]); an explicit ``brightness``/``contrast``/``saturation`` overrides it.
        hue: hue shift drawn from [-hue, hue] (fraction of the colour circle, ≤ 0.5).
        blur: with probability 0.5, a Gaussian blur of sigma drawn from [0.1, blur] pixels (0: off).
        noise: additive Gaussian noise of this std on the [0, 1] image, clipped (0: off).
        preprocessing: ``model.preprocessing`` (:func:`normalise`).

    Reproducible: every random draw comes from the generator passed to :meth:`__call__` — it seeds torch's
    RNG for the v2 pipeline inside ``torch.random.fork_rng``, so the global RNG is left untouched.
    """

    def __init__(
        self,
        size: int | Sequence[int] | None = None,
        crop: int | Sequence[int] | None = None,
        flip: bool = False,
        jitter: float = 0.0,
        preprocessing: str = "imagenet",
        *,
        brightness: float | None = None,
        contrast: float | None = None,
        saturation: float | None = None,
        hue: float = 0.0,
        blur: float = 0.0,
        noise: float = 0.0,
    ):
        self.size, self.crop = _pair(size, "size"), _pair(crop, "crop")
        self.flip = bool(flip)
        if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0.0 <= jitter <= 1.0:
            raise ValueError(f"data.jitter (Transform jitter) must be in [0, 1], got {jitter!r}")
        self.jitter = float(jitter)
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"model.preprocessing must be one of {', '.join(PREPROCESSING)}, got {preprocessing!r}")
        self.preprocessing = preprocessing
        given = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
        self.augment = {k: _check_range(k, self.jitter if v is None else v) for k, v in given.items()}
        self.augment.update(hue=_check_range("hue", hue), blur=_check_range("blur", blur),
                            noise=_check_range("noise", noise))
        self.resize = (v2.Resize(list(self.size), interpolation=InterpolationMode.BILINEAR, antialias=True)
                       if self.size is not None else None)  # on a Mask, v2 resizes nearest
        self.pipeline = self._build()

    def _build(self) -> v2.Compose:
        steps: list[v2.Transform] = []
        if self.crop is not None:
            steps.append(v2.RandomCrop(list(self.crop)))  # the input is padded to at least the crop size first
        if self.flip:
            steps.append(v2.RandomHorizontalFlip(0.5))
        a = self.augment
        if any(a[k] > 0 for k in ("brightness", "contrast", "saturation", "hue")):
            steps.append(v2.ColorJitter(brightness=a["brightness"] or None, contrast=a["contrast"] or None,
                                        saturation=a["saturation"] or None, hue=a["hue"] or None))
        if a["blur"] > 0:
            kernel = 2 * math.ceil(3 * a["blur"]) + 1
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, max(0.1, a["blur"])))], p=0.5))
        steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
        if a["noise"] > 0:
            steps.append(v2.GaussianNoise(mean=0.0, sigma=a["noise"], clip=True))
        return v2.Compose(steps)

    @property
    def random(self) -> bool:
        """Whether the transform draws from its generator."""
        return (self.crop is not None or self.flip or any(v > 0 for v in self.augment.values()))

    def __repr__(self) -> str:
        augment = ", ".join(f"{k}={v}" for k, v in self.augment.items() if v > 0)
        return (f"Transform(size={self.size}, crop={self.crop}, flip={self.flip}"
                f"{', ' + augment if augment else ''}, preprocessing={self.preprocessing!r})")

    def __call__(
        self, image: Image.Image, label: np.ndarray | None = None, rng: Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform a PIL image and its H×W train-id label (None = all ignore).

        Returns a float32 3×H×W image as G expects it and an int64 H×W label.
        """
        if rng is None and self.random:
            raise ValueError("Transform with crop, flip or augmentations needs a generator (rng)")
        img = F.pil_to_tensor(image.convert("RGB"))
        h, w = img.shape[-2:]
        if label is None:
            lbl = torch.full((1, h, w), IGNORE, dtype=torch.uint8)
        else:
            if label.shape != (h, w):
                raise ValueError(f"label shape {label.shape} differs from image shape {(h, w)}")
            lbl = torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8))[None]
        sample = {"image": tv_tensors.Image(img), "label": tv_tensors.Mask(lbl)}
        if self.resize is not None:
            sample = self.resize(sample)
        if self.crop is not None:
            sample = self._pad_to_crop(sample)
        if self.random:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_randint(rng, 2**62))
                sample = self.pipeline(sample)
        else:
            sample = self.pipeline(sample)
        out = normalise(sample["image"].as_subclass(torch.Tensor), self.preprocessing)
        return out.contiguous(), sample["label"].as_subclass(torch.Tensor)[0].long()

    def _pad_to_crop(self, sample: dict) -> dict:
        """Pad right/bottom up to the crop size (image 0, label ignore)."""
        h, w = sample["image"].shape[-2:]
        pad_h, pad_w = max(0, self.crop[0] - h), max(0, self.crop[1] - w)
        if not (pad_h or pad_w):
            return sample
        return {"image": F.pad(sample["image"], [0, 0, pad_w, pad_h], fill=0),
                "label": F.pad(sample["label"], [0, 0, pad_w, pad_h], fill=IGNORE)}


class OwnLabelSize:
    """Evaluation at each label's own resolution — the papers' protocol and ``rayuda.predict``'s: the image as G
    sees it at evaluation (resized to ``size`` when set, G's preprocessing), the label left at the file's size, so
    the logits are upsampled to it (``data.eval_protocol: label``). No randomness. An unlabelled image gets an
    all-ignore label of its own size. Items of different label sizes cannot share a batch: evaluation runs one
    image at a time (:attr:`keeps_label_size`)."""

    random = False
    keeps_label_size = True

    def __init__(self, size: int | Sequence[int] | None = None, preprocessing: str = "imagenet"):
        self.transform = Transform(size=size, preprocessing=preprocessing)
        self.size, self.preprocessing = self.transform.size, preprocessing

    def __repr__(self) -> str:
        return f"OwnLabelSize(size={self.size}, preprocessing={self.preprocessing!r})"

    def __call__(self, image: Image.Image, label: np.ndarray | None = None, rng: Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        img, _ = self.transform(image)
        if label is None:
            return img, torch.full((image.height, image.width), IGNORE, dtype=torch.int64)
        if label.shape != (image.height, image.width):
            raise ValueError(f"label shape {label.shape} differs from image shape {(image.height, image.width)}")
        return img, torch.from_numpy(np.ascontiguousarray(label, dtype=np.uint8)).long()
