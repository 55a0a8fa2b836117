"""Select/test split of the holdout and the confirmation phase's verdict."""

from __future__ import annotations

import pytest

from rayuda.config import ConfigError
from rayuda.data.split import split_images
from rayuda.engine.pipeline import describe_holdout, holdout_parts
from rayuda.hpo.confirm import DEFAULTS, candidates, confirmation_runs, confirmation_seeds, verdict
from rayuda.methods import resolve_config


def test_split_is_deterministic_disjoint_and_stable_when_images_are_added():
    names = [f"img{i:03d}.png" for i in range(200)]
    select, test = split_images(names, 0.5, seed=0)
    assert (select, test) == split_images(names, 0.5, seed=0)
    assert not set(select) & set(test) and sorted(select + test) == list(range(200))
    assert 70 < len(test) < 130  # about half
    more = names + [f"new{i:03d}.png" for i in range(50)]
    select2, test2 = split_images(more, 0.5, seed=0)
    assert {names[i] for i in test} == {more[i] for i in test2 if i < 200}  # no old image changed part
    assert split_images(names, 0.5, seed=1)[1] != test  # the split seed matters
    assert split_images(names, 0.0, seed=0) == (list(range(200)), [])


def test_a_capped_selection_part_keeps_its_lowest_draws_and_hands_the_rest_to_the_test_part():
    names = [f"img{i:03d}.png" for i in range(200)]
    select, test = split_images(names, 0.5, seed=0)
    capped, more_test = split_images(names, 0.5, seed=0, max_selection=30)
    assert len(capped) == 30 and set(capped) < set(select) and set(test) < set(more_test)
    assert sorted(capped + more_test) == list(range(200))
    assert capped == split_images(names, 0.5, seed=0, max_selection=30)[0]  # deterministic
    assert split_images(names, 0.5, seed=0, max_selection=len(select)) == (select, test)  # a cap not reached
    with pytest.raises(ValueError, match="data.max_selection"):
        split_images(names, 0.5, seed=0, max_selection=0)
    with pytest.raises(ConfigError, match="data.max_selection"):
        holdout_parts(resolve_config("advent", {"data.max_selection": -1}))


def test_holdout_parts_split_labelled_images_and_refuse_an_empty_selection():
    cfg = resolve_config("advent")
    select, test = holdout_parts(cfg)
    assert len(select) + len(test) == 2000 and not set(select.indices) & set(test.indices)
    assert len(select) == cfg["data"]["max_selection"] == 500  # the rest of the large holdout is test
    assert "WARNING" not in describe_holdout(cfg)
    small = resolve_config("advent", {"data.holdout": 20})
    assert "cannot separate candidates" in describe_holdout(small)
    label_free = resolve_config("advent", {"train.metric": "entropy"})
    select, test = holdout_parts(label_free)
    assert len(select) == len(test) == 2000  # every labelled image is test; the proxy needs no labels
    with pytest.raises(ConfigError, match="selection part of the target holdout is empty"):
        holdout_parts(resolve_config("advent", {"data.holdout": 1, "data.test_fraction": 0.99}))


def test_a_planted_worse_candidate_leaves_the_defaults_as_the_answer():
    scores = {DEFAULTS: {1: 0.20, 2: 0.21, 3: 0.19}, "trial a": {1: 0.18, 2: 0.20, 3: 0.17}}
    result = verdict(scores, min_gain=1.0)
    assert result["winner"] == DEFAULTS and "keep the defaults" in result["text"]
    row = next(r for r in result["rows"] if r["config"] == "trial a")
    assert row["gain"] == pytest.approx(-5 / 3) and not row["beats_defaults"]


def test_a_candidate_wins_only_beyond_noise_and_the_minimum_gain():
    better = {DEFAULTS: {1: 0.20, 2: 0.22, 3: 0.18}, "trial b": {1: 0.23, 2: 0.25, 3: 0.21}}
    assert verdict(better, min_gain=1.0)["winner"] == "trial b"  # +3 ± 0 points on every seed
    assert verdict(better, min_gain=5.0)["winner"] == DEFAULTS
    noisy = {DEFAULTS: {1: 0.20, 2: 0.22, 3: 0.18}, "trial c": {1: 0.26, 2: 0.20, 3: 0.19}}
    assert verdict(noisy, min_gain=1.0)["winner"] == DEFAULTS  # +1.67 ± 3.8: within seed noise
    assert "trial c, +1.67" in verdict(noisy, min_gain=1.0)["text"]


def test_a_losing_verdict_says_whether_the_best_challenger_is_noise_or_a_real_lead_below_the_bar():
    """§33: a challenger ahead by 0.46 ± 0.08 on every seed is not seed noise; the verdict must not call it that."""
    small_but_real = {DEFAULTS: {1: 0.1993, 2: 0.1918, 3: 0.1730}, "trial s": {1: 0.2032, 2: 0.1974, 3: 0.1774}}
    result = verdict(small_but_real, min_gain=1.0)
    assert result["winner"] == DEFAULTS and "keep the defaults" in result["text"]
    assert "trial s, +0.46 ± 0.09, a real lead, above 2 SE = 0.10, but under --min-gain 1)" in result["text"]
    noisy = {DEFAULTS: {1: 0.20, 2: 0.22, 3: 0.18}, "trial c": {1: 0.26, 2: 0.20, 3: 0.19}}
    assert "trial c, +1.67 ± 4.04, within seed noise, 2 SE = 4.67)" in verdict(noisy, min_gain=1.0)["text"]
    assert "real lead" in verdict(small_but_real, min_gain=0.5)["text"]  # 0.46 < 0.5 still under the bar
    assert verdict(small_but_real, min_gain=0.4)["winner"] == "trial s"
    # a consistent loss, as §34b's
    small_but_worse = {DEFAULTS: small_but_real["trial s"], "trial w": small_but_real[DEFAULTS]}
    assert "trial w, -0.46 ± 0.09, a real loss, beyond 2 SE = 0.10)" in verdict(small_but_worse, min_gain=1.0)["text"]


def test_a_confirmation_stopped_by_ctrl_c_is_interrupted_not_a_verdict_on_part_of_the_seeds(tmp_path):
    """Session 15: Ctrl-C during the confirmation left Ray results without metrics, and the search died on a
    KeyError instead of saving its state and printing the resume command."""
    from ray.tune import Result

    from rayuda.hpo.confirm import ConfirmationInterrupted, final_metrics

    def result(**metrics):
        return Result(metrics=metrics, checkpoint=None, error=None, path=str(tmp_path))

    done = [result(candidate=DEFAULTS, seed=1, test_miou=0.2), result(candidate="trial t", seed=1, test_miou=0.21)]
    assert final_metrics(done, runs=2) == {DEFAULTS: {1: done[0].metrics}, "trial t": {1: done[1].metrics}}
    with pytest.raises(ConfirmationInterrupted, match="after 2 of its 4 runs"):
        final_metrics([*done, result(), Result(metrics=None, checkpoint=None, error=None, path=str(tmp_path))], 4)
    failed = Result(metrics={}, checkpoint=None, error=ValueError("boom"), path=str(tmp_path))
    with pytest.raises(RuntimeError, match="a confirmation run failed: boom"):
        final_metrics([*done, failed], runs=3)


def test_confirmation_runs_that_start_together_train_different_seeds():
    """Ray starts the grid's runs in order: the first ones must be other seeds (each computes its own seed's shared
    stages), not two candidates of one seed (one of which would wait on the other's stage lock)."""
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    space = {"run": tune.grid_search(confirmation_runs([DEFAULTS, "trial t"], [1, 2, 3]))}
    order = [(spec["run"]["candidate"], spec["run"]["seed"]) for _, spec in generate_variants(space)]
    assert order == [(DEFAULTS, 1), (DEFAULTS, 2), (DEFAULTS, 3), ("trial t", 1), ("trial t", 2), ("trial t", 3)]


def test_a_verdict_without_a_challenger_says_nothing_was_compared():
    """When ASHA stopped every trial but the defaults, the confirmation reruns the defaults alone: the verdict must
    not claim that a config was beaten."""
    alone = verdict({DEFAULTS: {1: 0.20, 2: 0.22, 3: 0.18}}, min_gain=1.0)
    assert alone["winner"] == DEFAULTS and "none was compared" in alone["text"]
    assert "beat the defaults beyond seed noise" not in alone["text"]


def test_candidates_are_the_defaults_and_the_top_finished_trials():
    rows = [{"trial": "t1", "outcome": "finished", "best_score": 0.3, "knobs": {"x": 2}},
            {"trial": "t2", "outcome": "early_stopped", "best_score": 0.5, "knobs": {"x": 3}},
            {"trial": "t3", "outcome": "finished", "best_score": 0.4, "knobs": {"x": 1}},
            {"trial": "t4", "outcome": "finished", "best_score": 0.2, "knobs": {"x": 4}}]
    assert candidates(rows, {"x": 1}, top_k=2) == {DEFAULTS: {"x": 1}, "trial t1": {"x": 2}, "trial t4": {"x": 4}}
    assert confirmation_seeds(0, 3) == [1, 2, 3]


def test_per_class_thresholds_become_a_table_a_chart_and_best_yaml_lines(tmp_path):
    import csv
    import json

    from rayuda.hpo.report import threshold_lines
    from rayuda.hpo.trial_summary import read_summary, threshold_tables

    stages = [{"stage": "source_only", "cache": "hit"},
              {"stage": "split", "cache": "miss", "per_class": {"road": {"threshold": 0.82, "kept_share": 0.64},
                                                               "sky": {"threshold": 0.9, "kept_share": 0.71}}}]
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"stages": stages}))
    table, chart = threshold_tables(read_summary(summary), tmp_path / "out")
    rows = list(csv.DictReader(open(table)))
    assert [(r["class"], float(r["threshold"])) for r in rows] == [("road", 0.82), ("sky", 0.9)]
    assert chart.suffix == ".png" and chart.stat().st_size > 1000
    assert threshold_lines(read_summary(summary)) == [
        "thresholds of stage split, road: threshold 0.82, kept_share 0.64",
        "thresholds of stage split, sky: threshold 0.9, kept_share 0.71"]
