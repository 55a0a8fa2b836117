"""Run configuration: one nested dict of plain data, strict about its keys.

A run's config is the base defaults below, the method's own knobs (``params``, the paper's values) and
stage schedules (``stages.<name>.iters`` / ``.lr``), then a YAML file, then ``key=value`` overrides with
dotted keys. Unknown keys are errors that list the valid ones, so a typo never silently falls back to a
default. This module knows no method: the registry (``rayuda.methods.resolve_config``) hands it a method's
defaults.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key or value that rayuda cannot accept."""


BASE_DEFAULTS: dict[str, Any] = {
    "method": None,
    "seed": 0,
    "source": "minicity",
    "target": "minicity",
    "protocol": 19,
    "data": {
        "batch_size": 8,
        "size": None,  # [H, W] to resize to before cropping; null keeps the file's size
        "crop": None,  # [H, W] random crop for training; null = whole image
        # per-domain size/crop (GTA5 1280×720 with Cityscapes 1024×512); null = the shared data.size/crop above.
        # The target's size is also the evaluation and pseudo-label size.
        "source": {"size": None, "crop": None},
        "target": {"size": None, "crop": None},
        "flip": True,
        "jitter": 0.0,  # brightness/contrast/saturation factor range [1 - jitter, 1 + jitter] (shorthand)
        # photometric augmentations of training images (rayuda.data.transforms.Transform; searchable):
        # brightness/contrast/saturation null = data.jitter; hue ≤ 0.5; blur = max Gaussian sigma (p = 0.5);
        # noise = std of additive Gaussian noise on the [0, 1] image
        "augment": {"brightness": None, "contrast": None, "saturation": None, "hue": 0.0, "blur": 0.0, "noise": 0.0},
        "holdout": None,  # use only the first N labelled target-val images (selection + test)
        # the labelled target-val images are split, by a seeded hash of their names, into a selection part
        # (the search's score, checkpoint choice) and a test part (the numbers reported as results)
        "test_fraction": 0.5,
        "max_selection": 500,  # at most this many selection images; the rest of a large holdout joins the test part
        "split_seed": 0,
        "num_workers": None,  # DataLoader workers; null: 0 on CPU, min(4, half the CPUs) on CUDA (engine/accel.py)
        # image/label pairs of different sizes (the stock GTA5 has some): "refuse" (the run stops before any
        # compute, naming them) or "skip" (dropped from every dataset the run opens, listed in summary.json)
        "bad_pairs": "refuse",
        # how the target holdout is scored (search, confirmation, test numbers): "label" = at each label's own
        # resolution, logits upsampled to it (the papers' protocol, and rayuda.predict's), one image at a time;
        # "resized" = labels resized to the target size with the images. null: label for gta5/synthia/cityscapes/
        # folder targets, resized for minicity (rayuda.engine.pipeline.resolve_eval_protocol)
        "eval_protocol": None,
    },
    "model": {
        "backbone": "resnet18",
        "layers": 3,
        "multi_level": False,
        "freeze_bn": False,
        "init": "random",
        # G's input: "imagenet" (RGB in [0, 1], ImageNet mean/std: torchvision weights) or "caffe" (BGR in 0–255
        # minus (104.008, 116.669, 122.675), no std: the DeepLab "Scale." checkpoint AdaptSegNet/AdvEnt start from)
        "preprocessing": "imagenet",
        "align_corners": False,  # logits upsampling to label size; the ADVENT/AdaptSegNet/FADA code uses true
    },
    "optim": {  # G's learning rate is per stage: stages.<name>.lr
        "momentum": 0.9,
        "weight_decay": 5.0e-4,
        "lr_d": 1.0e-4,
        "betas": [0.9, 0.99],
        "power": 0.9,
    },
    "train": {
        "eval_every": 100,  # also the checkpoint interval of unreported stages
        "log_every": 50,
        "device": "auto",
        "amp": True,  # autocast of G's forward on CUDA (a no-op on CPU); losses and probabilities in float32
        "amp_dtype": "bfloat16",  # or "float16" (with a gradient scaler)
        "channels_last": None,  # NHWC layout of G and its input; null: on with CUDA (runtime, no cache key)
        "cudnn_benchmark": None,  # null: on with CUDA unless deterministic or the GPU is shared by several trials
        "compile": False,  # torch.compile of G's training forward (runtime)
        "deterministic": False,  # torch.use_deterministic_algorithms (bit-identical reruns on GPUs too)
        "metric": "miou",  # or a label-free validator; "auto": miou on a labelled target, else AUTO_UNLABELLED
        "num_masks": 4,
        "probe_images": 16,  # target-train images each evaluation stores predictions of (rayuda.engine.probe)
        # decay of an exponential moving average of G's weights (0: none): evaluations, the selected and the final
        # model are the average (rayuda.engine.loop.weight_average); training continues on the raw weights
        "ema": 0.0,
        # BatchNorm running statistics in stages that forward source and target images separately: "target" (the
        # source batches are normalised with their own statistics but leave the running ones, so G is evaluated
        # with the target's, as its target losses were computed) or "mixed" (every forward updates them, as every
        # stage did before the key existed; docs/BENCHMARKS.md §28 measures the difference)
        "bn_stats": "target",
    },
    # Per-stage schedules. source_only is the cached stage every plan starts from (iters 0: start the next
    # stage from model.init); a method adds its own stages (rayuda.methods).
    "stages": {"source_only": {"iters": 600, "lr": 0.01}},
    "params": {},
}


def default_config(method: str, params: dict[str, Any], schedules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Base defaults plus a method's paper knobs (``params``) and stage ``schedules``."""
    cfg = copy.deepcopy(BASE_DEFAULTS)
    cfg["method"] = method
    cfg["params"] = copy.deepcopy(params)
    cfg["stages"].update(copy.deepcopy(schedules))
    for schedule in cfg["stages"].values():
        # the poly schedule's nominal length: lr·(1 − i/decay_iters)^power; null = iters (decays to 0 at the end).
        # The references train shorter than they decay (ADVENT 120k of 250k, FADA 40k of 62.5k).
        schedule.setdefault("decay_iters", None)
    return cfg


def parse_value(text: str) -> Any:
    """Parse a command-line value the way YAML would (``1e-3`` → float, ``null`` → None)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            return value
    return value


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` → ``{"a.b": 1, "c": "x"}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = parse_value(text.strip())
    return out


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → dotted keys (leaves only)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def set_key(cfg: dict[str, Any], dotted: str, value: Any, *, source: str = "override") -> None:
    """Set ``cfg[a][b] = value`` for ``dotted = "a.b"``, refusing keys the config does not have."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            valid = ", ".join(sorted(flatten(cfg)))
            raise ConfigError(f"unknown config key {dotted!r} (from {source}); valid keys: {valid}")
        if i == len(parts) - 1:
            node[part] = _coerce(dotted, node[part], value, source)
        else:
            node = node[part]


def _coerce(key: str, default: Any, value: Any, source: str) -> Any:
    """Check ``value`` against the type of the default it replaces."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, list | dict) and isinstance(value, type(default)):
        return value
    raise ConfigError(
        f"config key {key!r} (from {source}) expects {type(default).__name__}, got {value!r}"
    )


def merge(cfg: dict[str, Any], overrides: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Apply a nested or dotted override dict onto ``cfg`` (validated key by key)."""
    for key, value in flatten(overrides).items():
        set_key(cfg, key, value, source=source)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def resolve_config(
    defaults: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    config_file: str | Path | None = None,
) -> dict[str, Any]:
    """A method's ``defaults`` (see :func:`default_config`) ← ``config_file`` ← dotted ``overrides``; validated."""
    cfg = copy.deepcopy(defaults)
    method = cfg["method"]
    if config_file is not None:
        data = load_yaml(config_file)
        file_method = data.pop("method", method)
        if file_method != method:
            raise ConfigError(f"config file {config_file} is for method {file_method!r}, not {method!r}")
        merge(cfg, data, source=str(config_file))
    merge(cfg, overrides or {}, source="--set")
    return cfg


def save_config(cfg: dict[str, Any], path: str | Path, header: list[str] | None = None) -> None:
    """Write ``cfg`` as YAML; ``header`` lines become comments on top (read by people, ignored on load)."""
    comments = "".join(f"# {line}\n" for line in header or [])
    Path(path).write_text(comments + yaml.safe_dump(cfg, sort_keys=False))


def cache_root() -> Path:
    """Where rayuda keeps what it generates or computes once (minicity, the stage cache, the verified inputs):
    ``$RAYUDA_CACHE``, or ``~/.cache/rayuda``."""
    return Path(os.environ.get("RAYUDA_CACHE") or "~/.cache/rayuda").expanduser()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
