"""The noise budget of a comparison on minicity: how far apart two numbers must be to mean something.

    python bench/noise.py --method cram --seeds 0 1 2 3 4 --knob params.w_adv=1.25e-3 --out runs/noise

For one method at a budget (default: the demo's, ``stages.source_only.iters=300`` and 200 iterations of the
method), three kinds of noise of the test-part mIoU (the number searches report):

- **evaluation noise**: the bootstrap std of one fixed model's test mIoU over its test images (the images
  resampled with replacement, ``--bootstrap`` times; mIoU from the summed per-image confusion matrices);
- **training noise**: the std over seeds of the defaults' test mIoU;
- **paired noise**: the std over seeds of the difference between the defaults and a config that differs in
  one knob by a small amount (``--knob``), each seed pairing two runs that share their warm start. Its
  evaluation part is the paired bootstrap (both models' images resampled together).

Every run goes through :func:`rayuda.engine.run_pipeline` (one stage cache, so the source-only stage is trained
once per seed and finished runs are not trained again: rerunning resumes). ``--set`` overrides apply to every
run (e.g. ``target=minicity:...``, ``data.test_fraction=...``); ``--eval-target`` scores the same final models
on another target's test part as well. ``--score-only`` trains nothing and scores the models already in ``OUT``
with this code's data (how the table's rows for a larger test part were made). Prints a Markdown table and
writes ``OUT/noise.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from rayuda.config import parse_assignments
from rayuda.engine import run_pipeline
from rayuda.engine.checkpoint import load_checkpoint
from rayuda.engine.pipeline import holdout_parts
from rayuda.engine.plan import final_stage
from rayuda.methods import resolve_config
from rayuda.metrics import confusion_matrix, mean_iou
from rayuda.models import build_segmenter
from rayuda.models.predict import predict_logits

#: The demo's budget (Makefile DEMO_ARGS): a 300-iteration warm start, 200 iterations of the method.
DEMO = {"stages.source_only.iters": 300}
DEMO_ITERS = 200


@torch.no_grad()
def per_image_confusions(model: torch.nn.Module, dataset, num_classes: int) -> np.ndarray:
    """N×C×C confusion matrices ``[image, gt, pred]`` of ``model`` on every image of ``dataset``."""
    model.eval()
    out = []
    for batch in DataLoader(dataset, batch_size=16, shuffle=False):
        logits = predict_logits(model, batch["image"], batch["label"].shape[-2:])
        for pred, label in zip(logits.argmax(1), batch["label"], strict=True):
            out.append(confusion_matrix(pred, label, num_classes).numpy())
    return np.stack(out)


def miou_of(confusions: np.ndarray, weights: np.ndarray | None = None) -> float:
    """mIoU (in points) of the images' summed confusion matrices, each image counted ``weights[i]`` times."""
    total = confusions.sum(0) if weights is None else np.tensordot(weights, confusions, axes=1)
    return 100 * mean_iou(total)


def bootstrap_counts(n_images: int, draws: int, seed: int = 0) -> np.ndarray:
    """``draws``×N: how often each image is drawn in each bootstrap resample of N images with replacement."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_images, size=(draws, n_images))
    return np.stack([np.bincount(p, minlength=n_images) for p in picks])


def bootstrap_std(confusions: np.ndarray, counts: np.ndarray, other: np.ndarray | None = None) -> float:
    """Bootstrap std of one model's mIoU, or of the difference ``mIoU(other) − mIoU(confusions)`` when
    ``other`` (the same images' matrices of a second model) is given; the same resamples for both."""
    if other is None:
        values = [miou_of(confusions, w) for w in counts]
    else:
        values = [miou_of(other, w) - miou_of(confusions, w) for w in counts]
    return float(np.std(values, ddof=1))


def final_model(run_dir: Path, cfg: dict, num_classes: int) -> torch.nn.Module:
    model = build_segmenter(cfg["model"], num_classes)
    model.load_state_dict(load_checkpoint(run_dir / "model.pt"))
    return model


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="cram")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--knob", nargs="+", default=["params.w_adv=1.25e-3"],
                        help="KEY=VALUE of the second config (the defaults' one knob, moved a little); several "
                             "assignments make a second config that differs in more (e.g. an earlier behaviour)")
    parser.add_argument("--knob-name", default="knob", help="the second config's run folders: OUT/NAME-seedS")
    parser.add_argument("--iters", type=int, default=DEMO_ITERS, help="iterations of the method's last stage")
    parser.add_argument("--set", action="append", default=[], help="override for every run (KEY=VALUE)")
    parser.add_argument("--eval-target", default=None,
                        help="also score the final models on this target's test part (e.g. minicity:fog)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", default="runs/noise")
    parser.add_argument("--score-only", action="store_true",
                        help="train nothing: score the final models already in OUT with this code's config and data "
                             "(e.g. on a larger target-val set than they were trained with)")
    parser.add_argument("--json", default=None, help="where to write the results (default OUT/noise.json)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    common = {**DEMO, **parse_assignments(args.set)}
    configs = {"defaults": {}, "knob": parse_assignments(args.knob)}
    runs: dict[str, dict[int, dict]] = {name: {} for name in configs}
    for seed in args.seeds:
        for name, extra in configs.items():
            cfg = resolve_config(args.method, {**common, **extra, "seed": seed})
            cfg["stages"][final_stage(cfg)]["iters"] = args.iters
            tic = time.time()
            run_dir = out / f"{args.knob_name if name == 'knob' else name}-seed{seed}"
            if args.score_only:
                if not (run_dir / "model.pt").exists():
                    parser.error(f"--score-only: {run_dir} holds no finished run")
                runs[name][seed] = {"cfg": cfg, "dir": run_dir, "seconds": None}
                continue
            summary = run_pipeline(cfg, run_dir, cache_dir=out / "stage-cache")
            runs[name][seed] = {"cfg": cfg, "dir": run_dir, "seconds": round(time.time() - tic, 1)}
            print(f"== {name} seed {seed}: test mIoU {100 * summary['test']['final']['miou']:.2f}", flush=True)

    results = {"method": args.method, "iters": args.iters, "common": common, "knob": " ".join(args.knob),
               "seeds": args.seeds, "sets": {}}
    sets = {"test part": None} if args.eval_target is None else {"test part": None, args.eval_target: args.eval_target}
    for set_name, target in sets.items():
        confusions: dict[str, dict[int, np.ndarray]] = {name: {} for name in configs}
        for name in configs:
            for seed, run in runs[name].items():
                cfg = run["cfg"] if target is None else {**run["cfg"], "target": target}
                images = holdout_parts(cfg)[1]  # the test part (of the other target: as a run on it reports)
                num_classes = len(images.dataset.class_names)
                confusions[name][seed] = per_image_confusions(final_model(run["dir"], cfg, num_classes), images,
                                                              num_classes)
        n_images = len(next(iter(confusions["defaults"].values())))
        counts = bootstrap_counts(n_images, args.bootstrap)
        mious = {name: [miou_of(confusions[name][s]) for s in args.seeds] for name in configs}
        gains = [k - d for k, d in zip(mious["knob"], mious["defaults"], strict=True)]
        eval_std = [bootstrap_std(confusions["defaults"][s], counts) for s in args.seeds]
        paired_eval_std = [bootstrap_std(confusions["defaults"][s], counts, confusions["knob"][s]) for s in args.seeds]
        results["sets"][set_name] = {
            "images": n_images,
            "miou": mious,
            "gain": gains,
            "evaluation_noise": statistics.mean(eval_std),
            "training_noise": mean_std(mious["defaults"])[1],
            "paired_noise": mean_std(gains)[1],
            "paired_evaluation_noise": statistics.mean(paired_eval_std),
        }
    results["seconds"] = {name: {s: r["seconds"] for s, r in rs.items()} for name, rs in runs.items()}
    out.mkdir(parents=True, exist_ok=True)
    Path(args.json or out / "noise.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    seeds = results["seeds"]
    print(f"\n{results['method']}, {results['iters']} iterations, {results['common']}; knob {results['knob']}; "
          f"seeds {', '.join(map(str, seeds))}\n")
    print("| images scored | defaults mIoU (mean ± std) | knob mIoU | paired gain (mean ± std) | evaluation noise "
          "(bootstrap std, one model) | paired evaluation noise | training noise (std over seeds) | paired noise |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["sets"].items():
        d, k, g = (mean_std(r["miou"]["defaults"]), mean_std(r["miou"]["knob"]), mean_std(r["gain"]))
        print(f"| {name} ({r['images']}) | {d[0]:.2f} ± {d[1]:.2f} | {k[0]:.2f} ± {k[1]:.2f} | "
              f"{g[0]:+.2f} ± {g[1]:.2f} | {r['evaluation_noise']:.2f} | {r['paired_evaluation_noise']:.2f} | "
              f"{r['training_noise']:.2f} | **{r['paired_noise']:.2f}** |")
    for name, r in results["sets"].items():
        print(f"\nper seed ({name}): defaults " + ", ".join(f"{m:.2f}" for m in r["miou"]["defaults"])
              + "; gains " + ", ".join(f"{g:+.2f}" for g in r["gain"]))


if __name__ == "__main__":
    sys.exit(main())
