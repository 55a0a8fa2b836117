"""``python -m rayuda.tune METHOD``: search a method's hyperparameters on your target data.

Ray Tune runs the trials (each one is :func:`rayuda.engine.run_pipeline`, exactly what
``rayuda.train`` runs), Optuna's TPE proposes them from ``search_spaces/<method>.yaml`` (the paper's
defaults are the first trial), ASHA stops weak trials early on the selection metric, and every trial
is tracked in MLflow. Trials share a stage cache, so every stage trials agree on is computed once. The
search selects on one part of the labelled target holdout and reports on the other; a confirmation phase
then reruns the best configs and the paper defaults on fresh seeds and says whether tuning paid off.

Examples::

    python -m rayuda.tune cram                                   # small search on minicity, CPU
    python -m rayuda.tune auto --methods advent,cram,fgdem       # the method is a knob too
    python -m rayuda.tune advent --target folder:/data/mycity --num-samples 32 --gpus-per-trial 0.5
    python -m rayuda.tune cram --resume                          # continue the latest cram search
    mlflow ui --backend-store-uri sqlite:///mlflow.db            # browse the trials
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rayuda.config import ConfigError, flatten, parse_assignments, save_config, set_key
from rayuda.data import DatasetError
from rayuda.engine.evaluate import SELECTION_METRICS
from rayuda.engine.plan import check_plan, final_stage, reported_iterations
from rayuda.methods import METHODS, plan_of, resolve_config
from rayuda.search import Knob, SearchSpace, config_for, load_space, optuna_space

DEFAULT_STORAGE = "rayuda_results"
SAMPLERS = ("tpe", "random")
WINNER = "winner.json"  # under STORAGE/NAME/work/: the run folder of the search's (confirmed) winner
DROPPED = "dropped_pairs.tsv"  # under STORAGE/NAME/work/: the bad pairs data.bad_pairs=skip left out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayuda.tune", description=__doc__.split("\n")[0])
    p.add_argument("method", help=f"one of: {', '.join(sorted(METHODS))}, or auto (the method is a knob too)")
    p.add_argument("--methods", default=None,
                   help="with auto: comma-separated methods to search across (default: every adaptation method)")
    p.add_argument("--source", help="source dataset SPEC (default minicity)")
    p.add_argument("--target", help="target dataset SPEC, e.g. folder:PATH (default minicity)")
    p.add_argument("--config", help="base YAML config the search starts from")
    p.add_argument("--space", help="search-space YAML (default search_spaces/METHOD.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config key or knob for every trial (repeatable)")
    p.add_argument("--num-samples", type=int, default=6, help="trials to run (default 6)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="iterations of the method's last reported stage (default stages.<name>.iters)")
    p.add_argument("--grace", type=int, default=None, help="ASHA grace period in iterations (default max/4)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA reduction factor (default 2)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                   help="how trials are proposed: tpe (default) or random; both start from the paper defaults")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha",
                   help="asha (default) stops weak trials early; none runs every trial to full length")
    p.add_argument("--metric", default=None, choices=sorted(SELECTION_METRICS) + ["auto"],
                   help="selection metric: miou on the labelled target holdout, or a label-free validator "
                        "(rayuda.validators); auto: miou on a labelled target, else im")
    p.add_argument("--holdout", type=int, default=None, help="use N labelled target images for selection")
    p.add_argument("--seed", type=int, default=None, help="seed of the runs and of the TPE sampler")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what fits)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions allowed, e.g. 0.5")
    p.add_argument("--address", default=None, help="join a running Ray cluster (default: start a local one)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="Ray's experiment state and checkpoints: a local or shared path, or an object store "
                        "(s3://BUCKET/PATH, gs://...) (default ./rayuda_results)")
    p.add_argument("--work-dir", default=None,
                   help="rayuda's own files (trial run folders, best.yaml, trials table, default stage cache): a POSIX "
                        "folder every node shares (default: --storage when it is a path, else ./rayuda_results)")
    p.add_argument("--name", default=None, help="experiment name (default METHOD-DATE-TIME)")
    p.add_argument("--resume", action="store_true", help="continue the named (or latest) search of METHOD")
    p.add_argument("--cache-dir", default=None,
                   help="stage cache, shared by every node (default WORK_DIR/NAME/stage-cache; WORK_DIR: --work-dir)")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default sqlite:///./mlflow.db)")
    p.add_argument("--best", default="best.yaml", help="where to write the best config (default ./best.yaml)")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="share of the labelled target holdout kept for the reported test numbers (default 0.5)")
    p.add_argument("--confirm-top", type=int, default=2,
                   help="after the search, rerun the top K configs and the defaults on fresh seeds (default 2)")
    p.add_argument("--confirm-seeds", type=int, default=3, help="fresh seeds of the confirmation (default 3)")
    p.add_argument("--no-confirm", action="store_true", help="skip the confirmation phase")
    p.add_argument("--min-gain", type=float, default=1.0,
                   help="mIoU points a config must gain over the defaults to be preferred (default 1.0)")
    p.add_argument("--register", action=argparse.BooleanOptionalAction, default=True,
                   help="log the winner as an MLflow model and register it as rayuda-METHOD (default: yes)")
    p.add_argument("--deterministic", action="store_true", help="torch deterministic algorithms (train.deterministic)")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="also keep the Optuna study in this RDB (e.g. sqlite:///optuna.db) for optuna-dashboard; "
                        "the study is named after the search (default: in memory)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a trial whose worker died or raised, each from its last checkpoint (default 2)")
    return p


# -- the searcher ------------------------------------------------------------------------------------
def tpe_startup_trials(num_samples: int) -> int:
    """Trials TPE samples at random before it models the space. Optuna's default (10) would leave a search
    of 10 trials or fewer — rayuda's default is 6 — purely random: start modelling after half the trials
    (at least 2, at most Optuna's 10)."""
    return min(10, max(2, num_samples // 2))


def make_sampler(kind: str, seed: int, num_samples: int):
    """The Optuna sampler of ``--sampler``: seeded TPE (the default) or seeded random search."""
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tpe_startup_trials(num_samples))
    raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {kind!r}")


def make_searcher(space_fn, *, metric: str, sampler, first: dict, record: Path, storage: str | None = None,
                  study_name: str | None = None):
    """OptunaSearch with ``sampler`` (:func:`make_sampler`) that tells Optuna the truth about trials ASHA
    stopped early.

    Ray's integration completes every stopped trial with its last score, which TPE then trusts as a
    full-length result. Here a trial whose last result is not the engine's final report
    (``last_report``) is told as ``PRUNED`` (its intermediate values stay), so TPE treats it as what it
    is. Every trial's record is also written
    to ``record`` (JSON) for the trials table and the plots.
    """
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class PruningAwareOptunaSearch(OptunaSearch):
        def on_trial_complete(self, trial_id, result=None, error=False):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return super().on_trial_complete(trial_id, result, error)
            if result is not None and self.metric in result and not result.get("failed"):
                self.on_trial_result(trial_id, result)  # Tune hands the last result only to this hook
            reached = result is not None and bool(result.get("last_report"))
            error = error or bool((result or {}).get("failed"))
            if error:
                result = None
            if error or result is None or reached or self.metric not in result:
                super().on_trial_complete(trial_id, result, error)
            else:
                self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
                self._completed_trials.add(trial_id)
            write_study_record(self._ot_study, self.record)

        def on_trial_result(self, trial_id, result):
            # report at the engine's iteration (ASHA's time axis), not Ray's report counter
            if trial_id in self._completed_trials or self.metric not in result or result.get("failed"):
                return
            ot_trial, step = self._ot_trials[trial_id], int(result.get("iteration", 0))
            if step not in ot_trial.storage.get_trial(ot_trial._trial_id).intermediate_values:
                ot_trial.report(result[self.metric], step)

    searcher = PruningAwareOptunaSearch(
        space=space_fn, metric=metric, mode="max", points_to_evaluate=[first] if first else None,
        sampler=sampler,
        storage=optuna.storages.RDBStorage(storage) if storage else None, study_name=study_name,
    )
    searcher.record = str(record)
    return searcher


def write_study_record(study, path: str | Path) -> None:
    """Every Optuna trial as JSON: state, value, params, distributions, intermediate values."""
    from optuna.distributions import distribution_to_json

    rows = [{
        "number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
        "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
        "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()},
    } for t in study.trials]
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)


def study_from_record(path: str | Path):
    """Rebuild an in-memory Optuna study from :func:`write_study_record` (for plots)."""
    import optuna
    from optuna.distributions import json_to_distribution

    study = optuna.create_study(direction="maximize")
    for row in json.loads(Path(path).read_text()):
        state = optuna.trial.TrialState[row["state"]]
        if state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            continue
        inter = {int(k): v for k, v in row["intermediate_values"].items()}
        value = row["value"] if state == optuna.trial.TrialState.COMPLETE else None
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value, params=row["params"], intermediate_values=inter,
            distributions={k: json_to_distribution(d) for k, d in row["distributions"].items()}))
    return study


# -- the trial ------------------------------------------------------------------------------------
@contextlib.contextmanager
def report_without_weights(report_dir: Path):
    """A temporary copy of an evaluation's report folder without G's weights (``*.pt``): what the Ray checkpoint
    of a report needs to carry (the masks, which the MLflow callback logs). Nothing reads G back from Ray — a
    resumed trial continues from its stage checkpoint in the stage cache — so an evaluation writes G once less
    (docs/BENCHMARKS.md §18)."""
    with tempfile.TemporaryDirectory(prefix="rayuda-report-") as tmp:
        shutil.copytree(report_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.pt"))
        yield Path(tmp)


def run_trial(params: dict[str, Any], *, setup: dict[str, Any]) -> None:
    """One Tune trial: the method's pipeline with the sampled knobs, reporting each evaluation."""
    import ray
    import torch
    from ray import tune

    from rayuda.engine import run_pipeline
    from rayuda.engine.loop import NonFiniteLoss
    from rayuda.storage import check_marker

    torch.set_num_threads(max(1, int(setup["cpus_per_trial"])))
    cfg = config_for(setup["configs"], params)
    out_dir = Path(setup["work_root"]) / "trials" / tune.get_context().get_trial_id()
    node_id = ray.get_runtime_context().get_node_id()  # which machine ran it, tagged in MLflow
    check_marker([setup["work_root"], setup["cache_dir"]], f"node {ray.util.get_node_ip_address()}")
    last: list[tuple[dict[str, Any], Path]] = []
    reached = {"iteration": 0}  # the step axis's last reported iteration

    def send(metrics: dict[str, Any], report_dir: Path | None) -> None:
        if report_dir is None:
            tune.report(metrics)
            return
        with report_without_weights(report_dir) as folder:  # Ray uploads it before report returns
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))

    def report(metrics: dict[str, Any], report_dir: Path | None) -> None:
        metrics = {**metrics, "node_id": node_id}
        reached["iteration"] = metrics["iteration"]
        if metrics.get("last_report"):
            last.append((metrics, report_dir))  # Tune ends the trial at its last report: hold it
            return                              # until the pipeline has written summary.json
        send(metrics, report_dir)

    try:
        summary = run_pipeline(cfg, out_dir, report=report, cache_dir=setup["cache_dir"], list_dropped=False)
    except NonFiniteLoss as err:  # deterministic: a retry would diverge again, so the trial ends as failed
        failed = {"iteration": reached["iteration"], "score": float("-inf"), "failed": str(err), "node_id": node_id}
        (out_dir / "failure.txt").write_text(str(err) + "\n")
        tune.report(failed)
        return
    dirs = {s["stage"]: s["dir"] for s in summary["stages"]}
    test = summary.get("test") or {}
    for metrics, _ in last:  # the stage's folder has moved from .partial to its cache place since
        if "final" in test:
            metrics.update({"test/miou": test["final"]["miou"], "test/miou_selected": test["selected"]["miou"]})
        send(metrics, Path(dirs[metrics["stage"]]) / "report")


# -- the command -----------------------------------------------------------------------------------
AUTO = "auto"


def search_methods(args) -> list[str]:
    """The methods a search covers: ``METHOD``, or for ``auto`` the ``--methods`` list (default: every
    adaptation method)."""
    if args.method != AUTO:
        if args.methods:
            raise ConfigError("--methods is for `python -m rayuda.tune auto`")
        if args.method not in METHODS:
            raise ConfigError(f"unknown method {args.method!r}; valid methods: {AUTO}, {', '.join(sorted(METHODS))}")
        return [args.method]
    methods = args.methods.split(",") if args.methods else sorted(set(METHODS) - {"source_only"})
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {unknown}; valid methods: {', '.join(sorted(METHODS))}")
    if args.config or args.space:
        raise ConfigError("`auto` takes neither --config nor --space: it uses each method's search space; "
                          "fix keys with --set")
    return methods


def method_config(args, method: str, overrides: dict[str, Any], auto: bool) -> dict[str, Any]:
    """``method``'s resolved config with the command line applied (for ``auto``: the keys it has)."""
    keys = set(flatten(resolve_config(method))) | {k for k in overrides if k.split(".")[0] in ("source", "target")}
    mine = {k: v for k, v in overrides.items() if not auto or k in keys or any(k.startswith(p + ".") for p in keys)}
    cfg = resolve_config(method, mine, args.config)
    if args.max_iters is not None:
        set_key(cfg, f"stages.{final_stage(cfg)}.iters", args.max_iters, source="--max-iters")
    return cfg


def prepare(args) -> dict[str, Any]:
    """Validate everything the search needs before Ray starts: methods, configs, space, data specs."""
    methods = search_methods(args)
    auto = args.method == AUTO
    for flag, value in (("--num-samples", args.num_samples), ("--max-iters", args.max_iters),
                        ("--confirm-seeds", args.confirm_seeds)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be ≥ 1, got {value}")
    if args.max_failures < 0:
        raise ConfigError(f"--max-failures must be ≥ 0, got {args.max_failures}")
    overrides = parse_assignments(args.set)
    for key, value in (("source", args.source), ("target", args.target), ("seed", args.seed),
                       ("train.metric", args.metric), ("data.holdout", args.holdout),
                       ("data.test_fraction", args.test_fraction), ("train.deterministic", args.deterministic or None)):
        if value is not None:
            overrides[key] = value
    configs = {m: method_config(args, m, overrides, auto) for m in methods}
    if auto:
        unused = [k for k in overrides if not any(k in flatten(c) for c in configs.values())]
        if unused:
            raise ConfigError(f"--set {', '.join(unused)}: no method of the search has this key")
    spaces = {m: load_space(m, args.space) for m in methods}
    fixed = {k: v for k, v in overrides.items() if any(k in {kn.name for kn in sp.knobs} for sp in spaces.values())}
    for m in methods:
        if args.max_iters is not None:
            fixed[f"stages.{final_stage(configs[m])}.iters"] = args.max_iters
    spaces = {m: sp.without(fixed) for m, sp in spaces.items()}
    for m in methods:
        check_knob_values(spaces[m], configs[m])
    space = auto_space(spaces) if auto else spaces[methods[0]]
    if not space.knobs:
        raise ConfigError("every knob of the search space is fixed by --set: nothing to search")
    max_iters = max(longest_trial(configs[m], spaces[m]) for m in methods)
    grace = args.grace or max(1, max_iters // 4)
    if not 0 < grace <= max_iters:
        raise ConfigError(f"--grace must lie in 1..{max_iters} (the trial length), got {grace}")
    for cfg in configs.values():
        if "train.eval_every" not in overrides:
            cfg["train"]["eval_every"] = grace  # ASHA needs a score at each rung
        check_plan(plan_of(cfg), cfg)
    cfg = configs[methods[0]]
    from rayuda.data import open_dataset  # fail on a bad dataset spec now, not inside every trial

    class_names = list(open_dataset(cfg["source"], "train", role="source", protocol=cfg["protocol"]).class_names)
    open_dataset(cfg["target"], "train", role="target", protocol=cfg["protocol"])
    from rayuda.engine.pipeline import (
        check_inputs,
        describe_holdout,
        dropped_lines,
        resolve_eval_protocol,
        resolve_selection_metric,
    )

    requested = cfg["train"]["metric"]
    for method_cfg in configs.values():
        metric = resolve_selection_metric(method_cfg)  # `auto` → what it means for this target, in every trial
        resolve_eval_protocol(method_cfg)  # null → label (a real dataset) or resized (minicity), in every trial
        check_plan(plan_of(method_cfg), method_cfg)  # e.g. a probe validator with train.probe_images 0
    if requested != metric:
        print(f"selection metric {requested!r} → {metric!r} (the target holdout "
              f"{'is' if metric == 'miou' else 'is not'} labelled)", flush=True)

    describe_holdout(cfg)  # refuses miou on a target without labels, an empty selection (before decoding)
    dropped = {}  # data.bad_pairs=skip: the image/label pairs of different sizes every trial leaves out
    for method_cfg in configs.values():  # G builds, model.init loads, every image and label decodes
        dropped.update({pair.image: pair for pair in check_inputs(method_cfg, class_names)})
    dropped = list(dropped.values())
    if dropped:
        print("\n".join(dropped_lines(dropped)), flush=True)
    print(describe_holdout(cfg, frozenset(p.image for p in dropped)), flush=True)
    if auto and metric != "miou":
        print(f"WARNING: comparing methods on the label-free {metric!r} score favours methods that minimise "
              f"entropy (minent, advent, fgdem); prefer a few labelled target images and --metric miou", flush=True)
    if not args.no_confirm and (args.confirm_top < 0 or args.confirm_seeds < 1 or args.min_gain < 0):
        raise ConfigError("--confirm-top must be ≥ 0, --confirm-seeds ≥ 1 and --min-gain ≥ 0 (or --no-confirm)")
    return {"configs": configs, "space": space, "spaces": spaces, "fixed": fixed, "max_iters": max_iters,
            "grace": grace, "dropped": dropped}


def check_knob_values(space: SearchSpace, cfg: dict[str, Any]) -> None:
    """Each knob's extreme values (a categorical knob's every choice) set into the method's config and its plan
    checked, so a knob whose type or range its config key cannot take fails here rather than in every trial."""
    for knob in space.knobs:
        for value in knob.choices if knob.type == "categorical" else (knob.low, knob.high):
            trial_cfg = copy.deepcopy(cfg)
            try:
                set_key(trial_cfg, knob.name, value, source=f"{space.source}: knob {knob.name}")
                check_plan(plan_of(trial_cfg), trial_cfg)
            except ConfigError as err:
                raise ConfigError(f"{space.source}: knob {knob.name} = {value!r} cannot run: {err}") from None


def auto_space(spaces: dict[str, SearchSpace]) -> SearchSpace:
    """One space over several methods: ``method`` is a categorical knob (the first method's paper defaults are
    the first trial) and each method's knobs, named ``METHOD:key`` (not ``/``: Ray nests such keys), exist only
    when it is chosen."""
    methods = list(spaces)
    knobs = [Knob("method", "categorical", methods[0], choices=tuple(methods))]
    for method, space in spaces.items():
        own = {k.name for k in space.knobs}
        for knob in space.knobs:
            condition = {(f"{method}:{k}" if k in own else k): v for k, v in knob.condition.items()}
            knobs.append(replace(knob, name=f"{method}:{knob.name}", condition={**condition, "method": (method,)}))
    return SearchSpace(AUTO, tuple(knobs), ", ".join(sp.source for sp in spaces.values()))


def method_defaults(plan: dict[str, Any], method: str) -> dict[str, Any]:
    """The knobs of ``method`` at the paper's values, as the search's params (prefixed for ``auto``)."""
    defaults = plan["spaces"][method].defaults(plan["fixed"])
    if plan["space"].method != AUTO:
        return defaults
    return {"method": method, **{f"{method}:{k}": v for k, v in defaults.items()}}


def longest_trial(cfg: dict[str, Any], space) -> int:
    """The longest step axis a trial can have (ASHA's ``max_t``): reported iterations with every searched
    ``stages.*.iters`` knob at its high end, and the longest plan any value of a categorical or int knob
    gives (e.g. ``params.rounds``)."""
    longest = copy.deepcopy(cfg)
    for knob in space.knobs:
        if knob.name.startswith("stages.") and knob.name.endswith(".iters"):
            set_key(longest, knob.name, knob.high, source="search space")
    best = reported_iterations(longest)
    for knob in space.knobs:
        if knob.name.startswith("params.") and knob.type in ("categorical", "int"):
            values = knob.choices if knob.type == "categorical" else range(knob.low, knob.high + 1, knob.step or 1)
            for value in list(values)[:16]:
                variant = copy.deepcopy(longest)
                set_key(variant, knob.name, value, source="search space")
                best = max(best, reported_iterations(variant))
    return best


def _experiment_dir(args, storage: Path) -> tuple[str, Path]:
    if args.resume:
        if args.name:
            name = args.name
        else:
            found = sorted(storage.glob(f"{args.method}-*"), key=lambda p: p.stat().st_mtime)
            if not found:
                raise ConfigError(f"--resume: no {args.method} search under {storage}")
            name = found[-1].name
        if not (storage / name).is_dir():
            raise ConfigError(f"--resume: no search named {name!r} under {storage}")
        return name, storage / name
    name = args.name or f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (storage / name).exists():
        raise ConfigError(f"a search named {name!r} already exists under {storage}; use --resume or another --name")
    return name, storage / name


def search_record(exp_dir: Path) -> dict[str, Any]:
    """What a search set out to do (``work/search.json``: trial count, MLflow URI), for ``--resume``."""
    path = exp_dir / "work" / "search.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def check_trusted(exp_dir: Path) -> None:
    """``--resume`` makes Ray unpickle the search's state files: refuse files another user owns or anyone can
    write (a planted file would run its code as you); warn about group-writable ones."""
    uid = os.getuid()
    for path in [exp_dir, *(p for p in exp_dir.iterdir() if p.is_file())]:
        st = path.stat()
        if st.st_uid != uid or st.st_mode & 0o002:
            who = "is owned by another user" if st.st_uid != uid else "is writable by anyone"
            raise ConfigError(f"--resume: {path} {who}; Ray unpickles a search's state files when it resumes it, so "
                              f"only resume searches whose storage only you (or people you trust) can write")
        if st.st_mode & 0o020:
            print(f"WARNING: {path} is writable by its group: everyone in it can run code in your --resume",
                  file=sys.stderr)


def check_optuna_storage(url: str) -> None:
    """Open ``--optuna-storage`` once (it creates its tables) so a bad URL fails before Ray starts."""
    import optuna

    try:
        optuna.storages.RDBStorage(url)
    except Exception as err:  # SQLAlchemy raises many types for bad URLs and unwritable files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--optuna-storage {url}: {first[:300]}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from rayuda.tracking import check_tracking_uri, default_tracking_uri

        if args.mlflow_uri:
            check_tracking_uri(args.mlflow_uri)  # the cheapest check first
        plan = prepare(args)
        name, exp_dir = where_things_go(args)
        if args.resume:
            check_trusted(exp_dir)
            if args.ray_experiment != str(exp_dir):  # an object store has no file owners to check
                print(f"note: --resume unpickles the search's state from {args.ray_experiment}: resume only from "
                      f"a bucket that only you (or people you trust) can write", file=sys.stderr)
        args.mlflow_uri = args.mlflow_uri or search_record(exp_dir).get("mlflow_uri") or default_tracking_uri()
        check_tracking_uri(args.mlflow_uri)
        if args.optuna_storage:
            check_optuna_storage(args.optuna_storage)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return search(args, plan, name, exp_dir)


def where_things_go(args) -> tuple[str, Path]:
    """The search's name and its POSIX folder (rayuda's files); sets ``args.ray_storage`` (Ray's ``storage_path``:
    that folder's parent, or the ``--storage`` URI) and ``args.ray_experiment`` (what ``--resume`` restores)."""
    from rayuda.storage import check_storage_uri, is_uri, join

    remote = is_uri(args.storage)
    if remote:
        check_storage_uri(args.storage)
    root = Path(args.work_dir or (DEFAULT_STORAGE if remote else args.storage.removeprefix("file://"))).resolve()
    name, exp_dir = _experiment_dir(args, root)
    args.ray_storage = args.storage if remote else str(root)
    args.ray_experiment = join(args.storage, name) if remote else str(exp_dir)
    return name, exp_dir


def resume_command(args, name: str, exp_dir: Path) -> str:
    """The command that continues this search."""
    if args.ray_storage == str(exp_dir.parent):  # a path: Ray's state and rayuda's files in one folder
        where = f"--storage {exp_dir.parent}"
    else:
        where = f"--storage {args.storage} --work-dir {exp_dir.parent}"
    return f"python -m rayuda.tune {args.method} --resume --name {name} {where}"


def search(args, plan: dict[str, Any], name: str, exp_dir: Path) -> int:
    import ray
    from ray import tune

    from rayuda.tracking import MlflowTracker

    configs, space, max_iters = plan["configs"], plan["space"], plan["max_iters"]
    cfg = next(iter(configs.values()))  # seed, data and metric are the same in every method's config
    work_root = exp_dir / "work"
    cache_dir = Path(args.cache_dir).resolve() if args.cache_dir else exp_dir / "stage-cache"
    work_root.mkdir(parents=True, exist_ok=True)
    write_dropped(plan["dropped"], work_root / DROPPED)
    for method, method_cfg in configs.items():
        save_config(method_cfg, exp_dir / ("base_config.yaml" if len(configs) == 1 else f"base_config-{method}.yaml"))
    uri = args.mlflow_uri  # on --resume: the one given now, else the one the search started with
    setup = {"configs": configs, "work_root": str(work_root), "cache_dir": str(cache_dir),
             "cpus_per_trial": args.cpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    metric_name = cfg["train"]["metric"]
    stopping = f"ASHA grace {plan['grace']}" if args.scheduler == "asha" else "no early stopping"
    print(f"rayuda.tune {args.method}: {len(space.knobs)} knobs from {space.source}; "
          f"{args.num_samples} trials × {max_iters} iterations, {args.sampler} sampler, {stopping}, "
          f"selection metric {metric_name!r}; storage {args.ray_experiment}"
          + (f", work folder {exp_dir}" if args.ray_experiment != str(exp_dir) else "") + f"; MLflow {uri}", flush=True)

    from rayuda.storage import check_shared, write_markers

    ray.init(address=args.address, include_dashboard=False, configure_logging=False,
             log_to_driver=True, ignore_reinit_error=True)
    write_markers([work_root, cache_dir], name)  # what every trial checks it can see (rayuda.storage)
    try:
        check_shared([work_root, cache_dir])  # on every node of the cluster, before any trial
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # rayuda's own state lives under work/: Ray re-uploads the experiment folder's top-level files it
    # restored on --resume when the search ends, which would roll them back to their old content
    record = work_root / "optuna_trials.json"
    if args.resume:
        print(f"resuming search {name} from {args.ray_experiment}", flush=True)
        tuner = tune.Tuner.restore(args.ray_experiment, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        concurrent = args.max_concurrent or _fitting_trials(ray.cluster_resources(), args)
        searcher = make_searcher(optuna_space(space, plan["fixed"]), metric="score",
                                 sampler=make_sampler(args.sampler, cfg["seed"], args.num_samples),
                                 first=space.defaults(plan["fixed"]), record=record, storage=args.optuna_storage,
                                 study_name=name)
        scheduler = (FIFOScheduler() if args.scheduler == "none" else
                     ASHAScheduler(time_attr="iteration", max_t=max_iters, grace_period=plan["grace"],
                                   reduction_factor=args.reduction_factor))
        tracker = MlflowTracker(
            uri, f"rayuda-{args.method}", str(exp_dir), name, configs,
            {"method": args.method, "methods": ",".join(configs), "num_samples": args.num_samples,
             "max_iters": max_iters, "grace": plan["grace"], "sampler": args.sampler, "scheduler": args.scheduler,
             "reduction_factor": args.reduction_factor, "selection_metric": metric_name,
             "space": space.source, "dropped_pairs": len(plan["dropped"])}, str(work_root))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric="score", mode="max", search_alg=searcher, scheduler=scheduler,
                                        num_samples=args.num_samples, max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=name, storage_path=args.ray_storage, callbacks=[tracker],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=args.max_failures)),
        )
    plan_file = work_root / "search.json"  # what this search set out to do, for --resume
    record_ = {"num_samples": args.num_samples, **search_record(exp_dir), "mlflow_uri": uri}
    plan_file.write_text(json.dumps(record_))  # the tracker reads the MLflow URI from here (see MlflowTracker)
    results = tuner.fit()
    expected = record_["num_samples"]
    return summarise(args, results, plan, exp_dir, name, uri, record, expected, None if args.no_confirm else setup)


def write_dropped(dropped: list, path: Path) -> None:
    """The bad pairs ``data.bad_pairs=skip`` drops, one ``image<TAB>label<TAB>reason`` line each (the search's
    MLflow artifact); no file when none is dropped."""
    if dropped:
        path.write_text("".join(f"{p.image}\t{p.label}\t{p.reason}\n" for p in dropped))
    else:
        path.unlink(missing_ok=True)


def _fitting_trials(resources: dict[str, float], args) -> int | None:
    """Trials the cluster can run at once now; None (Tune decides) when an autoscaler must add GPUs first."""
    if args.gpus_per_trial > 0:
        gpus = resources.get("GPU", 0)
        return int(gpus // args.gpus_per_trial) or None
    return max(1, int(resources.get("CPU", 1) // max(args.cpus_per_trial, 1e-9)))


def _finished_trials(record: Path) -> int:
    """Trials the searcher was told the end of (complete, pruned or failed); interrupted ones are not."""
    if not record.exists():
        return 0
    return sum(r["state"] in ("COMPLETE", "PRUNED", "FAIL") for r in json.loads(record.read_text()))


def trials_table(results, exp_dir: Path) -> list[dict[str, Any]]:
    """One row per trial: outcome, best selection score, test-part mIoU, stage cache, knobs."""
    from rayuda.tracking import error_line, outcome, stage_lines

    rows = []
    for result in results:
        metrics = result.metrics or {}
        knobs = dict(result.config or {})
        history = result.metrics_dataframe
        best = float(history["score"].max()) if history is not None and "score" in history else float("nan")
        trial_id = metrics.get("trial_id", "")
        stages = stage_lines(exp_dir / "work" / "trials" / trial_id / "summary.json")
        error = error_line(str(result.error)) if result.error is not None else metrics.get("failed")
        if error is not None and math.isinf(best):
            best = float("nan")  # a trial that failed before its first evaluation has no score
        rows.append({"trial": trial_id, "outcome": outcome(metrics, error=result.error is not None), "error": error,
                     "iteration": metrics.get("iteration", 0), "best_score": best,
                     "test_miou": metrics.get("test/miou", float("nan")),
                     "stages": "; ".join(f"{k} {v}" for k, v in stages.items()), **knobs, "knobs": knobs})
    rows.sort(key=lambda r: -r["best_score"] if not math.isnan(r["best_score"]) else math.inf)
    return rows


def summarise(args, results, plan: dict[str, Any], exp_dir: Path, name: str, uri: str, record: Path, expected: int,
              confirm_setup: dict[str, Any] | None) -> int:
    """Trials table, the confirmation phase, best.yaml, parent-run artifacts and plots; 130 if interrupted."""
    from rayuda.tracking import CHAMPION, finish_search, threshold_tables

    cfg = next(iter(plan["configs"].values()))
    rows = trials_table(results, exp_dir)
    interrupted = _finished_trials(record) < expected
    keys = sorted({k for r in rows for k in r} - {"knobs"},
                  key=lambda k: (k not in ("trial", "outcome", "iteration", "best_score", "test_miou", "stages"), k))
    table = exp_dir / "trials.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    metric = cfg["train"]["metric"]
    print(f"\n{'trial':<14} {'outcome':<14} {'iter':>5} {'best score':>10} {'test mIoU':>9}  {'stage cache':<12} "
          f"params        (score = {metric} on the selection images; test mIoU on the test images)")
    for r in rows:
        knobs = ", ".join(f"{k}={_fmt(v)}" for k, v in r["knobs"].items())
        cache = " ".join(line.split()[1][0] for line in r["stages"].split("; ") if line) or "-"
        print(f"{r['trial']:<14} {r['outcome']:<14} {r['iteration']:>5} {r['best_score']:>10.4f} "
              f"{100 * r['test_miou']:>9.2f}  {cache:<12} {knobs}")
    print("(stage cache: one letter per stage of the plan — h hit, m miss, s skipped)")

    plots = _plots(record, exp_dir) if record.exists() else []
    failed = [r for r in rows if r["outcome"] == "failed"]
    for reason, count in collections.Counter(r["error"] for r in failed).most_common():
        print(f"{count} of {len(rows)} trials failed: {reason}", file=sys.stderr)
    scored = [r for r in rows if not math.isnan(r["best_score"]) and r["outcome"] != "failed"]
    artifacts, metrics, tags = [table, *plots], {}, {}
    if (exp_dir / "work" / DROPPED).is_file():  # data.bad_pairs=skip: which pairs every trial left out
        artifacts.append(exp_dir / "work" / DROPPED)
        tags["rayuda.dropped_pairs"] = str(len(plan["dropped"]))
    best_path = winner_dir = None
    champion, description = False, None  # the registered version: alias champion only when confirmed
    if scored:
        top = scored[0]
        print(f"\nbest trial by selection: {top['trial']} ({metric} score {top['best_score']:.4f} on the selection "
              f"images; test mIoU {100 * top['test_miou']:.2f})")
        metrics.update({"best/score": top["best_score"], "best/test_miou": top["test_miou"]})
        chosen, header = top["knobs"], [f"best trial by {metric} on the selection images: {top['trial']}"]
        winner_dir = exp_dir / "work" / "trials" / top["trial"]
        description = (f"search {name}: trial {top['trial']}, the best by {metric} on the selection images; not "
                       f"confirmed on fresh seeds ({'interrupted' if interrupted else '--no-confirm'}), so not "
                       f"the {CHAMPION}")
        if confirm_setup is not None and not interrupted:
            import ray

            from rayuda.confirm import DEFAULTS, confirmation_phase, table_markdown

            top_method = top["knobs"].get("method", cfg["method"])
            outcome_ = confirmation_phase(
                confirm_setup, rows, method_defaults(plan, top_method), top_k=args.confirm_top,
                seeds=args.confirm_seeds, min_gain=args.min_gain,
                resources={"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
                concurrent=args.max_concurrent or _fitting_trials(ray.cluster_resources(), args))
            report = exp_dir / "confirmation.md"
            report.write_text(table_markdown(outcome_))
            artifacts.append(report)
            print("\nconfirmation on fresh seeds, test images:\n" + table_markdown(outcome_))
            chosen = confirm_setup["candidates"][outcome_["winner"]]
            seed = outcome_["rows"][0]["seeds"][0]
            winner_dir = exp_dir / "work" / "confirm" / f"{outcome_['winner'].replace(' ', '-')}-seed{seed}"
            header = [f"confirmed: {outcome_['text']}"]
            tags["rayuda.verdict"] = outcome_["text"][:5000]
            for row in outcome_["rows"]:
                slug = row["config"].replace(" ", "_")
                metrics[f"confirm/{slug}/mean"] = row["mean"]
                if "gain" in row:
                    metrics[f"confirm/{slug}/gain"] = row["gain"]
            if outcome_["winner"] == DEFAULTS:
                header.append("these are the paper defaults")
            champion = True
            description = champion_description(name, outcome_, outcome_["winner"] == DEFAULTS)
        best_cfg = config_for(plan["configs"], chosen)
        header += threshold_lines(winner_dir / "summary.json")
        artifacts += threshold_tables(winner_dir / "summary.json", exp_dir / "winner-thresholds")
        best_path = exp_dir / "best.yaml"
        save_config(best_cfg, best_path, header=header)
        if (winner_dir / "summary.json").exists():  # what `rayuda.predict SEARCH_FOLDER` uses
            (exp_dir / "work" / WINNER).write_text(json.dumps({"run": str(winner_dir.relative_to(exp_dir)),
                                                               "why": header[0]}))
        if args.best:
            save_config(best_cfg, args.best, header=header)
        print(f"best config → {best_path}" + (f" and {args.best}" if args.best else "")
              + f"  (python -m rayuda.train {best_cfg['method']} --config {args.best or best_path})")
    all_failed = bool(rows) and len(failed) == len(rows) and not interrupted
    if failed:
        tags["rayuda.error"] = f"{len(failed)} of {len(rows)} trials failed; first: {failed[0]['error']}"[:5000]
    status = "KILLED" if interrupted else "FAILED" if all_failed else "FINISHED"
    finish_search(uri, f"rayuda-{args.method}", str(exp_dir), best_config=best_path, artifacts=artifacts,
                  metrics=metrics, tags=tags, status=status,
                  winner_dir=winner_dir if best_path and (winner_dir / "summary.json").exists() else None,
                  register=args.register, champion=champion, description=description)
    from rayuda.tracking import client_for, ensure_experiment

    exp_id = ensure_experiment(client_for(uri), f"rayuda-{args.method}", uri)
    where = (f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000" if not uri.startswith("http")
             else uri.rstrip("/"))
    print(f"trials table → {table}\nMLflow: {where}/#/experiments/{exp_id}?workflowType=machine_learning "
          f"(the runs table; MLflow 3 opens on its GenAI view otherwise)")
    if interrupted:
        print(f"search interrupted; continue it with: {resume_command(args, name, exp_dir)}", file=sys.stderr)
        return 130
    if all_failed:
        print(f"error: every trial failed (the first: {failed[0]['error']}); see {table}", file=sys.stderr)
        return 1
    return 0


def champion_description(name: str, outcome: dict[str, Any], defaults: bool) -> str:
    """The registered version's description of a confirmed winner: which config it is and the verdict."""
    what = ("the paper defaults (no tuned config beat them: keep the defaults)" if defaults
            else f"{outcome['winner']} (it beat the paper defaults)")
    return f"search {name}, confirmed on fresh seeds: {what}. Verdict: {outcome['text']}"


def threshold_lines(summary_path: Path) -> list[str]:
    """The per-class thresholds a run's pseudo-label stages decided, as lines for ``best.yaml``'s header."""
    if not summary_path.is_file():
        return []
    lines = []
    for stage in json.loads(summary_path.read_text())["stages"]:
        for name, row in (stage.get("per_class") or {}).items():
            values = ", ".join(f"{k} {_fmt(v)}" for k, v in row.items())
            lines.append(f"thresholds of stage {stage['stage']}, {name}: {values}")
    return lines


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(record: Path, exp_dir: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances, as PNG (skipped when too few trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    study = study_from_record(record)
    out = []
    for name, plot in (("optimization_history", optuna.visualization.matplotlib.plot_optimization_history),
                       ("param_importances", optuna.visualization.matplotlib.plot_param_importances)):
        try:
            plot(study)
            path = exp_dir / f"{name}.png"
            plt.gcf().set_size_inches(8, 5)
            plt.tight_layout()
            plt.savefig(path, dpi=100)
            out.append(path)
        except Exception as err:  # noqa: BLE001 — a plot is a nicety; say why it is missing
            print(f"(no {name} plot: {err})", file=sys.stderr)
        finally:
            plt.close("all")
    return out


if __name__ == "__main__":
    sys.exit(main())
