"""Search spaces and the pruning-aware searcher, without Ray."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import optuna
import pytest

from rayuda.config import ConfigError
from rayuda.hpo.prepare import auto_space, longest_trial
from rayuda.hpo.searcher import StudySearcher, load_search_study, make_sampler, tpe_startup_trials
from rayuda.hpo.space import load_space, optuna_space
from rayuda.methods import METHODS


def write(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_a_valid_space_whose_defaults_are_the_papers(method):
    space = load_space(method)
    from rayuda.config import flatten
    from rayuda.methods import default_config

    cfg = flatten(default_config(method))
    for knob in space.knobs:
        assert knob.default == cfg[knob.name], f"{method}: {knob.name} default differs from the method's"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("knobs: {params.nope: {type: float, low: 0.1, high: 1, default: 0.5}}", "not a config key"),
        ("knobs: {params.w_adv: {type: float, low: 1.0e-3, high: 1.0e-2, default: 1.0e-4}}", "outside the range"),
        ("knobs: {params.w_adv: {type: float, low: 1.0, high: 0.1, default: 0.5}}", "must be below"),
        ("knobs: {params.w_adv: {type: normal, low: 0.1, high: 1, default: 0.5}}", "type must be one of"),
        ("knobs: {params.w_adv: {type: float, low: 0.1, high: 1}}", "no 'default'"),
        ("knobs: {params.w_adv: {type: float, low: 0, high: 1, log: true, default: 0.5}}", "must be positive"),
        ("knobs: [1, 2]", "non-empty mapping"),
        ("knobs: {params.w_adv: {type: float, low: 0.1, high: 1, default: 0.5, condition: {x.y: [1]}}}",
         "unknown key"),
        ("method: cram\nknobs: {params.w_adv: {type: float, low: 0.1, high: 1, default: 0.5}}", "for method"),
        ("knobs: {params.w_adv: [", "not valid YAML"),
    ],
)
def test_malformed_spaces_are_rejected_with_the_key_at_fault(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_space("advent", write(tmp_path, body))


def test_a_malformed_space_fails_before_ray_starts(tmp_path):
    bad = write(tmp_path, "knobs: {params.w_adv: {type: float, low: 1.0e-3, high: 1.0e-2, default: 0.5}}")
    proc = subprocess.run([sys.executable, "-m", "rayuda.tune", "advent", "--space", str(bad),
                           "--storage", str(tmp_path / "store")], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert "params.w_adv" in proc.stderr and "outside the range" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ray" not in proc.stdout.lower()  # nothing was started
    assert not (tmp_path / "store").exists()


def test_conditional_knob_exists_only_when_its_condition_holds(tmp_path):
    path = write(tmp_path, """
        method: cram
        knobs:
          params.sfa: {type: categorical, choices: [true, false], default: true}
          params.style_weight: {type: float, low: 0.0, high: 1.0, default: 0.5, condition: {params.sfa: [true]}}
        """)
    space = load_space("cram", path)
    fn = optuna_space(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        fn(trial)
        assert ("params.style_weight" in trial.params) == trial.params["params.sfa"]
        seen.add(trial.params["params.sfa"])
        study.tell(trial, 0.0)
    assert seen == {True, False}
    assert space.defaults() == {"params.sfa": True, "params.style_weight": 0.5}
    fixed = {"params.sfa": False}  # --set params.sfa=false: the knob leaves the space, its dependant too
    assert space.without(fixed).defaults(fixed) == {}


def _searcher(tmp_path):
    space = load_space("advent")
    return StudySearcher(optuna_space(space), metric="score", sampler=make_sampler("tpe", 0, 6),
                         storage=tmp_path / "optuna.journal", study_name="s", first=space.defaults())


def test_defaults_are_the_first_trial(tmp_path):
    searcher = _searcher(tmp_path)
    first = searcher.suggest("t0")
    assert first == load_space("advent").defaults()
    second = searcher.suggest("t1")
    assert second != first


def _run_three_trials(searcher):
    for tid in ("full", "stopped", "failed"):
        searcher.suggest(tid)
    for step, score in ((25, 0.1), (50, 0.2), (100, 0.3)):
        searcher.on_trial_result("full", {"score": score, "iteration": step, "training_iteration": step // 25})
    searcher.on_trial_result("stopped", {"score": 0.05, "iteration": 25, "training_iteration": 1})
    # ASHA's stopping decision: Ray hands the last result to on_trial_complete (without on_trial_result)
    searcher.on_trial_complete("stopped", {"score": 0.07, "iteration": 50, "training_iteration": 2})
    # the engine marks its final report; an iteration count alone says nothing about the end
    searcher.on_trial_complete("full", {"score": 0.3, "iteration": 100, "training_iteration": 4, "last_report": True})
    searcher.on_trial_complete("failed", None, error=True)


def test_trials_stopped_early_reach_optuna_as_pruned_and_full_ones_as_complete(tmp_path):
    searcher = _searcher(tmp_path)
    _run_three_trials(searcher)
    assert searcher.pruned == {"stopped"} and searcher.finished == {"full", "stopped", "failed"}
    full, stopped, failed = load_search_study(tmp_path / "optuna.journal", "s").trials  # read back from disk
    assert full.state == optuna.trial.TrialState.COMPLETE and full.value == pytest.approx(0.3)
    assert full.intermediate_values == {25: 0.1, 50: 0.2, 100: 0.3}
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert stopped.intermediate_values == {25: 0.05, 50: 0.07}  # reported at the engine's iteration
    assert failed.state == optuna.trial.TrialState.FAIL


def test_a_restored_searcher_continues_the_study_on_disk(tmp_path):
    import pickle

    searcher = _searcher(tmp_path)
    searcher.suggest("t0")
    searcher.on_trial_result("t0", {"score": 0.1, "iteration": 2})
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = pickle.loads(pickle.dumps(_searcher(tmp_path)))  # as Ray unpickles it from its experiment state
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("t0") == load_space("advent").defaults()  # the running trial keeps its knobs
    restored.on_trial_result("t0", {"score": 0.1, "iteration": 2})  # a replayed report is not told twice
    restored.on_trial_complete("t0", {"score": 0.2, "iteration": 4, "last_report": True})
    restored.suggest("t1")
    trials = load_search_study(tmp_path / "optuna.journal", "s").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING"]  # no second copy of the defaults
    assert trials[0].intermediate_values == {2: 0.1, 4: 0.2} and trials[0].value == pytest.approx(0.2)


def test_a_space_across_methods_names_each_knob_by_its_method_and_builds_each_trials_config():
    from rayuda.hpo.space import config_for
    from rayuda.methods import resolve_config

    space = auto_space({m: load_space(m) for m in ("advent", "cram")})
    names = [k.name for k in space.knobs]
    assert names[0] == "method" and "advent:params.w_adv" in names and "cram:params.lambda_style" in names
    assert space.defaults() == {"method": "advent", "advent:params.w_adv": 1e-3, "advent:stages.advent.lr": 2.5e-3}
    configs = {m: resolve_config(m) for m in ("advent", "cram")}
    cfg = config_for(configs, {"method": "cram", "cram:params.w_adv": 0.005, "advent:params.w_adv": 0.5})
    assert cfg["method"] == "cram" and cfg["params"]["w_adv"] == 0.005  # the other method's knob is not applied
    sampler = optuna.samplers.RandomSampler(seed=3)
    study = optuna.create_study(sampler=sampler)
    for _ in range(12):  # a knob exists only when its method is chosen
        trial = study.ask()
        optuna_space(space)(trial)
        assert all(name.startswith(trial.params["method"] + ":") for name in trial.params if name != "method")


def test_asha_max_t_covers_the_longest_plan_a_knob_can_make():
    from rayuda.engine.plan import reported_iterations
    from rayuda.methods import resolve_config

    cfg = resolve_config("cada")
    assert longest_trial(cfg, load_space("cada")) == reported_iterations(resolve_config("cada", {"params.rounds": 3}))
    assert longest_trial(cfg, load_space("cada")) > reported_iterations(cfg)  # the default has 2 rounds
    intrada = resolve_config("intrada")
    assert longest_trial(intrada, load_space("intrada")) == 400  # stages.intra.iters searched up to 400


def test_the_sampler_flag_picks_seeded_tpe_or_random_search():
    assert isinstance(make_sampler("random", 0, 6), optuna.samplers.RandomSampler)
    tpe = make_sampler("tpe", 0, 6)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    assert tpe._n_startup_trials == 3  # half of a 6-trial search, so TPE models the other half
    assert [tpe_startup_trials(n) for n in (1, 4, 8, 20, 100)] == [2, 2, 4, 10, 10]
    with pytest.raises(ConfigError, match="--sampler"):
        make_sampler("grid", 0, 6)
