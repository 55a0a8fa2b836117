"""Threshold curves: one self-training knob swept over values × seeds on one target, at the demo budget.

    python bench/sweep.py --method cra --knob params.regions.lambda --values 1e-3 3e-3 1e-2 3e-2 1e-1 \
        --seeds 0 1 2 --target minicity:dusk --out runs/sweep/cra-dusk

Every run goes through :func:`rayuda.engine.run_pipeline` with one stage cache per ``OUT``, so per seed the
source-only and first-stage models are trained once and shared by every value (rerunning resumes). Each row
reports the test part's mIoU of the final model (mean ± std over seeds), the gain over the first stage's own
model paired by seed (the model the pseudo-labels were made from, scored on the same test images), and the
pseudo-label pass's statistics against the target's true labels (kept share, precision, recall, rare
classes): diagnostics, never used for selection. ``--iters`` sets every stage after the warm start.
Writes ``OUT/sweep.json``; ``--plot PNG`` draws mIoU and precision against the knob.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noise import final_model, mean_std, miou_of, per_image_confusions  # noqa: E402

from rayuda.config import parse_assignments  # noqa: E402
from rayuda.engine import run_pipeline  # noqa: E402
from rayuda.engine.pipeline import holdout_parts  # noqa: E402
from rayuda.engine.plan import final_stage  # noqa: E402
from rayuda.methods import resolve_config  # noqa: E402

PASS_FACTS = ("labelled_pixel_share", "pseudo/precision", "pseudo/recall", "pseudo/rare_precision",
              "pseudo/rare_recall")


def first_pass(summary: dict) -> tuple[dict | None, dict | None]:
    """The first pseudo-label pass's stage record and the train stage just before it (its teacher)."""
    stages = summary["stages"]
    for index, record in enumerate(stages):
        if record["kind"] == "pseudo_labels":
            return record, stages[index - 1]
    return None, None


def self_training_rounds(summary: dict, cfg: dict) -> list[dict]:
    """Every pseudo-label pass in order (a multi-round method has one per round): its statistics against the true
    labels and the test mIoU of the model trained on it (the final model's for the last)."""
    stages, rounds = summary["stages"], []
    for index, record in enumerate(stages):
        if record["kind"] == "pseudo_labels" and index + 1 < len(stages):
            student = stages[index + 1]
            last = index + 1 == len(stages) - 1
            test = 100 * summary["test"]["final"]["miou"] if last else score_stage(student["dir"], cfg)
            rounds.append({"pass": record["stage"], "stage": student["stage"], "test": test,
                           **{k: record.get(k) for k in PASS_FACTS}})
    return rounds


def score_stage(stage_dir: str, cfg: dict) -> float:
    """Test-part mIoU (points) of the model a stage left in the cache."""
    images = holdout_parts(cfg)[1]
    num_classes = len(images.dataset.class_names)
    return miou_of(per_image_confusions(final_model(Path(stage_dir), cfg, num_classes), images, num_classes))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method")
    parser.add_argument("--knob", help="the config key swept, e.g. params.regions.lambda")
    parser.add_argument("--values", nargs="+", type=float)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--target", default="minicity")
    parser.add_argument("--warm-start", type=int, default=300, help="source-only iterations")
    parser.add_argument("--iters", type=int, default=200, help="iterations of every stage after the warm start")
    parser.add_argument("--final-iters", type=int, default=None,
                        help="iterations of the last (self-training) stage, if not --iters")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="train nothing: merge the sweep.json files of runs split by seed, print, plot")
    parser.add_argument("--set", action="append", default=[], help="override for every run (KEY=VALUE)")
    parser.add_argument("--out")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    if args.merge:
        results = merge([json.loads(Path(f).read_text()) for f in args.merge])
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
        print_table(results)
        if args.plot:
            plot(results, args.plot)
        return 0
    if not (args.method and args.knob and args.values and args.out):
        parser.error("--method, --knob, --values and --out are required (or --merge)")

    out = Path(args.out)
    common = {"target": args.target, "stages.source_only.iters": args.warm_start, **parse_assignments(args.set)}
    rows: dict[float, list[dict]] = {v: [] for v in args.values}
    base: dict[int, float] = {}
    for seed in args.seeds:
        for value in args.values:
            cfg = resolve_config(args.method, {**common, args.knob: value, "seed": seed})
            for name, stage in cfg["stages"].items():
                if name != "source_only" and "iters" in stage and f"stages.{name}.iters" not in common:
                    stage["iters"] = args.iters
            if args.final_iters is not None:
                cfg["stages"][final_stage(cfg)]["iters"] = args.final_iters
            tic = time.time()
            summary = run_pipeline(cfg, out / f"v{value:g}-seed{seed}", cache_dir=out / "stage-cache")
            record, teacher = first_pass(summary)
            if seed not in base and teacher is not None:
                base[seed] = score_stage(teacher["dir"], cfg)
            row = {"seed": seed, "test": 100 * summary["test"]["final"]["miou"],
                   "selected": 100 * summary["test"]["selected"]["miou"],
                   "seconds": round(time.time() - tic, 1),
                   **{k: record.get(k) for k in PASS_FACTS if record is not None}}
            row["gain"] = row["test"] - base[seed] if seed in base else None
            row["rounds"] = self_training_rounds(summary, cfg)
            rows[value].append(row)
            print(f"== {args.knob}={value:g} seed {seed}: test {row['test']:.2f} (first stage "
                  f"{base.get(seed, float('nan')):.2f}), kept {row.get('labelled_pixel_share')}, "
                  f"precision {row.get('pseudo/precision')}", flush=True)
    results = {"method": args.method, "knob": args.knob, "target": args.target, "common": common,
               "iters": args.iters, "final_iters": args.final_iters, "seeds": args.seeds, "first_stage": base,
               "rows": {f"{v:g}": r for v, r in rows.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    if args.plot:
        plot(results, args.plot)
    return 0


def merge(parts: list[dict]) -> dict:
    """One sweep from several of the same sweep split by seed."""
    results = {**parts[0], "seeds": [], "first_stage": {}, "rows": {v: [] for v in parts[0]["rows"]}}
    for part in parts:
        results["seeds"] += part["seeds"]
        results["first_stage"].update(part["first_stage"])
        for value, runs in part["rows"].items():
            results["rows"][value] += runs
    return results


def _ms(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def _percent(records: list[dict], key: str) -> list:
    """``key`` of every record as a percentage (None where a record has none)."""
    return [100 * r[key] if r.get(key) is not None else None for r in records]


def print_table(results: dict) -> None:
    first = list(results["first_stage"].values())
    print(f"\n{results['method']} on {results['target']}: {results['knob']} swept; seeds "
          f"{', '.join(map(str, results['seeds']))}; first stage's model {_ms(first)}\n")
    print(f"| {results['knob']} | test mIoU | gain over first stage (paired) | kept share | precision | recall | "
          "rare precision | rare recall |")
    print("|---|---|---|---|---|---|---|---|")
    for value, runs in results["rows"].items():
        print(f"| {value} | {_ms([r['test'] for r in runs])} | {_ms([r['gain'] for r in runs])} | "
              + " | ".join(_ms(_percent(runs, k)) for k in PASS_FACTS) + " |")
    if any(len(r.get("rounds", [])) > 1 for runs in results["rows"].values() for r in runs):
        print(f"\nper round (mean ± std over seeds; first stage {_ms(first)}):\n")
        print(f"| {results['knob']} | pass → stage | test mIoU after it | kept share | precision | recall |")
        print("|---|---|---|---|---|---|")
        for value, runs in results["rows"].items():
            for k, step in enumerate(runs[0].get("rounds", [])):
                per = [r["rounds"][k] for r in runs if len(r.get("rounds", [])) > k]
                print(f"| {value} | {step['pass']} → {step['stage']} | {_ms([x['test'] for x in per])} | "
                      + " | ".join(_ms(_percent(per, f)) for f in PASS_FACTS[:3]) + " |")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [float(v) for v in results["rows"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((ax1, "test", "test mIoU"), (ax2, "pseudo/precision", "pseudo-label precision")):
        means, stds = [], []
        for runs in results["rows"].values():
            vals = [(r[key] if key == "test" else 100 * r[key]) for r in runs if r.get(key) is not None]
            means.append(statistics.mean(vals) if vals else float("nan"))
            stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        ax.errorbar(values, means, yerr=stds, marker="o", capsize=3)
        if key == "test" and results["first_stage"]:
            ax.axhline(statistics.mean(results["first_stage"].values()), ls="--", c="grey", label="first stage")
            ax.legend()
        ax.set_xlabel(results["knob"])
        ax.set_ylabel(label)
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
    fig.suptitle(f"{results['method']} on {results['target']} (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
