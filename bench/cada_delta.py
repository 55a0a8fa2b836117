"""Calibrate CADA's Δ: centroid entropies, kept share and pseudo-label precision against Δ, from one model.

    python bench/cada_delta.py STAGE_DIR [--deltas -0.5 0 0.5 1] [--set key=value ...]

``STAGE_DIR`` is a train stage's folder in the stage cache (its ``model.pt``, e.g. a cada ``adapt-<key>``);
the config must match the one that trained it (``--set`` as for the run). One sweep over target-train
computes every class's centroid entropy E(f^l) (CADA eq. 1–2); then for each Δ the share of each class's
predicted pixels that eq. 3 keeps and, where target-train has labels (minicity does; this is analysis, no
pipeline stage reads them), the precision of the kept labels. Prints a table and writes JSON beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rayuda.config import parse_assignments
from rayuda.data import open_dataset
from rayuda.data.transforms import Transform
from rayuda.engine.checkpoint import load_checkpoint
from rayuda.engine.passes import _softmaxes
from rayuda.methods import resolve_config
from rayuda.methods.cada.labeller import CategoryAdaptiveThresholds
from rayuda.methods.cada.losses import shannon_entropy
from rayuda.models import build_segmenter


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage_dir", type=Path)
    parser.add_argument("--deltas", nargs="+", type=float, default=[-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default STAGE_DIR/../delta-*.json)")
    args = parser.parse_args(argv)
    cfg = resolve_config("cada", parse_assignments(args.set))
    target = open_dataset(cfg["target"], "train", role="target", protocol=cfg["protocol"],
                          transform=Transform(size=cfg["data"]["size"]))
    truths = open_dataset(cfg["target"], "train", role="target", protocol=cfg["protocol"], transform=Transform())
    names = list(target.class_names)
    model = build_segmenter(cfg["model"], len(names))
    model.load_state_dict(load_checkpoint(args.stage_dir / "model.pt"))
    model.eval()
    labeller = CategoryAdaptiveThresholds({"delta": 0.0}, names)
    ents, preds, correct = [], [], []
    for index, (name, prob) in enumerate(_softmaxes(model, target, torch.device("cpu"), 16)):
        labeller.observe(name, prob)
        pred = prob.argmax(0)
        truth = truths[index]["label"]  # at the image's own size, as the softmax
        ents.append(shannon_entropy(prob.double(), dim=0).flatten().float())
        preds.append(pred.flatten().to(torch.uint8))
        correct.append((pred == truth).flatten())
    stats = labeller.decide()
    ent, pred, ok = torch.cat(ents).numpy(), torch.cat(preds).numpy(), torch.cat(correct).numpy()
    rows = []
    for delta in args.deltas:
        row = {"delta": delta, "per_class": {}}
        keep_all = np.zeros_like(ok)
        for c, cls in enumerate(names):
            info = stats["per_class"][cls]
            if not info["pixels"]:
                continue
            mask = pred == c
            keep = mask & (ent < info["centroid_entropy"] - delta)
            keep_all |= keep
            row["per_class"][cls] = {"centroid_entropy": info["centroid_entropy"],
                                     "kept_share": float(keep.sum() / mask.sum()),
                                     "precision": float(ok[keep].mean()) if keep.any() else None}
        row["kept_share"] = float(keep_all.mean())
        row["precision"] = float(ok[keep_all].mean()) if keep_all.any() else None
        rows.append(row)
    print(f"all-pixel argmax accuracy {ok.mean():.3f}; max entropy log C = {np.log(len(names)):.3f} nats")
    print("centroid entropies (nats): " + ", ".join(
        f"{cls} {v['centroid_entropy']:.3f} ({v['pixels']} px)" for cls, v in stats["per_class"].items()
        if v["pixels"]))
    print("| Δ | kept share | precision | per class kept share |\n|---|---|---|---|")
    for row in rows:
        per = ", ".join(f"{cls} {v['kept_share']:.2f}" for cls, v in row["per_class"].items())
        print(f"| {row['delta']:+.2f} | {row['kept_share']:.3f} | {row['precision'] or float('nan'):.3f} | {per} |")
    out = args.out or args.stage_dir.parent / f"delta-{args.stage_dir.name}.json"
    out.write_text(json.dumps({"stage_dir": str(args.stage_dir), "statistics": stats, "sweep": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
