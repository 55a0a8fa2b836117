"""Which label-free validator picks good trials? Rank correlation and pick regret over many trials, two targets.

    python bench/selection.py --out runs/selection                 # 3 methods × 10 trials × 2 targets (hours on CPU)
    python bench/selection.py --out runs/selection-small --small   # tiny images and schedules (~15 min on 1 core)
    python bench/selection.py --out runs/selection --analyse-only  # recompute the table from the stored probes

Targets: ``minicity`` and a minicity variant with another gap (stronger appearance shift, class frequencies
and layout; generator knobs in ``VARIANT``), written as a ``folder:`` target (target-train images
unlabelled, target-val images labelled, so the folder's ``val`` split is the labelled holdout). The source
is minicity's source for both, so the source-only warm start is trained once and shared by every trial.

Trials: for each target and method, ``--trials`` knob settings drawn at random (seeded) from the method's
search space (``search_spaces/METHOD.yaml``), each a full ``run_pipeline`` run with a label-free selection
metric (so every labelled holdout image is a *test* image). Each run stores its probe predictions
(``rayuda.engine.probe``); every validator is computed from its final evaluation, ensemble agreement
against all trials of the same target. Then, per target and validator: Spearman ρ of the validator's score
with test mIoU across all trials and within each method, and the regret of its pick (best test mIoU − the
pick's), with the 5–95 % spread over ``--bootstrap`` resamples of the trials (a resample is a search that
happened to run these trials). Writes ``selection.json``, ``selection.md`` and ``selection.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

VARIANT = {"seed": 1, "gap": 0.7, "frequency_shift": 0.8, "shape_shift": 0.8}
METHODS = ("advent", "minent", "adaptsegnet")
SMALL = {"data.size": [32, 64], "data.batch_size": 4, "data.holdout": 60, "stages.source_only.iters": 200,
         "METHOD.iters": 100, "train.eval_every": 50, "train.probe_images": 8, "train.num_masks": 0}
FULL = {"train.num_masks": 0}
VALIDATORS = {"target_entropy": "entropy (holdout)", "flip_agreement": "flip agreement (holdout)",
              "proxy/entropy": "entropy (probe)", "proxy/im": "IM", "proxy/bnm": "BNM", "proxy/snd": "SND",
              "proxy/dev": "DEV", "proxy/ensemble": "ensemble agreement"}


def write_variant(out: Path, small: bool) -> Path:
    """The variant target as a folder: ``images/`` (train + val), ``labels/`` (val only, Cityscapes label ids)."""
    from rayuda.data.minicity import ensure_minicity

    folder = out / "variant-target"
    if (folder / "done").exists():
        return folder
    knobs = {**VARIANT, **({"source_images": 50, "target_train": 200, "target_val": 60} if small else {})}
    root = ensure_minicity(**knobs)
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for split in ("train", "val"):
        for image in sorted((root / "target" / "leftImg8bit" / split).rglob("*_leftImg8bit.png")):
            stem = image.name.replace("_leftImg8bit.png", "")
            shutil.copy(image, folder / "images" / f"{stem}.png")
            if split == "val":
                label = next((root / "target" / "gtFine" / split).rglob(f"{stem}_gtFine_labelIds.png"))
                shutil.copy(label, folder / "labels" / f"{stem}.png")
    (folder / "done").write_text(json.dumps(knobs))
    return folder


def sample_knobs(method: str, rng: np.random.Generator) -> dict:
    """Knob values drawn uniformly (log-uniformly for log knobs) from the method's search space."""
    from rayuda.hpo.space import load_space

    values = {}
    for knob in load_space(method).knobs:
        if knob.condition and any(values.get(k) not in v for k, v in knob.condition.items()):
            continue
        if knob.type == "categorical":
            values[knob.name] = knob.choices[int(rng.integers(len(knob.choices)))]
        elif knob.type == "int":
            values[knob.name] = int(rng.integers(knob.low, knob.high + 1))
        elif knob.log:
            values[knob.name] = float(math.exp(rng.uniform(math.log(knob.low), math.log(knob.high))))
        else:
            values[knob.name] = float(rng.uniform(knob.low, knob.high))
    return values


def trial_config(method: str, target: str, knobs: dict, small: bool) -> dict:
    from rayuda.config import set_key
    from rayuda.methods import resolve_config

    cfg = resolve_config(method)
    for key, value in (SMALL if small else FULL).items():
        if key == "METHOD.iters":
            key = f"stages.{method}.iters"
        set_key(cfg, key, value, source="bench")
    set_key(cfg, "target", target, source="bench")
    set_key(cfg, "train.metric", "im", source="bench")  # label-free: every labelled holdout image is test
    for key, value in knobs.items():
        set_key(cfg, key, value, source="search space")
    return cfg


def run_one(job: tuple[dict, str, str]) -> str:
    import contextlib
    import io

    import torch

    from rayuda.engine import run_pipeline

    torch.set_num_threads(1)
    cfg, out_dir, cache = job
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_pipeline(cfg, out_dir, cache_dir=cache)
    return f"{out_dir}: test mIoU {100 * summary['test']['final']['miou']:.2f} ({summary['seconds']:.0f} s)"


def collect(args) -> dict[str, Path]:
    out = Path(args.out)
    targets = {"minicity": "minicity", "variant": f"folder:{write_variant(out, args.small)}"}
    jobs = []
    for name, spec in targets.items():
        for method in args.methods:
            rng = np.random.default_rng([args.seed, sum(map(ord, method))])
            for k in range(args.trials):
                knobs = sample_knobs(method, rng)
                if args.lengths:  # trials of several lengths, like a search whose ASHA stopped some early
                    knobs[f"stages.{method}.iters"] = int(args.lengths[int(rng.integers(len(args.lengths)))])
                if name not in args.targets:
                    continue
                jobs.append((trial_config(method, spec, knobs, args.small), str(out / "runs" / name / f"{method}-{k}"),
                             str(out / "stage-cache")))
    todo = [j for j in jobs if not (Path(j[1]) / "summary.json").exists()]
    print(f"{len(jobs)} trials, {len(todo)} to run with {args.workers} worker(s)", flush=True)
    tic = time.time()
    if todo:
        run_one(todo[0])  # trains the shared source-only warm start once, before the workers start
        print(f"[1/{len(todo)}] first trial in {time.time() - tic:.0f} s", flush=True)
    with ProcessPoolExecutor(args.workers) as pool:
        for n, line in enumerate(pool.map(run_one, todo[1:]), start=2):
            print(f"[{n}/{len(todo)}] {line}", flush=True)
    print(f"collected in {time.time() - tic:.0f} s", flush=True)
    return {name: out / "runs" / name for name in targets if name in args.targets}


def _spearman(x, y) -> float:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def analyse(folder: Path, bootstrap: int, seed: int) -> dict:
    """Every validator's Spearman ρ (all trials, within each method) and pick regret (+ bootstrap spread)."""
    from rayuda.validators import score_candidates, search_candidates

    cands = [c for c in score_candidates(search_candidates(folder)) if c["test_miou"] is not None]
    test = np.array([100 * c["test_miou"] for c in cands])
    methods = sorted({c["method"] for c in cands})
    rng = np.random.default_rng(seed)
    samples = [rng.integers(len(cands), size=len(cands)) for _ in range(bootstrap)]
    rows = {}
    for key in VALIDATORS:
        if not all(key in c["scores"] for c in cands):
            continue
        score = np.array([c["scores"][key] for c in cands])
        within = {m: _spearman(score[[c["method"] == m for c in cands]], test[[c["method"] == m for c in cands]])
                  for m in methods}
        regrets = [test[idx].max() - test[idx][np.argmax(score[idx])] for idx in samples]
        rows[key] = {"name": VALIDATORS[key], "spearman": _spearman(score, test), "within": within,
                     "regret": float(test.max() - test[np.argmax(score)]),
                     "regret_mean": float(np.mean(regrets)), "regret_p5": float(np.percentile(regrets, 5)),
                     "regret_p95": float(np.percentile(regrets, 95)),
                     "pick": cands[int(np.argmax(score))]["trial"]}
    random = [test[idx].max() - test[idx].mean() for idx in samples]
    return {"trials": len(cands), "methods": {m: sum(c["method"] == m for c in cands) for m in methods},
            "best": float(test.max()), "mean": float(test.mean()), "worst": float(test.min()),
            "method_means": {m: float(test[[c["method"] == m for c in cands]].mean()) for m in methods},
            "random_regret": float(np.mean(random)), "validators": rows}


def per_image_confusions(run: Path) -> np.ndarray:
    """The final model's confusion matrix on each holdout image (n×C×C), for selecting on k labelled images."""
    import torch
    import yaml

    from rayuda.engine.checkpoint import load_checkpoint
    from rayuda.engine.pipeline import holdout_parts
    from rayuda.metrics import confusion_matrix
    from rayuda.models import build_segmenter
    from rayuda.models.predict import predict_logits

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    holdout = holdout_parts(cfg)[0]
    num_classes = len(holdout.dataset.class_names)
    model = build_segmenter(cfg["model"], num_classes)
    model.load_state_dict(load_checkpoint(run / "model.pt"))
    model.eval()
    out = []
    with torch.no_grad():
        for item in holdout:
            logits = predict_logits(model, item["image"][None], item["label"].shape[-2:])
            out.append(confusion_matrix(logits.argmax(1), item["label"][None], num_classes).numpy())
    return np.stack(out)


def _miou(cm: np.ndarray) -> float:
    """mIoU (×100) of a C×C confusion matrix over the classes present in the truth."""
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    present = cm.sum(1) > 0
    return 100 * float((np.diag(cm)[present] / union[present]).mean())


def labelled_selection(folder: Path, rows: dict, ks=(1, 2, 5, 10, 20), draws: int = 200, seed: int = 0) -> dict:
    """Regret of picking by mIoU on k random labelled holdout images, against each validator's regret, both
    measured on the other holdout images of the same draw (mean over ``draws`` draws)."""
    from rayuda.validators import score_candidates, search_candidates

    cands = [c for c in score_candidates(search_candidates(folder)) if c["test_miou"] is not None]
    cms = np.stack([per_image_confusions(c["probe"].parent.parent) for c in cands])  # trials × images × C × C
    rng = np.random.default_rng(seed)
    images = cms.shape[1]
    out = {}
    for k in [k for k in ks if k < images]:
        labelled, proxies = [], {key: [] for key in rows}
        for _ in range(draws):
            chosen = np.zeros(images, dtype=bool)
            chosen[rng.choice(images, size=k, replace=False)] = True
            test = np.array([_miou(cm[~chosen].sum(0)) for cm in cms])
            picked = int(np.argmax([_miou(cm[chosen].sum(0)) for cm in cms]))
            labelled.append(test.max() - test[picked])
            for key in rows:
                score = [c["scores"][key] for c in cands]
                proxies[key].append(test.max() - test[int(np.argmax(score))])
        out[k] = {"labelled": float(np.mean(labelled)), **{key: float(np.mean(v)) for key, v in proxies.items()}}
    return out


def markdown(results: dict) -> str:
    lines = []
    for target, res in results.items():
        methods = list(res["methods"])
        lines += [f"**{target}** — {res['trials']} trials ({', '.join(f'{m} {n}' for m, n in res['methods'].items())});"
                  f" test mIoU best {res['best']:.2f}, mean {res['mean']:.2f}, worst {res['worst']:.2f}; "
                  f"a random pick's regret {res['random_regret']:.2f}", "",
                  "| validator | ρ all trials | " + " | ".join(f"ρ {m}" for m in methods)
                  + " | regret of its pick | bootstrap mean [5 %, 95 %] |",
                  "|---|---|" + "---|" * len(methods) + "---|---|"]
        for row in res["validators"].values():
            within = " | ".join(f"{row['within'][m]:+.2f}" for m in methods)
            lines.append(f"| {row['name']} | {row['spearman']:+.2f} | {within} | {row['regret']:.2f} | "
                         f"{row['regret_mean']:.2f} [{row['regret_p5']:.2f}, {row['regret_p95']:.2f}] |")
        lines.append("")
        if res.get("labelled"):
            keys = list(res["validators"])
            lines += ["Selecting on k labelled holdout images instead: regret on the *other* holdout images, mean over "
                      "draws of the k images, beside each validator's regret on the same images:", "",
                      "| k labelled | k-image pick | " + " | ".join(VALIDATORS[k] for k in keys) + " |",
                      "|---|---|" + "---|" * len(keys)]
            lines += [f"| {k} | {row['labelled']:.2f} | " + " | ".join(f"{row[key]:.2f}" for key in keys) + " |"
                      for k, row in res["labelled"].items()]
            lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(results), 1)
    for t, (target, res) in enumerate(results.items()):
        keys = list(res["validators"])
        x = np.arange(len(keys)) + t * width
        rows = [res["validators"][k] for k in keys]
        axes[0].bar(x, [r["spearman"] for r in rows], width, label=target)
        axes[1].bar(x, [r["regret_mean"] for r in rows], width, label=target,
                    yerr=[[r["regret_mean"] - r["regret_p5"] for r in rows], [r["regret_p95"] - r["regret_mean"]
                                                                            for r in rows]], capsize=2)
        axes[1].axhline(res["random_regret"], ls="--", lw=0.8, color=f"C{t}")
    labels = [VALIDATORS[k] for k in next(iter(results.values()))["validators"]]
    for ax, title in zip(axes, ("Spearman ρ with test mIoU (all trials)",
                                "regret of the pick (mIoU; bootstrap 5–95 %; dashed: random pick)"), strict=True):
        ax.set_xticks(np.arange(len(labels)) + width * (len(results) - 1) / 2, labels, rotation=35, ha="right")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    axes[0].axhline(0, color="k", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="tiny images and schedules (see SMALL)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--trials", type=int, default=None, help="trials per method and target (default 10; small 5)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--lengths", default=None,
                   help="comma-separated lengths of the method's stage to draw each trial's from (default: fixed)")
    p.add_argument("--targets", default="minicity,variant", help="collect trials on these targets only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--analyse-only", action="store_true", help="only recompute the table from stored runs")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    args.targets = args.targets.split(",")
    args.lengths = [int(v) for v in args.lengths.split(",")] if args.lengths else None
    args.trials = args.trials or (5 if args.small else 10)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = ({n: out / "runs" / n for n in ("minicity", "variant")} if args.analyse_only else collect(args))
    results = {name: analyse(folder, args.bootstrap, args.seed) for name, folder in folders.items() if folder.is_dir()}
    for name, res in results.items():
        res["labelled"] = labelled_selection(folders[name], res["validators"], seed=args.seed)
    (out / "selection.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (out / "selection.md").write_text(text)
    plot(results, out / "selection.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
