"""Initialising G's backbone: ``random``, ``imagenet`` (local torch hub cache only) or a state-dict file.

rayuda never downloads weights. ``imagenet`` loads torchvision's ImageNet checkpoint for the
backbone only if it already lies in the torch hub cache (``torch.hub.get_dir()/checkpoints/``,
i.e. ``$TORCH_HOME/hub/checkpoints``); otherwise it raises, saying which file to put there or how to
pass a local file instead. A path loads a local state dict with ``weights_only=True``: plain, or
nested under ``"state_dict"``/``"model"``; the prefixes ``Scale.`` (the DeepLab ImageNet checkpoint
used by AdaptSegNet/AdvEnt), ``module.`` and ``backbone.`` are stripped. Only backbone tensors are
taken; the file's classifier (``fc.*``, ``layer5.*``/``layer6.*``, ``classifier*``) and other keys the
backbone does not have are ignored, but every backbone tensor must be in the file with the right
shape (BatchNorm ``num_batches_tracked`` counters excepted), else ``ValueError`` lists the keys.

Note: the DeepLab ``Scale.`` ResNet-101 was converted from Caffe, where a bottleneck's stride sits on
its first 1×1 conv; torchvision puts it on the 3×3. The shapes are the same and the file loads, but
the layer2 stride lands on a different conv than in the original network.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

PREFIXES = ("module.", "Scale.", "backbone.")
NESTED = ("state_dict", "model")
#: torchvision weight enums tried for ``init: imagenet``, preferred first (V1 = the classic weights).
IMAGENET = {
    "resnet18": ("ResNet18_Weights", ("IMAGENET1K_V1",)),
    "resnet50": ("ResNet50_Weights", ("IMAGENET1K_V1", "IMAGENET1K_V2")),
    "resnet101": ("ResNet101_Weights", ("IMAGENET1K_V1", "IMAGENET1K_V2")),
    "vgg16": ("VGG16_Weights", ("IMAGENET1K_V1",)),
}
_SHOW = 10


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def _backbone_name(model: nn.Module) -> str:
    name = getattr(model, "backbone_name", None)
    if name not in IMAGENET:
        raise ValueError(
            f"model.init=imagenet: unknown backbone {name!r}; valid values: {', '.join(IMAGENET)}"
        )
    return name


def caffe_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the file holds the DeepLab ``Scale.``-prefixed (Caffe-converted) checkpoint; memory-mapped, so
    only the key index is read. ``False`` when the file cannot be mapped (the full load reports its errors)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format tensor file: read_state_dict says why
        return False
    for key in NESTED:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return isinstance(state, dict) and any(str(k).startswith("Scale.") for k in state)


def apply_init(model: nn.Module, init: Any, preprocessing: str = "imagenet") -> None:
    """``"random"``: keep PyTorch's init; ``"imagenet"``: :func:`load_imagenet_weights`; else a path.

    A Caffe-converted ``Scale.`` checkpoint expects Caffe input (BGR, 0–255, mean subtracted, no std): loading
    it with ``preprocessing="imagenet"`` warns, naming ``model.preprocessing`` (its first conv would see inputs
    ~58× smaller with red and blue swapped).
    """
    if init == "random":
        return
    if init == "imagenet":
        load_imagenet_weights(model)
        return
    if not isinstance(init, str | os.PathLike) or not str(init):
        raise ValueError(
            f"model.init: invalid value {init!r}; valid values: 'random', 'imagenet', or a file path"
        )
    if not Path(init).is_file():
        raise FileNotFoundError(
            f"model.init: {str(init)!r} is neither 'random' nor 'imagenet' nor an existing weights file"
        )
    if preprocessing != "caffe" and caffe_checkpoint(init):
        warnings.warn(f"model.init {str(init)!r} is the Caffe-converted DeepLab checkpoint ('Scale.' keys), which "
                      f"expects BGR 0–255 mean-subtracted input; model.preprocessing is {preprocessing!r}: set "
                      f"model.preprocessing=caffe to use these weights as trained", stacklevel=2)
    load_backbone_weights(model, init)


def imagenet_checkpoint_paths(backbone: str) -> list[tuple[str, Path]]:
    """``(url, cache path)`` of each accepted torchvision ImageNet checkpoint for ``backbone``."""
    if backbone not in IMAGENET:
        raise ValueError(
            f"model.backbone: no ImageNet weights for {backbone!r}; valid values: {', '.join(IMAGENET)}"
        )
    enum_name, members = IMAGENET[backbone]
    enum = getattr(torchvision.models, enum_name)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    out = []
    for member in members:
        url = getattr(enum, member).url
        out.append((url, cache / os.path.basename(urlparse(url).path)))
    return out


def load_imagenet_weights(model: nn.Module) -> list[str]:
    """Load torchvision's ImageNet weights into the backbone from the torch hub cache; never downloads."""
    backbone = _backbone_name(model)
    candidates = imagenet_checkpoint_paths(backbone)
    for _, path in candidates:
        if path.is_file():
            return load_backbone_weights(model, path)
    url, path = candidates[0]
    raise FileNotFoundError(
        f"model.init=imagenet: torchvision's ImageNet weights for {backbone} are not in the torch hub cache "
        f"({path} does not exist) and rayuda never downloads. Either copy that file there (it is {url}; "
        f"TORCH_HOME moves the cache), or set model.init to the path of a local state-dict file "
        f"(a torchvision checkpoint or the DeepLab 'Scale.'-prefixed one)."
    )


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def load_failure(err: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in one line (torch's own message spans a page)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):  # more than tensors, or not a pickle: refused
        boilerplate = ("Please file", "Check the doc", "WeightsUnpickler error:")
        detail = next((ln for ln in lines[1:] if not ln.startswith(boilerplate)), "")
        return f"not a plain tensor file, refused by weights_only loading: {detail}"[:300]
    return f"{type(err).__name__}: {lines[0] if lines else 'the file is empty or truncated'}"[:300]


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (``weights_only=True``), un-nested and with :data:`PREFIXES` stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (or is not a file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"weights file {path}: cannot be read as a state dict ({load_failure(err)})") from err
    for key in NESTED:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path}: expected a state dict, found {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value):
            out[_strip(str(key))] = value
    return out


def _shape(t: torch.Tensor) -> str:
    return "×".join(map(str, t.shape)) or "scalar"


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f" (and {len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load the backbone tensors of the state-dict file ``path`` into ``model.backbone`` (or ``model``).

    Returns the (prefix-stripped) file keys that were ignored. Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` naming the file and the keys at fault when a backbone tensor is
    missing from the file or has another shape.
    """
    target = _backbone(model)
    state = read_state_dict(path)
    own = target.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k} (file {_shape(state[k])}, model {_shape(v)})"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
        raise ValueError(f"weights file {path} does not fit the {type(target).__name__}: " + "; ".join(parts))
    target.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return sorted(k for k in state if k not in own)


#: The name in ``docs/ARCHITECTURE.md``.
load_weights = load_backbone_weights

__all__ = [
    "apply_init",
    "imagenet_checkpoint_paths",
    "load_backbone_weights",
    "load_imagenet_weights",
    "load_weights",
    "read_state_dict",
]
