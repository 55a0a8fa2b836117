"""Score finished runs' final models on the test parts of other targets, with bootstrap error bars.

    python bench/score_targets.py runs/cal/source_only-seed0 runs/cal/source_only-seed1 \\
        --targets minicity minicity:dusk minicity:fog minicity:suburb minicity:suburb-dusk

A model trained once (e.g. source-only, which never sees the target) is scored on every shifted minicity target
without training again: the source-only row of each target in docs/BENCHMARKS.md §16. Each run folder's
``config.yaml`` gives G's architecture; the test part is the one a run on that target would report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml
from noise import bootstrap_counts, bootstrap_std, final_model, miou_of, per_image_confusions

from rayuda.engine.pipeline import holdout_parts
from rayuda.methods import resolve_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (config.yaml, model.pt)")
    parser.add_argument("--targets", nargs="+", required=True)
    parser.add_argument("--bootstrap", type=int, default=300)
    args = parser.parse_args(argv)
    print("| target | test images | mIoU (mean ± std over runs) | per run | bootstrap std (one model) |")
    print("|---|---|---|---|---|")
    for target in args.targets:
        mious, stds, images = [], [], 0
        for run in args.runs:
            saved = yaml.safe_load((run / "config.yaml").read_text())
            cfg = resolve_config(saved["method"], {"model": saved["model"], "target": target})
            test = holdout_parts(cfg)[1]
            num_classes = len(test.dataset.class_names)
            confusions = per_image_confusions(final_model(run, cfg, num_classes), test, num_classes)
            images = len(confusions)
            mious.append(miou_of(confusions))
            stds.append(bootstrap_std(confusions, bootstrap_counts(images, args.bootstrap)))
        spread = statistics.stdev(mious) if len(mious) > 1 else 0.0
        print(f"| {target} | {images} | {statistics.mean(mious):.2f} ± {spread:.2f} | "
              f"{', '.join(f'{m:.2f}' for m in mious)} | {statistics.mean(stds):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
