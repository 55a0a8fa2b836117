"""How well does each label-free selection proxy rank trials against the true target mIoU?

    python -m rayuda.tune cram --name ranks                 # any search on a labelled target
    python bench/proxy_rank.py rayuda_results/ranks         # one or more search folders

Every trial of a search reports, at each evaluation, the true ``miou`` on the labelled holdout and
the label-free proxies (``rayuda.engine.evaluate.SELECTION_METRICS``). For each proxy this prints the
Spearman rank correlation of its score with mIoU (1 = ranks trials exactly as mIoU does):

* over trials, each at its last evaluation (what picking the best trial of a finished search sees);
* over every evaluation of every trial (what ASHA's rung comparisons see);

and the mIoU of the trial the proxy would pick, beside the best trial's. Writes ``proxy_rank.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

from rayuda.engine.evaluate import SELECTION_METRICS, selection_score


def evaluations(search_dir: Path) -> dict[str, list[dict]]:
    """Each trial's reported evaluations (Tune's ``result.json``: one JSON object per line)."""
    trials = {}
    for path in sorted(search_dir.glob("*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "miou" in r]
        if rows:
            trials[f"{search_dir.name}/{path.parent.name}"] = sorted(rows, key=lambda r: r["iteration"])
    return trials


def rank_table(trials: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    last = [rows[-1] for rows in trials.values()]
    every = [r for rows in trials.values() for r in rows]
    best_miou = max(r["miou"] for r in last)
    table = {}
    for name, (key, _) in SELECTION_METRICS.items():
        if name == "miou" or not all(key in r for r in every):
            continue  # not a proxy, or not recorded by this (older) search
        picked = max(last, key=lambda r: selection_score(name, r))
        table[name] = {
            "spearman_trials": float(spearmanr([selection_score(name, r) for r in last],
                                               [r["miou"] for r in last]).statistic),
            "spearman_evaluations": float(spearmanr([selection_score(name, r) for r in every],
                                                    [r["miou"] for r in every]).statistic),
            "picked_miou": 100 * picked["miou"],
            "best_miou": 100 * best_miou,
        }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("searches", nargs="+", type=Path, help="search folders (STORAGE/NAME)")
    parser.add_argument("--json", type=Path, default=Path("proxy_rank.json"))
    args = parser.parse_args(argv)
    trials: dict[str, list[dict]] = {}
    for folder in args.searches:
        found = evaluations(folder)
        if not found:
            print(f"error: {folder}: no trial results (*/result.json with miou)", file=sys.stderr)
            return 2
        trials.update(found)
    table = rank_table(trials)
    n_eval = sum(len(rows) for rows in trials.values())
    print(f"{len(trials)} trials, {n_eval} evaluations")
    print("| proxy | Spearman ρ over trials (last eval) | ρ over all evaluations | mIoU of its pick | best mIoU |")
    print("|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['spearman_trials']:.2f} | {row['spearman_evaluations']:.2f} | "
              f"{row['picked_miou']:.2f} | {row['best_miou']:.2f} |")
    args.json.write_text(json.dumps({"trials": len(trials), "evaluations": n_eval, "proxies": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
