"""The one training loop every train stage of every method runs through."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rayuda.engine.batches import batch_stream
from rayuda.engine.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from rayuda.engine.evaluate import evaluate, selection_score
from rayuda.methods.base import Method
from rayuda.methods.context import TrainContext
from rayuda.models import param_groups

#: ``report(metrics, report_dir)``: an evaluation's metrics, and the folder holding its model and masks
#: (``None`` when a cached stage's evaluations are replayed).
Report = Callable[[dict[str, Any], Path | None], None]


@dataclass
class Runtime:
    """Settings that do not change what a stage computes (so they are in no cache key)."""

    device: torch.device
    num_workers: int = 0
    log_every: int = 50
    checkpoint_every: int = 100


@dataclass
class StageData:
    source: torch.utils.data.Dataset
    target: torch.utils.data.Dataset | None
    holdout: torch.utils.data.Dataset | None  # None: the stage is not evaluated
    class_names: list[str]
    frozen: dict[str, nn.Module] = field(default_factory=dict)


def poly_lr(base: float, iteration: int, max_iter: int, power: float) -> float:
    """``base · (1 − i/max_iter)^power`` (DeepLab's poly schedule)."""
    return base * (1 - iteration / max_iter) ** power


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _float(value: Any) -> float:
    return float(value.item()) if torch.is_tensor(value) else float(value)


def build_context(config, params, method: Method, model: nn.Module, data: StageData, lr: float, device) -> TrainContext:
    """The stage's context: ``method.setup`` on the real model, then the optimisers over what it added."""
    ctx = TrainContext(config=config, model=model, device=device, num_classes=len(data.class_names), params=params)
    for name, module in data.frozen.items():
        ctx.freeze(name, module.to(device))
    method.setup(ctx)
    ctx.discriminators.to(device)
    optim = config["optim"]
    ctx.opt_g = torch.optim.SGD(param_groups(model, lr), lr=lr, momentum=optim["momentum"],
                                weight_decay=optim["weight_decay"])
    if len(ctx.discriminators):
        ctx.opt_d = torch.optim.Adam(ctx.discriminators.parameters(), lr=optim["lr_d"], betas=tuple(optim["betas"]))
    if config["train"]["amp"] and device.type == "cuda":
        ctx.scaler = torch.amp.GradScaler("cuda")
    return ctx


def train_stage(
    *,
    label: str,
    config: dict[str, Any],
    params: dict[str, Any],
    method: Method,
    model: nn.Module,
    data: StageData,
    work_dir: Path,
    runtime: Runtime,
    report: Report | None = None,
) -> dict[str, Any]:
    """Train ``model`` with ``method`` for ``stages.<label>.iters`` in ``work_dir``; resume from its checkpoint.

    A reported stage (``data.holdout`` set) is evaluated every ``train.eval_every`` iterations and at the
    end: each evaluation is appended to ``evals.jsonl``, its model and masks written to ``report/``, and
    ``report(metrics, report_dir)`` called (iterations counted inside the stage). Checkpoints are atomic.
    Returns the last evaluation's metrics plus ``best_score``/``best_iteration`` (empty when unreported).
    """
    schedule, optim = config["stages"][label], config["optim"]
    iters, lr = int(schedule["iters"]), float(schedule["lr"])
    device = runtime.device
    ctx = build_context(config, params, method, model, data, lr, device)
    opt_g, opt_d = ctx.opt_g, ctx.opt_d
    g_rates = [group["lr"] for group in opt_g.param_groups]
    evaluated = data.holdout is not None
    eval_every = int(config["train"]["eval_every"]) if evaluated else 0

    state_path, log_path, evals_path = work_dir / "checkpoint.pt", work_dir / "log.jsonl", work_dir / "evals.jsonl"
    best: dict[str, Any] = {"best_score": float("-inf"), "best_iteration": 0}
    start = 0
    if state_path.exists():
        state = load_checkpoint(state_path)
        model.load_state_dict(state["model"])
        ctx.discriminators.load_state_dict(state["discriminators"])
        opt_g.load_state_dict(state["opt_g"])
        if opt_d is not None:
            opt_d.load_state_dict(state["opt_d"])
        method.load_state_dict(state["method"])
        set_rng_state(state["rng"])
        start, best = state["iteration"], state["best"]
        _truncate(log_path, start)
        _truncate(evals_path, start)
        print(f"[{label}] resuming from iteration {start} ({state_path})", flush=True)

    def checkpoint(done: int) -> None:
        atomic_save({"model": model.state_dict(), "discriminators": ctx.discriminators.state_dict(),
                     "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict() if opt_d is not None else None,
                     "method": method.state_dict(), "iteration": done, "rng": rng_state(), "best": best},
                    state_path)

    def evaluate_and_report(done: int, losses: dict[str, float]) -> dict[str, Any]:
        nonlocal best
        report_dir = work_dir / "report"
        train = config["train"]
        metrics = evaluate(model, data.holdout, num_classes=ctx.num_classes, device=device,
                           class_names=data.class_names, masks_dir=report_dir / "masks", num_masks=train["num_masks"])
        metrics["score"] = selection_score(train["metric"], metrics)
        metrics["iteration"] = done
        metrics.update({f"loss/{k}": v for k, v in losses.items()})
        if metrics["score"] > best["best_score"]:
            best = {"best_score": metrics["score"], "best_iteration": done}
            atomic_save(model.state_dict(), work_dir / "best_model.pt")
        atomic_save(model.state_dict(), report_dir / "model.pt")
        (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        with open(evals_path, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        checkpoint(done)
        shown = f"miou {100 * metrics['miou']:.2f}  " if "miou" in metrics else ""
        print(f"[{label}] eval @ {done}/{iters}: {shown}score {metrics['score']:.4f}", flush=True)
        if report is not None:
            report(metrics, report_dir)
        return metrics

    seed = int(config["seed"])
    batch_size, workers = config["data"]["batch_size"], runtime.num_workers
    sources = batch_stream(data.source, batch_size, seed=seed, start=start, stop=iters, num_workers=workers)
    targets = (batch_stream(data.target, batch_size, seed=seed + 1, start=start, stop=iters, num_workers=workers)
               if data.target is not None else None)
    metrics: dict[str, Any] = {}
    if evaluated and iters == 0 and start == 0:
        metrics = evaluate_and_report(0, {})  # a zero-length reported stage still reports its start model
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
        losses = {k: _float(v) for k, v in method.train_step(ctx, source, target).items()}
        window.append(losses)
        with open(log_path, "a") as handle:
            handle.write(json.dumps({"iteration": i + 1, **losses}) + "\n")

        done = i + 1
        if done % runtime.log_every == 0 or done == iters:
            rate = len(window) / max(time.time() - tic, 1e-9)
            mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            text = "  ".join(f"{k} {v:.4f}" for k, v in mean.items())
            print(f"[{label}] iter {done}/{iters}  {text}  ({rate:.1f} it/s)", flush=True)
            tic, window = time.time(), []
        if evaluated and (done % eval_every == 0 or done == iters):
            metrics = evaluate_and_report(done, losses)
        elif done % runtime.checkpoint_every == 0 and done < iters:
            checkpoint(done)
    atomic_save(model.state_dict(), work_dir / "model.pt")
    return {**metrics, **best} if evaluated else {}


def _truncate(path: Path, iteration: int) -> None:
    """Drop lines past the checkpoint, so a resumed stage's logs read as if it was never interrupted."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["iteration"] <= iteration]
    path.write_text("".join(line + "\n" for line in lines))
