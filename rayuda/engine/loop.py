"""The one training loop every train stage of every method runs through."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from rayuda.config import ConfigError
from rayuda.engine import accel
from rayuda.engine.batches import batch_stream
from rayuda.engine.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from rayuda.engine.evaluate import evaluate, selection_score
from rayuda.engine.probe import collect_probe, save_probe
from rayuda.methods.base import Method
from rayuda.methods.context import TrainContext
from rayuda.models import param_groups
from rayuda.models.weights import load_failure
from rayuda.validators import probe_validators

#: ``report(metrics, report_dir)``: an evaluation's metrics, and the folder holding its model and masks
#: (``None`` when a cached stage's evaluations are replayed).
Report = Callable[[dict[str, Any], Path | None], None]

#: A train stage's resume state (weights, optimisers, method state, average, loss scale, RNG), in its work folder
#: while it runs; the stage cache deletes it once the stage is done (``model.pt``/``best_model.pt`` are its output).
RESUME_STATE = "checkpoint.pt"


@dataclass
class Runtime:
    """Settings that do not change what a stage computes (so they are in no cache key)."""

    device: torch.device
    num_workers: int = 0
    log_every: int = 50
    checkpoint_every: int = 100
    channels_last: bool = False  # G, its discriminators and its input in NHWC layout (CUDA)
    cudnn_benchmark: bool = False
    compile: bool = False  # torch.compile of G's training forward pass

    @classmethod
    def of(cls, config: dict[str, Any], device: torch.device) -> Runtime:
        """The runtime settings of a full run config on ``device`` (rayuda.engine.accel resolves the automatic ones)."""
        train = config["train"]
        return cls(device=device, num_workers=accel.num_workers(config["data"]["num_workers"], device),
                   log_every=train["log_every"], checkpoint_every=train["eval_every"],
                   channels_last=accel.channels_last(train, device),
                   cudnn_benchmark=accel.cudnn_benchmark(train, device, accel.gpu_share()),
                   compile=accel.compile_flag(train))


@dataclass
class StageData:
    labelled: torch.utils.data.Dataset  # the two data slots of the stage (Stage.labelled / .unlabelled)
    unlabelled: torch.utils.data.Dataset | None
    holdout: torch.utils.data.Dataset | None  # None: the stage is not evaluated
    class_names: list[str]
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    probe: tuple | None = None  # (target, source) probe sets of a reported stage (rayuda.engine.probe)
    #: the labelled (source) batches leave BatchNorm's running statistics alone (train.bn_stats: target)
    hold_source_statistics: bool = False


def poly_lr(base: float, iteration: int, max_iter: int, power: float) -> float:
    """``base · (1 − i/max_iter)^power`` (DeepLab's poly schedule)."""
    return base * (1 - iteration / max_iter) ** power


def _move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def losses_as_floats(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Several iterations' losses (tensors or numbers) as floats: one device→host copy per device.

    ``train_step`` returns tensors so that an iteration never waits for the device; the loop reads them
    only when it logs, evaluates or checkpoints.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for row in rows:
        for value in row.values():
            if torch.is_tensor(value):
                by_device.setdefault(value.device, []).append(value)
    read: dict[int, float] = {}
    for tensors in by_device.values():
        floats = torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()
        read.update(zip(map(id, tensors), floats, strict=True))
    return [{k: read[id(v)] if torch.is_tensor(v) else float(v) for k, v in row.items()} for row in rows]


def build_context(config, params, method: Method, model: nn.Module, data: StageData, lr: float, device,
                  runtime: Runtime | None = None) -> TrainContext:
    """The stage's context: ``method.setup`` on the real model, then the optimisers over what it added."""
    runtime = runtime or Runtime(device=device)
    ctx = TrainContext(config=config, model=model, device=device, num_classes=len(data.class_names), params=params)
    ctx.amp_dtype = accel.amp_dtype(config["train"], device)
    for name, module in data.frozen.items():
        ctx.freeze(name, module.to(device))
    method.setup(ctx)
    ctx.discriminators.to(device)
    if runtime.channels_last:
        ctx.memory_format = torch.channels_last
        for module in (model, ctx.discriminators, *ctx.frozen.values()):
            module.to(memory_format=torch.channels_last)
    if runtime.compile:
        ctx.compiled = torch.compile(model)
    optim = config["optim"]
    ctx.opt_g = torch.optim.SGD(param_groups(model, lr), lr=lr, momentum=optim["momentum"],
                                weight_decay=optim["weight_decay"])
    if len(ctx.discriminators):
        ctx.opt_d = torch.optim.Adam(ctx.discriminators.parameters(), lr=optim["lr_d"], betas=tuple(optim["betas"]))
    if ctx.amp_dtype == torch.float16:
        ctx.scaler = torch.amp.GradScaler(device.type)
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
    stage = StageTraining(label=label, config=config, params=params, method=method, model=model, data=data,
                          work_dir=work_dir, runtime=runtime, report=report)
    return stage.run()


class StageTraining:
    """The state of one train stage while it runs (see :func:`train_stage`): G with its optimisers, its method
    and discriminators (``ctx``), the weight average, the best evaluation so far, and the losses not yet read."""

    def __init__(self, *, label: str, config: dict[str, Any], params: dict[str, Any], method: Method,
                 model: nn.Module, data: StageData, work_dir: Path, runtime: Runtime, report: Report | None):
        schedule = config["stages"][label]
        self.label, self.config, self.method, self.model, self.data = label, config, method, model, data
        self.work_dir, self.runtime, self.report = work_dir, runtime, report
        self.iters, lr = int(schedule["iters"]), float(schedule["lr"])
        self.decay = int(schedule.get("decay_iters") or self.iters)  # the poly length (≥ iters; null: iters)
        self.device = runtime.device
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = runtime.cudnn_benchmark and not config["train"]["deterministic"]
        self.ctx = build_context(config, params, method, model, data, lr, self.device, runtime)
        self.average = weight_average(model, float(config["train"]["ema"]))
        self.scored = self.average.module if self.average is not None else model  # evaluated, saved, handed on
        self.g_rates = [group["lr"] for group in self.ctx.opt_g.param_groups]
        self.evaluated = data.holdout is not None
        self.eval_every = int(config["train"]["eval_every"]) if self.evaluated else 0
        self.state_path, self.log_path = work_dir / RESUME_STATE, work_dir / "log.jsonl"
        self.evals_path = work_dir / "evals.jsonl"
        self.best: dict[str, Any] = {"best_score": float("-inf"), "best_iteration": 0}
        self.window: list[dict[str, float]] = []  # losses read since the last printed line
        self.pending: list[tuple[int, dict[str, Any]]] = []  # (iteration, losses on the device) not yet read

    def resume(self) -> int:
        """Restore the checkpoint, if any (weights, optimisers, method state, average, loss scale, RNG), replay
        the evaluations made before the interruption; the iteration to start from."""
        for orphan in self.work_dir.glob(".*.tmp"):  # left by a process killed while saving (atomic_save)
            orphan.unlink(missing_ok=True)
        if not self.state_path.exists():  # killed before its first checkpoint: lines logged before it go
            _truncate(self.log_path, 0)
            _truncate(self.evals_path, 0)
            return 0
        ctx, state = self.ctx, read_checkpoint(self.state_path)
        self.model.load_state_dict(state["model"])
        ctx.discriminators.load_state_dict(state["discriminators"])
        ctx.opt_g.load_state_dict(state["opt_g"])
        if ctx.opt_d is not None:
            ctx.opt_d.load_state_dict(state["opt_d"])
        self.method.load_state_dict(state["method"])
        if self.average is not None:
            self.average.load_state_dict(state["ema"])
        if ctx.scaler is not None and state.get("scaler"):  # float16's loss scale and its growth count
            ctx.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start, self.best = state["iteration"], state["best"]
        _truncate(self.log_path, start)
        _truncate(self.evals_path, start)
        print(f"[{self.label}] resuming from iteration {start} ({self.state_path})", flush=True)
        if self.report is not None and self.evals_path.exists():  # the evaluations before the interruption
            for line in self.evals_path.read_text().splitlines():
                self.report({**json.loads(line), "replayed": True}, None)
        return start

    def checkpoint(self, done: int) -> None:
        ctx, average = self.ctx, self.average
        atomic_save({"model": self.model.state_dict(), "discriminators": ctx.discriminators.state_dict(),
                     "opt_g": ctx.opt_g.state_dict(), "opt_d": ctx.opt_d.state_dict() if ctx.opt_d is not None
                     else None, "method": self.method.state_dict(), "iteration": done, "rng": rng_state(),
                     "best": self.best, "ema": average.state_dict() if average is not None else None,
                     "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None},
                    self.state_path)

    def evaluate_and_report(self, done: int, losses: dict[str, float]) -> dict[str, Any]:
        report_dir, train, data = self.work_dir / "report", self.config["train"], self.data
        metrics = evaluate(self.scored, data.holdout, num_classes=self.ctx.num_classes, device=self.device,
                           class_names=data.class_names, masks_dir=report_dir / "masks", num_masks=train["num_masks"])
        if data.probe is not None:  # the label-free validators' inputs, kept for recomputing them across trials
            probe = collect_probe(self.scored, data.probe, device=self.device)
            save_probe(probe, self.work_dir / "probe" / f"eval_{done}.npz")
            metrics.update(probe_validators(probe))
        metrics["score"] = selection_score(train["metric"], metrics)
        metrics["iteration"] = done
        metrics.update({f"loss/{k}": v for k, v in losses.items()})
        if metrics["score"] > self.best["best_score"]:
            self.best = {"best_score": metrics["score"], "best_iteration": done}
            atomic_save(self.scored.state_dict(), self.work_dir / "best_model.pt")
        atomic_save(self.scored.state_dict(), report_dir / "model.pt")
        (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        with open(self.evals_path, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        self.checkpoint(done)
        shown = f"miou {100 * metrics['miou']:.2f}  " if "miou" in metrics else ""
        print(f"[{self.label}] eval @ {done}/{self.iters}: {shown}score {metrics['score']:.4f}", flush=True)
        if self.report is not None:
            self.report(metrics, report_dir)
        return metrics

    def read_losses(self) -> dict[str, float]:
        """Read the pending iterations' losses (one sync), append them to log.jsonl; the last one's."""
        rows = losses_as_floats([losses for _, losses in self.pending])
        for (it, _), row in zip(self.pending, rows, strict=True):
            bad = sorted(k for k, v in row.items() if not math.isfinite(v))
            if bad:  # nothing after the last checkpoint is saved: the run stops here, its checkpoint intact
                raise NonFiniteLoss(f"stage {self.label}: loss {', '.join(bad)} became {row[bad[0]]} at iteration "
                                    f"{it} (a learning rate or loss weight too large?); the last checkpoint "
                                    f"({self.state_path}) was kept")
        with open(self.log_path, "a") as handle:
            handle.writelines(json.dumps({"iteration": it, **row}) + "\n"
                              for (it, _), row in zip(self.pending, rows, strict=True))
        self.window.extend(rows)
        self.pending.clear()
        return rows[-1]

    def set_rates(self, i: int) -> None:
        """The poly schedule at iteration ``i``, for G's parameter groups and D's."""
        optim = self.config["optim"]
        factor = poly_lr(1.0, i, self.decay, optim["power"])
        for group, base in zip(self.ctx.opt_g.param_groups, self.g_rates, strict=True):
            group["lr"] = base * factor
        if self.ctx.opt_d is not None:
            for group in self.ctx.opt_d.param_groups:
                group["lr"] = optim["lr_d"] * factor

    def print_losses(self, done: int, since: float) -> None:
        """The mean of each loss since the last line, and the iterations per second."""
        rate = len(self.window) / max(time.time() - since, 1e-9)
        mean = {k: sum(w[k] for w in self.window) / len(self.window) for k in self.window[0]}
        text = "  ".join(f"{k} {v:.4f}" for k, v in mean.items())
        print(f"[{self.label}] iter {done}/{self.iters}  {text}  ({rate:.1f} it/s)", flush=True)
        self.window = []

    def run(self) -> dict[str, Any]:
        start = self.resume()
        seed, iters, runtime, device = int(self.config["seed"]), self.iters, self.runtime, self.device
        batch_size, workers, pin = self.config["data"]["batch_size"], runtime.num_workers, device.type == "cuda"
        labelled_batches = batch_stream(self.data.labelled, batch_size, seed=seed, start=start, stop=iters,
                                        num_workers=workers, pin_memory=pin)
        unlabelled_batches = (batch_stream(self.data.unlabelled, batch_size, seed=seed + 1, start=start, stop=iters,
                                           num_workers=workers, pin_memory=pin)
                              if self.data.unlabelled is not None else None)
        metrics: dict[str, Any] = {}
        if self.evaluated and iters == 0 and start == 0:
            metrics = self.evaluate_and_report(0, {})  # a zero-length reported stage still reports its start model
        tic = time.time()
        self.model.train()
        for i in range(start, iters):
            self.ctx.iteration = i
            self.set_rates(i)
            labelled = _move(next(labelled_batches), device)
            unlabelled = _move(next(unlabelled_batches), device) if unlabelled_batches is not None else None
            self.ctx.held_images = labelled["image"] if self.data.hold_source_statistics else None
            losses = self.method.train_step(self.ctx, labelled, unlabelled)
            if self.average is not None:
                self.average.update_parameters(self.model)
            self.pending.append((i + 1, {k: v.detach() if torch.is_tensor(v) else v for k, v in losses.items()}))
            done = i + 1
            evaluating = self.evaluated and (done % self.eval_every == 0 or done == iters)
            checkpointing = not evaluating and done % runtime.checkpoint_every == 0 and done < iters
            if done % runtime.log_every == 0 or done == iters or evaluating or checkpointing:
                losses = self.read_losses()  # the only host sync of the hot loop
            if done % runtime.log_every == 0 or done == iters:
                self.print_losses(done, tic)
                tic = time.time()
            if evaluating:
                metrics = self.evaluate_and_report(done, losses)
            elif checkpointing:
                self.checkpoint(done)
        atomic_save(self.scored.state_dict(), self.work_dir / "model.pt")
        return {**metrics, **self.best} if self.evaluated else {}


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and BN statistics (``train.ema`` = its decay; 0: none).

    ``θ̄ ← decay·θ̄ + (1 − decay)·θ`` after every step, from the stage's start weights. It smooths SGD's last
    iterates, so that evaluations (and the stage's output) move less with the seed: the mean teacher of Tarvainen &
    Valpola (NeurIPS 2017), used as the evaluated model by DAFormer (Hoyer et al., CVPR 2022, decay 0.999).
    """
    if decay == 0:
        return None
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    average.update_parameters(model)  # the first update copies the start weights
    return average


def _truncate(path: Path, iteration: int) -> None:
    """Drop lines past the checkpoint, so a resumed stage's logs read as if it was never interrupted; a line
    torn by a crash mid-append (or a full disk) is dropped with a warning."""
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"WARNING: {path}:{number}: dropped a torn line ({line[:60]!r})", flush=True)
            continue
        if row["iteration"] <= iteration:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite: the stage stops instead of training on garbage."""


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A stage checkpoint, or a :class:`~rayuda.config.ConfigError` naming the file and what to do."""
    try:
        state = load_checkpoint(path)
    except Exception as err:  # torch raises several types for empty, truncated or foreign files
        reason = load_failure(err)
    else:
        missing = {"model", "iteration", "rng", "best"} - set(state)
        if not missing:
            return state
        reason = f"it lacks {sorted(missing)}"
    raise ConfigError(f"checkpoint {path} cannot be used ({reason}); delete it to restart this stage from its "
                      f"first iteration")
