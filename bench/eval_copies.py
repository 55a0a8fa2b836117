"""Bytes written per evaluation of a search trial (what Ray checkpoints, with and without G's weights), on
DeepLab-v2 ResNet-101 (multi-level, as the
GTA5 → Cityscapes presets): a one-trial `rayuda.tune advent` search at a tiny input size (so CPU is enough; the
bytes are G's, whatever the input) with 2 evaluations, then every file an evaluation writes, found on disk:

- the stage cache: ``report/model.pt`` each evaluation, ``best_model.pt`` when the score improves (engine/loop.py);
- Ray's checkpoint of the report (``STORAGE/NAME/<trial>/checkpoint_*``, one per report, the last kept);
- the trial folder's ``best_model.pt`` / ``model.pt`` (hard links into the stage cache: 0 bytes, checked by inode);
- MLflow: the masks of each evaluation (and the best checkpoint once per trial, not per evaluation).

    python bench/eval_copies.py                 # ≈ 3 min on 2 cores; prints a markdown table
    PYTHONPATH=/tmp/rayuda-old python bench/eval_copies.py   # the same for another checkout of the code

The table goes into docs/BENCHMARKS.md (§18).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETS = {"data.size": [32, 64], "data.batch_size": 1, "data.holdout": 4, "stages.source_only.iters": 0,
        "model.backbone": "resnet101", "model.layers": 4, "model.multi_level": True, "train.num_masks": 2,
        "train.probe_images": 2, "train.log_every": 2}


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_search(out: Path) -> subprocess.CompletedProcess:
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    cmd = [sys.executable, "-m", "rayuda.tune", "advent", "--storage", str(out / "store"), "--name", "s",
           "--mlflow-uri", f"sqlite:///{out / 'mlflow.db'}", "--best", str(out / "best.yaml"), *sets,
           "--num-samples", "1", "--max-iters", "4", "--grace", "2", "--no-confirm", "--no-register"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=out, timeout=3600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"})


def measure(out: Path) -> dict:
    """What one trial's evaluations wrote, from the files on disk."""
    exp = out / "store" / "s"
    trial = next((exp / "work" / "trials").iterdir())
    stage = next(p for p in (exp / "stage-cache").iterdir() if p.name.startswith("advent-"))
    evals = [json.loads(line) for line in (stage / "evals.jsonl").read_text().splitlines()]
    model = (stage / "report" / "model.pt").stat().st_size
    improved, best = 0, float("-inf")
    for row in evals:
        if row["score"] > best:
            improved, best = improved + 1, row["score"]
    ray_trials = [p for p in exp.iterdir() if p.is_dir() and (p / "result.json").is_file()]
    checkpoints = sorted(ray_trials[0].glob("checkpoint_*"))
    reports = len((ray_trials[0] / "result.json").read_text().splitlines())
    masks = tree_bytes(stage / "report" / "masks")
    links = {name: (trial / name).stat().st_ino in {(stage / name).stat().st_ino, (stage / "report" / "model.pt")
                                                     .stat().st_ino}
             for name in ("best_model.pt", "model.pt") if (trial / name).exists()}
    return {"evaluations": len(evals), "reports": reports, "model_pt": model, "improved": improved,
            "checkpoint_dirs_kept": len(checkpoints), "checkpoint_bytes": tree_bytes(checkpoints[-1]) if checkpoints
            else 0, "checkpoint_files": sorted(p.name for p in checkpoints[-1].iterdir()) if checkpoints else [],
            "masks_bytes": masks, "trial_links": links}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", help="keep the search here instead of a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rayuda-eval-copies-") as tmp:
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        tic = time.time()
        proc = run_search(out)
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
        m = measure(out)
    import rayuda

    best = m["model_pt"] * m["improved"] / m["evaluations"]
    per_eval = m["model_pt"] + best + m["checkpoint_bytes"] + m["masks_bytes"]
    print(f"code: {Path(rayuda.__file__).parent}; {m['evaluations']} evaluations, {m['reports']} reports to Ray, "
          f"{time.time() - tic:.0f} s\n")
    print("| written per evaluation | MiB | note |\n|---|---|---|")
    print(f"| stage cache `report/model.pt` | {mib(m['model_pt'])} | every evaluation (engine/loop.py) |")
    print(f"| stage cache `best_model.pt` | {mib(best)} | when the score "
          f"improves: {m['improved']} of {m['evaluations']} here |")
    files = ", ".join(m["checkpoint_files"])
    print(f"| Ray checkpoint of the report | {mib(m['checkpoint_bytes'])} | files: {files} |")
    print(f"| trial folder `best_model.pt`, `model.pt` | 0 | hard links into the stage cache: {m['trial_links']} |")
    print(f"| MLflow masks | {mib(m['masks_bytes'])} | the best checkpoint once per trial, not per evaluation |")
    print(f"| **total** | **{mib(per_eval)}** | G = {mib(m['model_pt'])} MiB |")


if __name__ == "__main__":
    main()
