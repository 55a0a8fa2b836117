"""The GPU benchmark behind ``bench/gpu.sh``: one short script for a machine with an NVIDIA GPU.

1. the card, driver and torch build;
2. ``advent`` and ``cram`` training steps on DeepLab-v2 ResNet-101 multi-level at 512×1024, batch 1 (the papers'
   setting), in float32 and in bfloat16 autocast + channels_last, with the peak GPU memory of each;
3. a 4-trial ``python -m rayuda.tune cram`` search on minicity with ``--gpus-per-trial 0.5`` (two trials share
   the card), with each trial process's peak GPU memory sampled from ``nvidia-smi``;
4. a markdown table of the figures (``OUT/gpu_bench.md``, also printed) and the raw rows (``OUT/gpu_bench.json``).

It stops by itself: the search runs under a time limit (``--tune-seconds``) and ``gpu.sh`` wraps everything in
``timeout``. ``--dry-run`` runs the same code on CPU at tiny sizes (multi-level ResNet-18 at 64×96, a 2-trial
search of a few iterations); ``--skip-tune`` leaves the search out (the test of the dry run does: Ray's start
alone takes longer than the test may).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayuda.methods import default_config, get_method  # noqa: E402
from rayuda.methods.context import TrainContext  # noqa: E402
from rayuda.models import build_segmenter, param_groups  # noqa: E402

PAPER_SECONDS_PER_ITER = 1.3  # the papers' DeepLab-v2 R101 loops (1080Ti / Titan X)
NUM_CLASSES = 19


def environment() -> dict:
    env = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "python": platform.python_version(),
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cpu": platform.processor() or platform.machine(), "gpu": None, "driver": None}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        env["bf16"] = torch.cuda.is_bf16_supported()
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        if out:
            env["driver"] = out[0].split(",")[-1].strip()
    return env


def time_step(method_name: str, precision: str, *, model_cfg: dict, size: tuple[int, int], device: torch.device,
              warmup: int, steps: int) -> dict:
    """Seconds per training step (median of ``steps`` after ``warmup``) and the peak memory of one method."""
    torch.manual_seed(0)
    cfg = default_config(method_name)
    cfg["model"].update(model_cfg)
    model = build_segmenter(cfg["model"], NUM_CLASSES).to(device).train()
    ctx = TrainContext(config=cfg, model=model, device=device, num_classes=NUM_CLASSES, params=cfg["params"])
    method = get_method(method_name)()
    method.setup(ctx)
    ctx.discriminators.to(device)
    if precision == "bf16+channels_last":
        ctx.amp_dtype = torch.bfloat16  # what train.amp (default) gives on a CUDA card with bfloat16
        ctx.memory_format = torch.channels_last
        model.to(memory_format=torch.channels_last)
        ctx.discriminators.to(memory_format=torch.channels_last)
    ctx.opt_g = torch.optim.SGD(param_groups(model, 2.5e-4), lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    ctx.opt_d = torch.optim.Adam(ctx.discriminators.parameters(), lr=1e-4, betas=(0.9, 0.99))
    h, w = size
    g = torch.Generator().manual_seed(0)
    source = {"image": torch.randn(1, 3, h, w, generator=g).to(device),
              "label": torch.randint(0, NUM_CLASSES, (1, h, w), generator=g).to(device)}
    target = {"image": torch.randn(1, 3, h, w, generator=g).to(device), "label": torch.full((1, h, w), 255).to(device)}
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # one process owns the card here
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        method.train_step(ctx, source, target)
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        tic = time.perf_counter()
        method.train_step(ctx, source, target)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process-wide on CPU
    del ctx, model, method
    if cuda:
        torch.cuda.empty_cache()
    return {"method": method_name, "precision": precision, "size": f"{h}×{w}", "backbone": model_cfg["backbone"],
            "step_s": statistics.median(times), "min_step_s": min(times), "steps": steps, "peak_gib": peak,
            "memory": "peak GPU memory allocated" if cuda else "peak process RSS (CPU)"}


class GpuMemorySampler(threading.Thread):
    """Peak ``nvidia-smi`` memory of every compute process (pid → MiB), sampled every second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(1.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            for line in out.stdout.strip().splitlines():
                pid, _, mib = line.partition(",")
                if mib.strip().isdigit():
                    self.peaks[pid.strip()] = max(self.peaks.get(pid.strip(), 0), int(mib))


def run_search(out: Path, *, dry_run: bool, seconds: int) -> dict:
    """``python -m rayuda.tune cram`` on minicity, 4 trials at 0.5 GPU each (dry run: 2 CPU trials)."""
    storage = out / "tune"
    cmd = [sys.executable, "-m", "rayuda.tune", "cram", "--storage", str(storage), "--name", "gpu-bench",
           "--no-confirm", "--no-register", "--mlflow-uri", f"sqlite:///{out / 'mlflow.db'}",
           "--best", str(out / "best.yaml"), "--seed", "0"]
    if dry_run:
        cmd += ["--num-samples", "2", "--gpus-per-trial", "0", "--max-iters", "4", "--grace", "2",
                "--set", "stages.source_only.iters=2", "--set", "data.batch_size=2", "--holdout", "8"]
    else:
        cmd += ["--num-samples", "4", "--gpus-per-trial", "0.5", "--cpus-per-trial", "2"]
    sampler = GpuMemorySampler() if shutil.which("nvidia-smi") and not dry_run else None
    if sampler:
        sampler.start()
    tic = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds, cwd=out,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        code, tail = "timeout", ((err.stdout or b"") + (err.stderr or b"")).decode(errors="replace")[-3000:]
    wall = time.time() - tic
    if sampler:
        sampler.stop.set()
    (out / "tune.log").write_text(tail)
    finished = sorted(storage.glob("gpu-bench/work/trials/*/summary.json"))
    mious = [json.loads(p.read_text()).get("miou") for p in finished]
    per_trial = sorted(sampler.peaks.values(), reverse=True) if sampler else []
    return {"command": " ".join(cmd[1:]), "exit": code, "wall_s": wall, "trials_finished": len(finished),
            "best_miou": max((m for m in mious if m is not None), default=None),
            "peak_mib_per_process": per_trial[:8]}


def markdown(env: dict, steps: list[dict], search: dict | None) -> str:
    lines = [f"Card: {env.get('gpu') or 'none (CPU dry run)'}; driver {env.get('driver')}; torch {env['torch']} "
             f"(CUDA {env['cuda_build']}, cuDNN {env['cudnn']}); Python {env['python']}.", "",
             "| method | backbone, input | precision | s / step (median) | it/s | × faster than 1.3 s/it | "
             "peak memory (GiB) |", "|---|---|---|---:|---:|---:|---:|"]
    for r in steps:
        lines.append(f"| {r['method']} | {r['backbone']}, {r['size']}, batch 1 | {r['precision']} | "
                     f"{r['step_s']:.3f} | {1 / r['step_s']:.1f} | {PAPER_SECONDS_PER_ITER / r['step_s']:.1f} | "
                     f"{r['peak_gib']:.2f} |")
    if steps:
        lines += ["", f"Memory: {steps[0]['memory']}."]
    if search is not None:
        best = "—" if search["best_miou"] is None else f"{100 * search['best_miou']:.1f}"
        lines += ["", "| search | exit | wall (s) | trials finished | best mIoU | peak GPU MiB per trial process |",
                  "|---|---|---:|---:|---:|---|",
                  f"| `{search['command']}` | {search['exit']} | {search['wall_s']:.0f} | "
                  f"{search['trials_finished']} | {best} | "
                  f"{', '.join(map(str, search['peak_mib_per_process'])) or '—'} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, measures nothing")
    p.add_argument("--skip-tune", action="store_true", help="leave out the 4-trial search")
    p.add_argument("--out", type=Path, default=Path("gpu-bench"))
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 20; dry run 1)")
    p.add_argument("--tune-seconds", type=int, default=270, help="time limit of the search (default 270 s)")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    env = environment()
    print(json.dumps(env), flush=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(1)
        model_cfg, size, warmup, steps = {"backbone": "resnet18", "layers": 3, "multi_level": True}, (64, 96), 0, 1
    else:
        model_cfg, size, warmup, steps = {"backbone": "resnet101", "layers": 4, "multi_level": True}, (512, 1024), 3, 20
    steps = args.steps or steps
    rows = []
    for method in ("advent", "cram"):
        for precision in ("fp32", "bf16+channels_last"):
            rows.append(time_step(method, precision, model_cfg=model_cfg, size=size, device=device,
                                  warmup=warmup, steps=steps))
            r = rows[-1]
            print(f"{method:7s} {precision:19s} {r['step_s']:.3f} s/step  peak {r['peak_gib']:.2f} GiB", flush=True)
    search = None if args.skip_tune else run_search(args.out, dry_run=args.dry_run, seconds=args.tune_seconds)
    text = markdown(env, rows, search)
    (args.out / "gpu_bench.md").write_text(text)
    (args.out / "gpu_bench.json").write_text(json.dumps({"environment": env, "steps": rows, "search": search},
                                                        indent=1))
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
