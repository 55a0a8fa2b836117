"""Label-free validators (rayuda.validators), each against a value computed by hand, and the probe an
evaluation stores for them (rayuda.engine.probe), run for real on tiny minicity pipelines."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rayuda.config import ConfigError
from rayuda.engine import run_pipeline
from rayuda.engine.evaluate import SELECTION_METRICS, resolve_metric, selection_score
from rayuda.engine.probe import probe_indices
from rayuda.validators import (
    batch_nuclear_norm,
    dev_risk,
    domain_weights,
    ensemble_agreement,
    ensemble_scores,
    entropy,
    information_maximization,
    load_probe,
    main,
    probe_validators,
    score_candidates,
    search_candidates,
    snd_pixels,
    soft_neighbourhood_density,
)


def h(*p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_entropy_is_the_mean_normalised_entropy():
    assert entropy(np.array([[0.5, 0.5], [1.0, 0.0]])) == pytest.approx(0.5)


def test_information_maximisation_rewards_confident_and_diverse_predictions():
    assert information_maximization(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(math.log(2))
    assert information_maximization(np.array([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.0)  # collapsed
    assert information_maximization(np.array([[0.5, 0.5], [0.5, 0.5]])) == pytest.approx(0.0)  # unsure
    mixed = np.array([[0.5, 0.5], [1.0, 0.0]])
    assert information_maximization(mixed) == pytest.approx(h(0.75, 0.25) - h(0.5, 0.5) / 2)
    # n×C×h×w is read as its pixels: the same two pixels in one 1×2 image
    assert information_maximization(mixed.T.reshape(1, 2, 1, 2)) == pytest.approx(h(0.75, 0.25) - h(0.5, 0.5) / 2)


def test_batch_nuclear_norm_is_the_nuclear_norm_over_the_batch_size_averaged_over_images():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # AᵀA = diag(2, 1): singular values √2 and 1
    assert batch_nuclear_norm(a) == pytest.approx((1 + math.sqrt(2)) / 3)
    b = np.array([[1.0, 0.0]] * 3)  # rank one: √3
    images = np.stack([a.T.reshape(2, 1, 3), b.T.reshape(2, 1, 3)])  # 2 images of 1×3 pixels
    assert batch_nuclear_norm(images) == pytest.approx(((1 + math.sqrt(2)) / 3 + math.sqrt(3) / 3) / 2)


def test_soft_neighbourhood_density_by_hand():
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])  # scale does not matter (cosine similarity)
    e = math.e
    near = h(e / (e + 1), 1 / (e + 1))  # rows 0 and 1: cosines 1 (the twin) and 0, at temperature 1
    assert soft_neighbourhood_density(x, temperature=1.0) == pytest.approx((2 * near + math.log(2)) / 3)
    # at the paper's 0.05 the twin takes (almost) all the mass: rows 0 and 1 have entropy ≈ 0
    assert soft_neighbourhood_density(x) == pytest.approx(math.log(2) / 3, abs=1e-6)


def test_snd_samples_the_same_pixels_of_every_candidate():
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=(2, 4, 8)).transpose(0, 3, 1, 2)  # 2×3×4×8
    first, again = snd_pixels(probs, per_image=5), snd_pixels(probs * 1.0, per_image=5)
    assert first.shape == (10, 3) and np.array_equal(first, again)
    assert np.allclose(first.sum(1), 1.0)


def test_dev_risk_control_variate_by_hand():
    # constant weights: no control variate, the plain weighted mean
    assert dev_risk(np.array([2.0, 2.0]), np.array([1.0, 3.0])) == pytest.approx(4.0)
    # L = w·ℓ = [1, 2, 3] moves exactly with w: η = −1, risk = 2 − 2 + 1 = 1 (the true mean loss)
    assert dev_risk(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    # L = [1, 0], w = [0.5, 1.5]: Cov(L, w) = −0.25, Var(w) = 0.25, η = 1: 0.5 + 1 − 1
    assert dev_risk(np.array([0.5, 1.5]), np.array([2.0, 0.0])) == pytest.approx(0.5)


def test_domain_weights_are_one_when_the_domains_look_alike_and_favour_target_like_samples():
    feats = np.random.default_rng(1).normal(size=(5, 3))
    # identical feature sets, twice as many source samples: the density ratio is 1 everywhere
    assert np.allclose(domain_weights(np.concatenate([feats, feats]), feats), 1.0, atol=1e-6)
    source = np.array([[0.0], [0.0], [0.0], [1.0]])
    target = np.array([[1.0], [1.0], [1.0], [0.0]])
    w = domain_weights(source, target)
    assert w[3] > 1.0 > w[0] and np.allclose(w[:3], w[0])


def test_ensemble_agreement_is_the_miou_against_the_ensembles_argmax():
    def onehot(labels, c=3):
        return np.eye(c)[np.array(labels)].transpose(2, 0, 1)[None]  # 1×C×h×w

    cand, ens = onehot([[0, 0], [1, 1]]), onehot([[0, 1], [1, 1]])
    # class 0: 1 shared pixel of 2 in the union; class 1: 2 of 3; class 2 is in neither (left out)
    assert ensemble_agreement(cand, ens) == pytest.approx((1 / 2 + 2 / 3) / 2)
    scores = ensemble_scores([cand, cand, ens])  # the mean of all three has argmax = cand
    assert scores[0] == scores[1] == pytest.approx(1.0) and scores[2] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_auto_metric_and_the_validators_are_selection_metrics():
    assert resolve_metric("auto", labelled=True) == "miou"
    assert resolve_metric("auto", labelled=False) == "im"
    with pytest.raises(ConfigError, match="unknown selection metric"):
        resolve_metric("accuracy", labelled=True)
    good = {"proxy/im": 0.9, "proxy/bnm": 0.5, "proxy/snd": 5.0, "proxy/dev": 0.2}
    bad = {"proxy/im": 0.1, "proxy/bnm": 0.1, "proxy/snd": 4.0, "proxy/dev": 0.9}
    for name in ("im", "bnm", "snd", "dev"):
        assert SELECTION_METRICS[name][0] in good
        assert selection_score(name, good) > selection_score(name, bad)


def test_probe_indices_are_seeded_and_bounded():
    assert probe_indices(100, 5, 0) == probe_indices(100, 5, 0) != probe_indices(100, 5, 1)
    assert probe_indices(3, 16, 0) == [0, 1, 2]


TINY = {"data": {"size": [32, 64], "batch_size": 2, "holdout": 4},
        "stages": {"source_only": {"iters": 2}, "advent": {"iters": 4}},
        "train": {"eval_every": 2, "log_every": 2, "num_masks": 0, "probe_images": 4}}


def tiny(**train):
    return {"method": "advent", **TINY, "train": {**TINY["train"], **train}}


def test_each_evaluation_stores_its_probe_and_the_validators_are_recomputed_from_it(tmp_path):
    summary = run_pipeline(tiny(metric="dev"), tmp_path / "runs" / "a", cache_dir=tmp_path / "cache")
    run = tmp_path / "runs" / "a"
    files = sorted((run / "probe").glob("eval_*.npz"))
    assert [f.name for f in files] == ["eval_000002.npz", "eval_000004.npz"]
    probe = load_probe(files[-1])
    assert probe["target_probs"].dtype == np.float16 and probe["target_probs"].shape == (4, 19, 32, 64)
    assert probe["source_features"].shape[0] == len(probe["source_losses"]) == 4 * 64
    stage = next(s for s in summary["stages"] if s["stage"] == "advent")
    evals = [json.loads(line) for line in open(f"{stage['dir']}/evals.jsonl")]
    for metrics, path in zip(evals, files, strict=True):
        again = probe_validators(load_probe(path))
        assert again == pytest.approx({k: v for k, v in metrics.items() if k.startswith("proxy/")})
        assert metrics["score"] == pytest.approx(-metrics["proxy/dev"])  # --metric dev: lower risk is better
    assert summary["selection_metric"] == "dev" and "proxy/snd" in summary

    # a second candidate of another method; ensemble agreement across the folder's runs
    run_pipeline({**tiny(metric="im"), "method": "minent", "stages": {"source_only": {"iters": 2},
                                                                        "minent": {"iters": 2}}},
                 tmp_path / "runs" / "b", cache_dir=tmp_path / "cache")
    scored = score_candidates(search_candidates(tmp_path / "runs"))
    assert [c["method"] for c in scored] == ["advent", "minent"]
    assert all(0 < c["values"]["proxy/ensemble"] <= 1 and c["test_miou"] is not None for c in scored)
    assert main([str(tmp_path / "runs"), "--json", str(tmp_path / "v.json")]) == 0
    assert len(json.loads((tmp_path / "v.json").read_text())) == 2


def test_storing_the_probe_changes_no_trained_weight(tmp_path):
    with_probe = run_pipeline(tiny(), tmp_path / "with", cache_dir=tmp_path / "cache")
    without = run_pipeline(tiny(probe_images=0), tmp_path / "without", cache_dir=tmp_path / "cache")
    assert "proxy/im" in with_probe and "proxy/im" not in without
    a, b = torch.load(tmp_path / "with" / "model.pt"), torch.load(tmp_path / "without" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="probe_images"):
        run_pipeline(tiny(probe_images=0, metric="snd"), tmp_path / "refused", cache_dir=tmp_path / "cache")
