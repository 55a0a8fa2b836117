"""GPU speed settings (config ``train.*`` / ``data.num_workers``), resolved for the device a run is on.

Every setting is a no-op on CPU unless asked for explicitly, and only ``train.amp`` / ``train.amp_dtype``
change what a stage computes (they are in its cache key); the rest are runtime settings:

* ``train.amp`` (default on) + ``train.amp_dtype`` (``bfloat16``): autocast of G's forward pass on CUDA.
  Probabilities, every ``log`` and every loss stay float32 (``TrainContext.logits`` and the losses cast up);
  ``float16`` adds a gradient scaler; bfloat16 on a card without it falls back to float16.
* ``train.channels_last`` (``null``: on with CUDA): G, its discriminators and its input in NHWC layout.
* ``train.cudnn_benchmark`` (``null``: on with CUDA, unless ``train.deterministic`` or the GPU is shared by
  several trials — a Ray task holding a fraction of a GPU, ``--gpus-per-trial 0.5`` — where two processes
  autotuning at once can run the card out of memory).
* ``train.compile`` (default off): ``torch.compile`` of G's training forward pass.
* ``data.num_workers`` (``null``: 4 or half the CPUs on CUDA, whichever is fewer; 0 on CPU), pinned memory on
  CUDA, persistent workers when there are workers.
"""

from __future__ import annotations

import sys
import warnings

import torch

from rayuda.config import ConfigError, usable_cpus

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """The device of ``train.device`` / ``--device``: ``auto`` is CUDA when there is one, else the CPU; asking
    for CUDA without one is refused before any work starts."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device is available (use auto or cpu)")
    return device


def amp_dtype(train: dict, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of G's forward pass (``None``: float32)."""
    name = train["amp_dtype"]
    if name not in AMP_DTYPES:
        raise ConfigError(f"train.amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {name!r}")
    if not train["amp"] or device.type != "cuda":
        return None
    if name == "bfloat16" and not torch.cuda.is_bf16_supported():
        warnings.warn("train.amp_dtype: this GPU has no bfloat16; using float16 with a gradient scaler", stacklevel=2)
        return torch.float16
    return AMP_DTYPES[name]


def gpu_share() -> float | None:
    """The share of a GPU Ray gave this process (0.5 in a trial of ``--gpus-per-trial 0.5``); ``None`` outside Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        return ray.get_runtime_context().get_assigned_resources().get("GPU")
    except Exception:  # not in a task or actor (the driver)
        return None


def _auto(value, name: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"train.{name} must be true, false or null (automatic), got {value!r}")
    return value


def channels_last(train: dict, device: torch.device) -> bool:
    return _auto(train["channels_last"], "channels_last", device.type == "cuda")


def cudnn_benchmark(train: dict, device: torch.device, share: float | None) -> bool:
    """cuDNN autotuning: off on CPU, with ``train.deterministic`` and on a GPU shared with other trials."""
    if device.type != "cuda" or train["deterministic"]:
        return False
    return _auto(train["cudnn_benchmark"], "cudnn_benchmark", share is None or share >= 1)


def num_workers(value, device: torch.device) -> int:
    """``data.num_workers``; ``None``: 0 on CPU, on CUDA min(4, half the CPUs this process may use)."""
    if value is None:
        if device.type != "cuda":
            return 0
        return min(4, usable_cpus() // 2)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"data.num_workers must be an int ≥ 0 or null (automatic), got {value!r}")
    return value


def compile_flag(train: dict) -> bool:
    return _auto(train["compile"], "compile", False)
