"""Calibration / results table on minicity: each method at its defaults over several seeds.

    python bench/calibrate.py --methods source_only oracle adaptsegnet advent minent --seeds 0 1 2
    python bench/calibrate.py --methods cram fgdem --seeds 0 1 2 --set ...

``oracle`` is ``source_only`` trained on the *target* training labels (minicity:target as source; with
``--target minicity:NAME``, that variant's).
Variants for ablations: ``NAME=method:key=value,key=value`` e.g. ``cram-no-sfa=cram:params.sfa=false``,
``advent-800=advent:stages.advent.iters=800``. Runs share one stage cache, so every stage a variant shares with
another (the source-only stage at least) is trained once per seed.
Prints a Markdown table (mean ± std of target-val mIoU, wall time per run) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from rayuda.config import parse_assignments, parse_value
from rayuda.engine import run_pipeline
from rayuda.methods import resolve_config


def oracle_source(target: str) -> str:
    """The dataset an oracle trains on: the target's own training labels (``minicity:target`` for the default
    minicity; a ``minicity:NAME`` variant or a labelled dataset spec is its own)."""
    return "minicity:target" if target == "minicity" else target


def parse_variant(text: str, target: str = "minicity") -> tuple[str, str, dict]:
    if text == "oracle":
        return "oracle", "source_only", {"source": oracle_source(target)}
    if "=" not in text:
        return text, text, {}
    name, spec = text.split("=", 1)
    method, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = parse_value(value)
    return name, method, overrides


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+")
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSON",
                        help="no runs: merge the runs of earlier results files and print their table")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--target", default="minicity",
                        help="target of every run, e.g. minicity:fog (the oracle trains on its training labels)")
    parser.add_argument("--set", action="append", default=[], help="override for every run")
    parser.add_argument("--out", default="runs/calibration")
    parser.add_argument("--json", default=None, help="where to write the results (default OUT/results.json)")
    args = parser.parse_args(argv)
    if args.report:
        print_table(merge(args.report))
        return 0
    if not args.methods:
        parser.error("--methods is required (or --report)")
    # a table of methods at fixed configs selects nothing; it reports the final model on the test part (on
    # minicity: the 1,500 target-val images beyond data.max_selection's 500, docs/BENCHMARKS.md §16)
    common = {"target": args.target, **parse_assignments(args.set)}
    out = Path(args.out)
    results = {}
    for variant in args.methods:
        name, method, overrides = parse_variant(variant, args.target)
        rows = []
        for seed in args.seeds:
            cfg = resolve_config(method, {**common, **overrides, "seed": seed})
            tic = time.time()
            summary = run_pipeline(cfg, out / f"{name}-seed{seed}", cache_dir=out / "stage-cache")
            test = (summary.get("test") or {}).get("final") or {}
            rows.append({"seed": seed, "miou": summary["miou"], "test_miou": test.get("miou"),
                         "seconds": time.time() - tic,
                         "stage_seconds": summary["stages"][-1]["seconds"],
                         "stages": {s["stage"]: [s["cache"], s.get("compute_seconds")] for s in summary["stages"]}})
            print(f"== {name} seed {seed}: mIoU {100 * summary['miou']:.2f}", flush=True)
        results[name] = {"method": method, "overrides": overrides, "runs": rows}
    path = Path(args.json) if args.json else out / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"common": common, "seeds": args.seeds, "results": results}, indent=1))
    print_table(results)
    return 0


def merge(paths: list[Path]) -> dict:
    """The runs of several results files, per variant, in seed order."""
    results: dict = {}
    for path in paths:
        for name, r in json.loads(path.read_text())["results"].items():
            results.setdefault(name, {"method": r["method"], "overrides": r["overrides"], "runs": []})
            results[name]["runs"] += r["runs"]
    for r in results.values():
        r["runs"].sort(key=lambda x: x["seed"])
    return results


def print_table(results: dict) -> None:
    """mIoU of the final model on the holdout; with a select/test split (``data.test_fraction`` > 0) the
    summary's ``miou`` is the selection part's, and the test part's is the reported column."""
    split = all(x.get("test_miou") is not None for r in results.values() for x in r["runs"])
    print("\n| run | selection mIoU | test mIoU (mean ± std) | per seed (test) | s / run (method stage) |" if split else
          "\n| run | target-val mIoU (mean ± std) | per seed | s / run (method stage) |")
    print("|---|---|---|---|---|" if split else "|---|---|---|---|")
    for name, r in results.items():
        mious = [100 * x["test_miou" if split else "miou"] for x in r["runs"]]
        std = statistics.stdev(mious) if len(mious) > 1 else 0.0
        per_seed = ", ".join(f"{m:.1f}" for m in mious)
        seconds = statistics.mean(x["seconds"] for x in r["runs"])
        stage = statistics.mean(x["stage_seconds"] for x in r["runs"])
        selection = f"{statistics.mean(100 * x['miou'] for x in r['runs']):.2f} | " if split else ""
        print(f"| {name} | {selection}{statistics.mean(mious):.2f} ± {std:.2f} | {per_seed} | "
              f"{seconds:.0f} ({stage:.0f}) |")


if __name__ == "__main__":
    sys.exit(main())
