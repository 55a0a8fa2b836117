"""Is a model's loss on a target its BatchNorm statistics? Each model scored on the target's test part as trained,
then again after its BatchNorm running statistics are re-estimated on the target's training images alone.

    python bench/bn_stats.py runs/sweep/cada-dusk-s0/v-0.5-seed0 runs/sweep/cada-dusk-s0/stage-cache/adapt-KEY

Each argument is a folder holding ``model.pt`` (a run folder or a stage of the cache); the config is the run's
``config.yaml`` (``--config`` for a stage folder, default: the first argument's). Training forwards the source and
the target through G separately (rayuda's two-domain steps), so G's running statistics are a momentum average of
both domains' batch statistics, while each domain's loss was computed under its own batch's: on a target far from
the source in appearance (dusk, night, fog) the two differ. Re-estimating them on target images only (the
cumulative average over ``--images`` target-train images, in train mode, no gradient: what AdaBN, Li et al. 2016,
does) and scoring again separates what the weights learned from what the mixed statistics cost. Diagnostic only:
the test part's labels are read for scoring, nothing is selected on them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from noise import final_model, miou_of, per_image_confusions  # noqa: E402

from rayuda.data import open_dataset  # noqa: E402
from rayuda.data.transforms import config_transform  # noqa: E402
from rayuda.engine.pipeline import holdout_parts  # noqa: E402
from rayuda.methods import resolve_config  # noqa: E402


@torch.no_grad()
def target_statistics(model: torch.nn.Module, images, batch_size: int) -> None:
    """Replace every BatchNorm layer's running statistics by their cumulative average over ``images``."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: every batch counts the same
    model.train()
    for batch in DataLoader(images, batch_size=batch_size, shuffle=False):
        model(batch["image"])
    model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="folders holding model.pt")
    parser.add_argument("--config", help="the run's config.yaml (default: the first folder's)")
    parser.add_argument("--images", type=int, default=600, help="target-train images for the statistics")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    config = Path(args.config or Path(args.models[0]) / "config.yaml")
    cfg = resolve_config(yaml.safe_load(config.read_text())["method"], None, config)
    test = holdout_parts(cfg)[1]
    train = open_dataset(cfg["target"], "train", role="target", protocol=cfg["protocol"],
                         transform=config_transform(cfg, "target", train=False))
    train = Subset(train, range(min(args.images, len(train))))
    classes = len(test.dataset.class_names)
    print(f"target {cfg['target']}: {len(test)} test images; statistics from {len(train)} target-train images\n")
    print("| model | test mIoU as trained | with target-only BatchNorm statistics | difference |")
    print("|---|---|---|---|")
    for folder in args.models:
        model = final_model(Path(folder), cfg, classes)
        before = miou_of(per_image_confusions(model, test, classes))
        target_statistics(model, train, args.batch_size)
        after = miou_of(per_image_confusions(model, test, classes))
        print(f"| {folder} | {before:.2f} | {after:.2f} | {after - before:+.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
