"""The cost of ``--deterministic`` (``torch.use_deterministic_algorithms``): the same short run with it off and
on, interleaved so that both see the same machine load, and whether the results are identical.

    OMP_NUM_THREADS=1 python bench/deterministic.py --method advent --iters 60 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from rayuda.engine import run_pipeline
from rayuda.methods import resolve_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="advent")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    times: dict[bool, list[float]] = {False: [], True: []}
    mious: dict[bool, set[float]] = {False: set(), True: set()}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for deterministic in (False, True):
                cfg = resolve_config(args.method, {"stages.source_only.iters": 0, f"stages.{args.method}.iters":
                                                   args.iters, "train.eval_every": args.iters,
                                                   "train.deterministic": deterministic})
                tic = time.time()
                summary = run_pipeline(cfg, f"{tmp}/{repeat}-{deterministic}", cache_dir=f"{tmp}/cache-{repeat}")
                times[deterministic].append(time.time() - tic)
                mious[deterministic].add(summary["miou"])
    off, on = statistics.mean(times[False]), statistics.mean(times[True])
    print(f"\n{args.method}, {args.iters} iterations, {torch.get_num_threads()} thread(s), {args.repeats} repeats: "
          f"off {off:.1f} s, on {on:.1f} s, ratio {on / off:.2f}; results identical across repeats: "
          f"off {len(mious[False]) == 1}, on {len(mious[True]) == 1}; on == off: {mious[False] == mious[True]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
