"""Evaluate the final model of every train stage of finished runs on the runs' holdout parts.

    python bench/stage_models.py runs/bench-selftrain/cra-seed0 runs/bench-selftrain/pixintrada-r1-seed0

A multi-stage run reports only its last stages; this shows what each stage before them achieved (the
source-only and inter-domain models a self-training method starts from) on the same selection and test
images, so a method can be compared with its own stages without extra runs. Prints selection / test mIoU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from rayuda.data import open_dataset
from rayuda.engine.checkpoint import load_checkpoint
from rayuda.engine.evaluate import evaluate
from rayuda.engine.pipeline import holdout_parts
from rayuda.models import build_segmenter


def main(argv=None) -> int:
    runs = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    if not runs:
        print(__doc__)
        return 2
    torch.set_num_threads(1)
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        summary = json.loads((run / "summary.json").read_text())
        names = open_dataset(cfg["source"], "train", role="source", protocol=cfg["protocol"]).class_names
        parts = [p for p in holdout_parts(cfg) if p is not None]
        row = {}
        for stage in summary["stages"]:
            if stage["kind"] != "train" or not stage["dir"]:
                continue
            model = build_segmenter(cfg["model"], len(names))
            model.load_state_dict(load_checkpoint(Path(stage["dir"]) / "model.pt"))
            mious = [evaluate(model, part, num_classes=len(names), device=torch.device("cpu"),
                              class_names=names)["miou"] for part in parts]
            row[stage["stage"]] = " / ".join(f"{100 * m:.2f}" for m in mious)
        print(run.name, row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
