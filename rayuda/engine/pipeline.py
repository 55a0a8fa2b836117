"""``run_pipeline``: a method's stages, end to end — the single entry point of ``rayuda.train`` and of
every Ray Tune trial."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from rayuda.config import BASE_DEFAULTS, flatten, resolve_config, save_config
from rayuda.data import open_dataset
from rayuda.data.transforms import Transform
from rayuda.engine.cache import cached_stage, stage_facts
from rayuda.engine.checkpoint import load_checkpoint, seed_everything
from rayuda.engine.loop import Report, StageData, train_stage
from rayuda.methods import get_method
from rayuda.methods.source_only import SourceOnly
from rayuda.models import build_segmenter


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAYUDA_CACHE", Path.home() / ".cache" / "rayuda")) / "stages"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _train_transform(data_cfg: dict) -> Transform:
    return Transform(size=data_cfg["size"], crop=data_cfg["crop"], flip=data_cfg["flip"], jitter=data_cfg["jitter"])


def build_data(cfg: dict[str, Any], *, source_spec: str | None = None) -> StageData:
    """Source train set, unlabelled target train set and the labelled target holdout of a config."""
    protocol, seed = cfg["protocol"], cfg["seed"]
    train_tf = _train_transform(cfg["data"])
    eval_tf = Transform(size=cfg["data"]["size"])
    source = open_dataset(source_spec or cfg["source"], "train", role="source", protocol=protocol,
                          transform=train_tf, seed=seed)
    target = open_dataset(cfg["target"], "train", role="target", protocol=protocol, transform=train_tf, seed=seed)
    holdout = open_dataset(cfg["target"], "val", role="target", protocol=protocol, transform=eval_tf, seed=seed)
    if cfg["data"]["holdout"] is not None:
        holdout = Subset(holdout, range(min(int(cfg["data"]["holdout"]), len(holdout))))
    return StageData(source=source, target=target, holdout=holdout, class_names=list(source.class_names))


def source_stage_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the source-only warm start — and nothing else (its cache key)."""
    data = {k: v for k, v in cfg["data"].items() if k not in ("holdout", "num_workers")}
    optim = {k: cfg["optim"][k] for k in ("momentum", "weight_decay", "power")}
    return {
        "source": cfg["source"],
        "protocol": cfg["protocol"],
        "seed": cfg["seed"],
        "data": data,
        "model": cfg["model"],
        "optim": optim,
        "warm_start": cfg["warm_start"],
        # the holdout only affects the stage's reported score, but keep it so that score is true
        "target": cfg["target"],
        "holdout": cfg["data"]["holdout"],
    }


def run_pipeline(
    config: dict[str, Any],
    out_dir: str | Path,
    report: Report | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``config``'s method end to end into ``out_dir`` and return its summary.

    Stages: the cached source-only warm start (unless ``warm_start`` is null), then the method's own
    stage. ``out_dir`` receives ``config.yaml`` (the resolved config), ``checkpoint.pt`` (resumable),
    ``log.jsonl`` (losses per iteration), ``best_model.pt``/``model.pt`` and ``summary.json``.
    Calling it again on the same ``out_dir`` resumes from the last checkpoint.
    """
    start_time = time.time()
    config = copy.deepcopy(config)
    method_name = config.pop("method")
    cfg = resolve_config(method_name, flatten(config))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    device = pick_device(cfg["train"]["device"])
    data = build_data(cfg)
    num_classes = len(data.class_names)
    seed_everything(cfg["seed"])
    model = build_segmenter(cfg["model"], num_classes).to(device)
    print(f"[{method_name}] {cfg['source']} → {cfg['target']} on {device}, seed {cfg['seed']}, out {out_dir}",
          flush=True)

    stages: list[dict[str, Any]] = []
    if cfg["warm_start"] is not None and not (out_dir / "checkpoint.pt").exists():
        stages.append(_warm_start(cfg, model, data, device, cache_dir))

    method = get_method(method_name)()
    seed_everything(cfg["seed"] + 1)
    tic = time.time()
    final = train_stage(config=cfg, method=method, model=model, data=data, iters=cfg["train"]["iters"],
                        lr=cfg["optim"]["lr"], work_dir=out_dir, device=device, report=report)
    stages.append({"stage": method_name, "seconds": round(time.time() - tic, 2)})

    summary = {
        "method": method_name,
        "miou": final.get("miou", float("nan")),
        "per_class_iou": {k[4:]: v for k, v in final.items() if k.startswith("iou/")},
        "iterations": cfg["train"]["iters"],
        "seconds": round(time.time() - start_time, 2),
        "selection_metric": cfg["train"]["metric"],
        "score": final["score"],
        "best_score": final["best_score"],
        "best_iteration": final["best_iteration"],
        "target_entropy": final["target_entropy"],
        "flip_agreement": final["flip_agreement"],
        "seed": cfg["seed"],
        "stages": stages,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _warm_start(cfg, model, data, device, cache_dir) -> dict[str, Any]:
    """Load the cached source-only stage into ``model``, training it first if no trial has yet."""
    ws = cfg["warm_start"]
    stage_cfg = source_stage_config(cfg)
    tic = time.time()

    def compute(work_dir: Path) -> dict[str, Any]:
        seed_everything(cfg["seed"])
        fresh = build_segmenter(cfg["model"], len(data.class_names)).to(device)
        stage = {**copy.deepcopy(cfg), "train": {**cfg["train"], "eval_every": ws["iters"]}, "params": {}}
        started = time.time()
        result = train_stage(config=stage, method=SourceOnly(), model=fresh, data=data, iters=ws["iters"],
                             lr=ws["lr"], work_dir=work_dir, device=device, label="source_only stage")
        return {"miou": result.get("miou"), "iterations": ws["iters"], "seconds": round(time.time() - started, 2)}

    stage_dir, hit = cached_stage(cache_dir, "source_only", stage_cfg, compute)
    model.load_state_dict(load_checkpoint(stage_dir / "model.pt"))
    facts = stage_facts(stage_dir)
    print(f"[source_only stage] {'cache hit' if hit else 'trained'}: {stage_dir} (miou {facts.get('miou')})",
          flush=True)
    return {"stage": "source_only", "cache": "hit" if hit else "miss", "dir": str(stage_dir),
            "seconds": round(time.time() - tic, 2)}


__all__ = ["run_pipeline", "BASE_DEFAULTS"]
