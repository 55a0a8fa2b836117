"""Label-free validators: score a trained model on unlabelled target data, so a search can select without labels.

Each function takes what an evaluation stored for the *probe set* (a fixed, seeded set of target-train
images, see :mod:`rayuda.engine.probe`) and returns one number; higher is better unless the docstring
says otherwise. The evaluation-time proxies ``target_entropy`` and ``flip_agreement`` (computed on the
holdout images by :func:`rayuda.engine.evaluate.evaluate`) are the other two label-free scores.

=====================  ==========================================================  =================
validator              formula (probabilities p ∈ Δ^C per pixel, N pixels)        better
=====================  ==========================================================  =================
``entropy``            mean_i H(p_i) / log C                                       lower
``im``                 H(mean_i p_i) − mean_i H(p_i)  (nats)                       higher
``bnm``                mean over images of ‖P_img‖_* / N_img                       higher
``snd``                mean_i H(softmax_j≠i(cos(p_i, p_j) / 0.05))                 higher
``dev``                importance-weighted source loss with a control variate      lower
``ensemble``           mIoU of argmax p against argmax of the candidates' mean     higher
=====================  ==========================================================  =================

``ensemble`` needs every candidate's probe predictions, so it is computed after (or across) a search:
``python -m rayuda.validators SEARCH_DIR`` ranks a search's trials by every validator.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: SND's temperature (Saito et al. 2021, §3.2 and their code: 0.05).
SND_TEMPERATURE = 0.05
#: Pixels per probe image that SND compares (a fixed, seeded sample of the stored grid).
SND_PIXELS_PER_IMAGE = 64
_EPS = 1e-12


def _as_pixels(probs: np.ndarray) -> np.ndarray:
    """N×C pixel probabilities from an n×C×h×w array (or an N×C one), in float64."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 4:
        probs = probs.transpose(0, 2, 3, 1).reshape(-1, probs.shape[1])
    return probs


def _entropy_rows(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, _EPS, None))).sum(axis=-1)


def entropy(probs: np.ndarray) -> float:
    """Mean prediction entropy normalised by ``log C`` (Grandvalet & Bengio 2005's criterion as a selection
    score, the ``target_entropy`` of an evaluation). **Lower is better.**"""
    pixels = _as_pixels(probs)
    return float(_entropy_rows(pixels).mean() / math.log(pixels.shape[1]))


def information_maximization(probs: np.ndarray) -> float:
    """Information maximisation, IM = H(p̄) − mean_i H(p_i) with p̄ = mean_i p_i (nats): confident *and*
    diverse predictions score high (Shi & Sha, ICML 2012; Liang et al., SHOT, ICML 2020, eq. 2–3; used as a
    validator by Musgrave et al., ECCV 2022). Unlike plain entropy, a model that predicts one class
    everywhere scores 0. Computed over every stored pixel of the probe set."""
    pixels = _as_pixels(probs)
    return float(_entropy_rows(pixels.mean(axis=0)) - _entropy_rows(pixels).mean())


def batch_nuclear_norm(probs: np.ndarray) -> float:
    """Batch nuclear-norm maximisation (Cui et al., CVPR 2020, eq. 8): ‖A‖_* / B for the B×C prediction
    matrix A of a batch; high when predictions are confident and cover many classes. Here one image's
    stored pixels are a batch (B = its pixels) and the score is the mean over the probe images. ``probs``:
    n×C×h×w (or one image's B×C)."""
    probs = np.asarray(probs, dtype=np.float64)
    batches = [_as_pixels(p[None]) for p in probs] if probs.ndim == 4 else [probs]
    scores = []
    for a in batches:
        # the singular values of A are the square roots of the eigenvalues of the C×C matrix AᵀA
        eig = np.clip(np.linalg.eigvalsh(a.T @ a), 0.0, None)
        scores.append(np.sqrt(eig).sum() / a.shape[0])
    return float(np.mean(scores))


def soft_neighbourhood_density(features: np.ndarray, temperature: float = SND_TEMPERATURE) -> float:
    """Soft neighbourhood density (Saito et al., ICCV 2021, eq. 1–3): L2-normalise each sample's features,
    take the cosine similarities to every *other* sample, softmax them over temperature ``temperature``
    (0.05 in the paper) and average the entropy of that distribution over samples. Dense neighbourhoods
    (clustered target features) score high. Features are the softmax outputs, the paper's choice (also
    ``SNDValidator(layer="preds")`` in Musgrave et al.'s benchmark); for segmentation, sampled pixels."""
    x = np.asarray(features, dtype=np.float64)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), _EPS, None)
    sim = x @ x.T / temperature
    np.fill_diagonal(sim, -np.inf)
    sim -= sim.max(axis=1, keepdims=True)
    weights = np.exp(sim)
    weights /= weights.sum(axis=1, keepdims=True)
    return float(_entropy_rows(weights).mean())


def snd_pixels(probs: np.ndarray, per_image: int = SND_PIXELS_PER_IMAGE, seed: int = 0) -> np.ndarray:
    """The pixels SND compares: ``per_image`` fixed positions (seeded, the same for every candidate) of each
    probe image's stored n×C×h×w probabilities, as an (n·per_image)×C array."""
    probs = np.asarray(probs, dtype=np.float64)
    n, c, h, w = probs.shape
    flat = np.random.default_rng(seed).choice(h * w, size=min(per_image, h * w), replace=False)
    return probs.reshape(n, c, h * w)[:, :, np.sort(flat)].transpose(0, 2, 1).reshape(-1, c)


def domain_weights(source: np.ndarray, target: np.ndarray, ridge: float = 1.0, iterations: int = 25) -> np.ndarray:
    """Importance weights w(x) = p(target|x) / p(source|x) · n_s / n_t of the source samples, from an
    L2-regularised logistic-regression domain classifier on standardised features (Newton's method), as in
    You et al. (DEV, ICML 2019, §4.2: a discriminative density-ratio estimate)."""
    xs, xt = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    x = np.concatenate([xs, xt])
    mean, std = x.mean(axis=0), x.std(axis=0)
    x = np.concatenate([(x - mean) / np.where(std > _EPS, std, 1.0), np.ones((len(x), 1))], axis=1)
    y = np.concatenate([np.zeros(len(xs)), np.ones(len(xt))])
    beta = np.zeros(x.shape[1])
    penalty = np.full(x.shape[1], ridge)
    penalty[-1] = 0.0  # the bias is not regularised
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        grad = x.T @ (p - y) + penalty * beta
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty) + 1e-9 * np.eye(len(beta))
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    logit = np.clip(x[: len(xs)] @ beta, -30, 30)
    return np.exp(logit) * len(xs) / len(xt)  # p/(1−p) = exp(logit)


def dev_risk(weights: np.ndarray, losses: np.ndarray) -> float:
    """Deep embedded validation risk (You et al., ICML 2019, Algorithm 1): the importance-weighted source
    loss L_i = w_i ℓ_i with the control variate w (whose expectation is 1): mean(L) + η mean(w) − η,
    η = −Cov(L, w) / Var(w) (η = 0 when the weights are constant). An unbiased estimate of the target
    risk with lower variance than mean(L). **Lower is better.**"""
    w, loss = np.asarray(weights, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    weighted = w * loss
    var = w.var()
    eta = -np.mean((weighted - weighted.mean()) * (w - w.mean())) / var if var > 1e-12 else 0.0
    return float(weighted.mean() + eta * w.mean() - eta)


def deep_embedded_validation(source_features: np.ndarray, source_losses: np.ndarray,
                             target_features: np.ndarray) -> float:
    """DEV end to end: :func:`domain_weights` from source and target pixel features, then :func:`dev_risk`
    of the source pixels' cross-entropy. **Lower is better.** rayuda's variant: the source pixels come from
    source *training* images (rayuda's sources have no held-out split), so it measures the fit to the source
    pixels that look most like the target, not generalisation."""
    return dev_risk(domain_weights(source_features, target_features), source_losses)


def _miou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    cm = np.bincount(truth.ravel() * num_classes + pred.ravel(), minlength=num_classes ** 2)
    cm = cm.reshape(num_classes, num_classes)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    present = cm.sum(1) > 0  # classes the reference predicts somewhere
    return float((np.diag(cm)[present] / union[present]).mean())


def ensemble_agreement(candidate: np.ndarray, ensemble: np.ndarray) -> float:
    """Ensemble validation (EnsV; Hu et al., NeurIPS 2024): score a candidate by its agreement with the
    ensemble of *all* candidates, i.e. its accuracy against the ensemble's predictions as pseudo-labels.
    For segmentation the agreement is the mIoU of the candidate's argmax against the argmax of
    ``ensemble`` (the mean of all candidates' probabilities, this one included), over the classes the
    ensemble predicts. ``candidate``, ``ensemble``: n×C×h×w."""
    candidate, ensemble = np.asarray(candidate), np.asarray(ensemble)
    return _miou(candidate.argmax(1), ensemble.argmax(1), candidate.shape[1])


def ensemble_scores(probs: list[np.ndarray]) -> list[float]:
    """:func:`ensemble_agreement` of every candidate against the mean of all of them."""
    mean = np.mean([np.asarray(p, dtype=np.float32) for p in probs], axis=0)
    return [ensemble_agreement(p, mean) for p in probs]


def probe_validators(probe: dict[str, np.ndarray]) -> dict[str, float]:
    """The per-candidate validators of one evaluation's stored probe (:mod:`rayuda.engine.probe`)."""
    probs = probe["target_probs"]
    out = {"proxy/entropy": entropy(probs), "proxy/im": information_maximization(probs),
           "proxy/bnm": batch_nuclear_norm(probs), "proxy/snd": soft_neighbourhood_density(snd_pixels(probs))}
    if probe.get("source_losses") is not None and len(probe["source_losses"]):
        out["proxy/dev"] = deep_embedded_validation(probe["source_features"], probe["source_losses"],
                                                    probe["target_features"])
    return out


#: Validators and the sign that makes each higher-is-better (``ensemble`` needs all candidates).
SIGNS = {"proxy/entropy": -1.0, "proxy/im": 1.0, "proxy/bnm": 1.0, "proxy/snd": 1.0, "proxy/dev": -1.0,
         "proxy/ensemble": 1.0, "target_entropy": -1.0, "flip_agreement": 1.0}


def load_probe(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# -- across the trials of a search ------------------------------------------------------------------------
def search_candidates(search_dir: str | Path) -> list[dict[str, Any]]:
    """The finished trials of a search (``SEARCH/work/trials/*``) or any folder of run folders: each with its
    final evaluation's probe (``probe/eval_<iteration>.npz``), its last evaluation's metrics and test mIoU."""
    root = Path(search_dir)
    trials = root / "work" / "trials" if (root / "work" / "trials").is_dir() else root
    out = []
    for summary_path in sorted(trials.glob("*/summary.json")):
        run = summary_path.parent
        probes = sorted((run / "probe").glob("eval_*.npz"))
        if not probes:
            continue
        summary = json.loads(summary_path.read_text())
        test = (summary.get("test") or {}).get("final", {}).get("miou")
        out.append({"trial": run.name, "method": summary["method"], "probe": probes[-1],
                    "test_miou": test, "val_miou": summary.get("miou"),
                    "metrics": {k: summary[k] for k in ("target_entropy", "flip_agreement") if k in summary}})
    return out


def score_candidates(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every validator for every candidate (``ensemble`` over all of them), as higher-is-better scores
    under ``scores`` and raw values under ``values``."""
    probes = [load_probe(c["probe"]) for c in candidates]
    ens = ensemble_scores([p["target_probs"] for p in probes]) if probes else []
    for cand, probe, agreement in zip(candidates, probes, ens, strict=True):
        values = {**cand.get("metrics", {}), **probe_validators(probe), "proxy/ensemble": agreement}
        cand["values"] = values
        cand["scores"] = {k: SIGNS[k] * v for k, v in values.items() if k in SIGNS and math.isfinite(v)}
    return candidates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayuda.validators",
                                     description="Rank a search's finished trials by every label-free validator.")
    parser.add_argument("search", help="a search folder (STORAGE/NAME) or a folder of run folders")
    parser.add_argument("--json", help="write every trial's validator values here")
    args = parser.parse_args(argv)
    candidates = score_candidates(search_candidates(args.search))
    if not candidates:
        print(f"error: no finished trial with stored probe predictions under {args.search}", file=sys.stderr)
        return 2
    names = sorted({k for c in candidates for k in c["scores"]})
    print(f"{len(candidates)} trials; each validator's pick (higher score is better after the sign):")
    for name in names:
        pick = max((c for c in candidates if name in c["scores"]), key=lambda c: c["scores"][name])
        test = f"; its test mIoU {100 * pick['test_miou']:.2f}" if pick["test_miou"] is not None else ""
        print(f"  {name:<16} → {pick['trial']} ({pick['method']}){test}")
    tested = [c for c in candidates if c["test_miou"] is not None]
    if tested:
        best = max(tested, key=lambda c: c["test_miou"])
        print(f"  {'oracle (test)':<16} → {best['trial']} ({best['method']}); test mIoU {100 * best['test_miou']:.2f}")
    if args.json:
        rows = [{k: (str(v) if isinstance(v, Path) else v) for k, v in c.items()} for c in candidates]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
