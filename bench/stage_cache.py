"""What the stage cache saved a search: every trial's stages, hit or miss, and the arithmetic.

    python -m rayuda.tune intrada --name cache-demo --no-confirm   # any search
    python bench/stage_cache.py rayuda_results/cache-demo          # its folder

Reads each finished trial's ``summary.json`` (``work/trials/*/summary.json``). For every stage it counts
hits and misses and takes the seconds the stage took when it was computed (``compute_seconds``, recorded
in the stage's ``stage.yaml``). *With the cache* the search paid each distinct stage once (whichever trial
computed it — possibly one ASHA stopped later); *without it* every trial would have computed every one of
its stages. Both sums cover the finished trials' stages (early-stopped trials write no summary).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def cache_accounting(search: Path) -> dict | None:
    """Hit/miss counts per stage and the stage seconds with and without the cache, over the finished trials
    of ``search``; ``None`` when no trial finished."""
    summaries = [json.loads(p.read_text()) for p in sorted(search.glob("work/trials/*/summary.json"))]
    if not summaries:
        return None
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    computed: dict[str, float] = {}  # stage folder → its compute seconds (paid once, by whichever trial)
    without_cache = 0.0
    for summary in summaries:
        for stage in summary["stages"]:
            counts[stage["stage"]][stage["cache"]] += 1
            seconds = stage.get("compute_seconds") or 0.0
            without_cache += seconds
            if stage["dir"]:
                computed[stage["dir"]] = seconds
    return {"finished": len(summaries), "counts": counts, "with_cache": sum(computed.values()),
            "without_cache": without_cache}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("search", type=Path, help="a search folder (STORAGE/NAME)")
    args = parser.parse_args(argv)
    found = cache_accounting(args.search)
    if found is None:
        print(f"error: no finished trial under {args.search}/work/trials", file=sys.stderr)
        return 2
    with_cache, without_cache = found["with_cache"], found["without_cache"]
    print(f"{found['finished']} finished trials of {args.search}\n")
    print("| stage | misses | hits | skipped |\n|---|---|---|---|")
    for name, c in found["counts"].items():
        print(f"| {name} | {c['miss']} | {c['hit']} | {c['skipped']} |")
    print(f"\nstage compute time with the cache: {with_cache:.0f} s (each computed stage once)\n"
          f"without it (every trial computes all its stages): {without_cache:.0f} s\n"
          f"saved: {without_cache - with_cache:.0f} s = {100 * (1 - with_cache / max(without_cache, 1e-9)):.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
