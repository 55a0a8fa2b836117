"""The one training loop every method and every stage runs through."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rayuda.engine.batches import batch_stream
from rayuda.engine.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from rayuda.engine.context import TrainContext
from rayuda.engine.evaluate import evaluate, selection_score
from rayuda.methods.base import Method
from rayuda.models import param_groups

Report = Callable[[dict[str, Any], Path], None]


@dataclass
class StageData:
    source: torch.utils.data.Dataset
    target: torch.utils.data.Dataset | None
    holdout: torch.utils.data.Dataset
    class_names: list[str]


def poly_lr(base: float, iteration: int, max_iter: int, power: float) -> float:
    """``base · (1 − i/max_iter)^power`` (DeepLab's poly schedule)."""
    return base * (1 - iteration / max_iter) ** power


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_stage(
    *,
    config: dict[str, Any],
    method: Method,
    model: nn.Module,
    data: StageData,
    iters: int,
    lr: float,
    work_dir: Path,
    device: torch.device,
    report: Report | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Train ``model`` with ``method`` for ``iters`` iterations in ``work_dir``; resume if it holds a checkpoint.

    Every ``train.eval_every`` iterations (and at the end) the model is evaluated on the target holdout,
    a checkpoint is written atomically, and ``report(metrics, report_dir)`` is called. Returns the last
    evaluation's metrics plus ``best_score``/``best_iteration``.
    """
    train, optim = config["train"], config["optim"]
    label = label or method.name
    num_classes = len(data.class_names)
    discriminators = nn.ModuleDict(method_discriminators(method, config, model, device, num_classes))
    opt_g = torch.optim.SGD(
        param_groups(model, lr), lr=lr, momentum=optim["momentum"], weight_decay=optim["weight_decay"]
    )
    opt_d = (
        torch.optim.Adam(discriminators.parameters(), lr=optim["lr_d"], betas=tuple(optim["betas"]))
        if len(discriminators)
        else None
    )
    use_amp = bool(train["amp"]) and device.type == "cuda"
    ctx = TrainContext(
        config=config,
        model=model,
        discriminators=discriminators,
        opt_g=opt_g,
        opt_d=opt_d,
        device=device,
        num_classes=num_classes,
        scaler=torch.amp.GradScaler("cuda") if use_amp else None,
        extras={"levels": ["main", "aux"] if config["model"]["multi_level"] else ["main"]},
    )
    g_rates = [group["lr"] for group in opt_g.param_groups]

    state_path = work_dir / "checkpoint.pt"
    log_path = work_dir / "log.jsonl"
    best = {"best_score": float("-inf"), "best_iteration": 0}
    start = 0
    if state_path.exists():
        state = load_checkpoint(state_path)
        model.load_state_dict(state["model"])
        discriminators.load_state_dict(state["discriminators"])
        opt_g.load_state_dict(state["opt_g"])
        if opt_d is not None:
            opt_d.load_state_dict(state["opt_d"])
        set_rng_state(state["rng"])
        start, best = state["iteration"], state["best"]
        _truncate_log(log_path, start)
        print(f"[{label}] resuming from iteration {start} ({state_path})", flush=True)

    seed = int(config["seed"])
    batch_size, workers = config["data"]["batch_size"], config["data"]["num_workers"]
    sources = batch_stream(data.source, batch_size, seed=seed, start=start, stop=iters, num_workers=workers)
    targets = (
        batch_stream(data.target, batch_size, seed=seed + 1, start=start, stop=iters, num_workers=workers)
        if method.uses_target
        else None
    )
    metrics: dict[str, Any] = {}
    tic, window = time.time(), []
    model.train()
    for i in range(start, iters):
        ctx.iteration = i
        factor = poly_lr(1.0, i, iters, optim["power"])
        for group, base in zip(opt_g.param_groups, g_rates, strict=True):
            group["lr"] = base * factor
        if opt_d is not None:
            for group in opt_d.param_groups:
                group["lr"] = optim["lr_d"] * factor
        source = _move(next(sources), device)
        target = _move(next(targets), device) if targets is not None else None
        losses = method.train_step(ctx, source, target)
        window.append(losses)
        with open(log_path, "a") as handle:
            handle.write(json.dumps({"iteration": i + 1, **losses}) + "\n")

        done = i + 1
        if done % train["log_every"] == 0 or done == iters:
            rate = len(window) / max(time.time() - tic, 1e-9)
            mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            text = "  ".join(f"{k} {v:.4f}" for k, v in mean.items())
            print(f"[{label}] iter {done}/{iters}  {text}  ({rate:.1f} it/s)", flush=True)
            tic, window = time.time(), []

        if done % train["eval_every"] == 0 or done == iters:
            report_dir = work_dir / "report"
            metrics = evaluate(
                model,
                data.holdout,
                num_classes=num_classes,
                device=device,
                class_names=data.class_names,
                masks_dir=report_dir / "masks",
                num_masks=train["num_masks"],
            )
            metrics["score"] = selection_score(train["metric"], metrics)
            metrics["iteration"] = done
            metrics.update({f"loss/{k}": v for k, v in (window[-1] if window else losses).items()})
            if metrics["score"] > best["best_score"]:
                best = {"best_score": metrics["score"], "best_iteration": done}
                atomic_save(model.state_dict(), work_dir / "best_model.pt")
            atomic_save(model.state_dict(), report_dir / "model.pt")
            (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
            atomic_save(
                {
                    "model": model.state_dict(),
                    "discriminators": discriminators.state_dict(),
                    "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict() if opt_d is not None else None,
                    "iteration": done,
                    "rng": rng_state(),
                    "best": best,
                },
                state_path,
            )
            shown = f"miou {100 * metrics['miou']:.2f}" if "miou" in metrics else ""
            print(f"[{label}] eval @ {done}: {shown}  score {metrics['score']:.4f}", flush=True)
            sys.stdout.flush()
            if report is not None:
                report(metrics, report_dir)
    atomic_save(model.state_dict(), work_dir / "model.pt")
    return {**metrics, **best}


def method_discriminators(method, config, model, device, num_classes) -> dict[str, nn.Module]:
    probe = TrainContext(
        config=config, model=model, discriminators=nn.ModuleDict(), opt_g=None, opt_d=None, device=device,
        num_classes=num_classes, extras={"levels": ["main", "aux"] if config["model"]["multi_level"] else ["main"]},
    )
    return {name: d.to(device) for name, d in method.discriminators(probe).items()}


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop log lines past the checkpoint, so a resumed run's log reads as if never interrupted."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["iteration"] <= iteration]
    path.write_text("".join(line + "\n" for line in lines))
