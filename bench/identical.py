"""Bit-identical behaviour across a refactor: train a tiny config of every method and print, per method, a hash
of the final weights (every stage's ``model.pt`` of the run, in plan order) and the mIoU.

Run it on two checkouts and compare the tables (docs/BENCHMARKS.md §20)::

    OMP_NUM_THREADS=1 RAYUDA_CACHE=/tmp/cache-a PYTHONPATH=/path/to/checkout python bench/identical.py
    RAYUDA_CACHE=/tmp/empty-a PYTHONPATH=/path/to/checkout python bench/identical.py --datasets

``--datasets`` generates minicity and ``minicity:suburb`` (into an empty ``$RAYUDA_CACHE``, so the checkout's own
generator writes them) and prints a sha256 over every file's relative path and bytes instead.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import torch

from rayuda.engine import run_pipeline
from rayuda.methods import METHODS, resolve_config

TINY = {
    "seed": 0,
    "data.size": [32, 64],
    "data.batch_size": 2,
    "data.holdout": 8,
    "train.eval_every": 4,
    "train.log_every": 4,
    "train.device": "cpu",
    "train.deterministic": True,
    "stages.source_only.iters": 4,
}


def tiny(method: str, iters: int) -> dict:
    """``method``'s defaults at a tiny size: source-only 4 iterations, every later train stage ``iters``."""
    cfg = resolve_config(method, TINY)
    later = {f"stages.{name}.iters": iters for name in cfg["stages"] if name != "source_only"}
    return resolve_config(method, {**TINY, **later})


def weights_hash(path: Path) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (independent of the pickle's framing)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(torch.load(path, map_location="cpu", weights_only=True).items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.view(torch.int16)
                      .numpy().tobytes())
    return digest.hexdigest()[:16]


def tree_hash(root: Path) -> tuple[int, str]:
    """(files, sha256) over every file under ``root`` (hidden lock files left out): relative path, NUL, bytes."""
    digest, count = hashlib.sha256(), 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
        count += 1
    return count, digest.hexdigest()


def dataset_table() -> None:
    from rayuda.data.minicity import ensure_minicity

    print("| dataset | folder | files | sha256 |\n|---|---|---|---|")
    for spec, variant in (("minicity", None), ("minicity:suburb", "suburb")):
        root = ensure_minicity(variant=variant)
        print(f"| `{spec}` | `{root.name}` | {{:,}} | `{{}}` |".format(*tree_hash(root)), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--methods", default=",".join(sorted(METHODS)))
    parser.add_argument("--datasets", action="store_true", help="hash the generated datasets instead of training")
    args = parser.parse_args(argv)
    if args.datasets:
        dataset_table()
        return 0
    torch.manual_seed(0)
    print("| method | stages | final weights (sha256, 16 hex) | mIoU (selection) | test mIoU |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            summary = run_pipeline(tiny(method, args.iters), Path(tmp) / method, cache_dir=Path(tmp) / "cache")
            trained = [s for s in summary["stages"] if (Path(s["dir"]) / "model.pt").exists()]
            digest = hashlib.sha256("".join(weights_hash(Path(s["dir"]) / "model.pt") for s in trained).encode())
            test = ((summary.get("test") or {}).get("final") or {}).get("miou", float("nan"))
            print(f"| {method} | {len(summary['stages'])} | {digest.hexdigest()[:16]} | {summary['miou']!r} | "
                  f"{test!r} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
