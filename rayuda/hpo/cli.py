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
import sys
from pathlib import Path

from rayuda.config import ConfigError
from rayuda.data import DatasetError
from rayuda.engine.evaluate import SELECTION_METRICS
from rayuda.hpo.places import DEFAULT_STORAGE, DROPPED, Places, check_trusted, locate
from rayuda.hpo.prepare import SearchPlan, prepare
from rayuda.hpo.searcher import SAMPLERS, check_optuna_storage, finished_trials
from rayuda.hpo.tuner import Connection
from rayuda.methods import METHODS


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
    p.add_argument("--address", default=None,
                   help="join a running Ray cluster (default: the cluster `ray start` last started on this machine, "
                        "e.g. the head node of `ray up`; else a new local one; RAY_ADDRESS=local forces a new one)")
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
                   help="keep the Optuna study in this RDB (e.g. sqlite:///optuna.db, for optuna-dashboard) instead "
                        "of the search's journal file (WORK_DIR/NAME/work/optuna.journal); named after the search")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a trial whose worker died or raised, each from its last checkpoint (default 2)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Check everything (exit 2 naming what is wrong, before Ray starts), search, confirm, report."""
    args = build_parser().parse_args(argv)
    try:
        plan, places, connection = check(args)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return search(plan, places, connection, resume=args.resume, best=args.best, register=args.register)


def check(args) -> tuple[SearchPlan, Places, Connection]:
    """The plan, the places and the services of a search, each checked before Ray starts."""
    from rayuda.hpo.tracking import check_tracking_uri, default_tracking_uri

    if args.mlflow_uri:
        check_tracking_uri(args.mlflow_uri)  # the cheapest check first
    plan = prepare(args)
    places = locate(args)
    if args.resume:
        check_trusted(places.exp_dir)
        if places.ray_experiment != str(places.exp_dir):  # an object store has no file owners to check
            print(f"note: --resume unpickles the search's state from {places.ray_experiment}: resume only from "
                  f"a bucket that only you (or people you trust) can write", file=sys.stderr)
    uri = args.mlflow_uri or places.record().get("mlflow_uri") or default_tracking_uri()
    check_tracking_uri(uri)
    if args.optuna_storage:
        check_optuna_storage(args.optuna_storage)
    return plan, places, Connection.of(places, args.address, uri, args.optuna_storage)


def search(plan: SearchPlan, places: Places, connection: Connection, *, resume: bool, best: str | None,
           register: bool) -> int:
    """Run the search, then (finished, and not --no-confirm) the confirmation, then write the answer and close
    the search's MLflow run. Exit code: 0, 130 when interrupted (with the command that resumes it), 1 when every
    trial failed, 2 when a node cannot see the shared folders."""
    from rayuda.hpo import report
    from rayuda.hpo.confirm import ConfirmationInterrupted
    from rayuda.hpo.tuner import run_search, start_ray, study_of

    print(f"rayuda.tune {plan.method}: {len(plan.space.knobs)} knobs from {plan.space.source}; "
          f"{plan.num_samples} trials × {plan.max_iters} iterations, {plan.sampler} sampler, "
          f"{f'ASHA grace {plan.grace}' if plan.scheduler == 'asha' else 'no early stopping'}, selection metric "
          f"{plan.metric!r}; storage {places.ray_experiment}"
          + (f", work folder {places.exp_dir}" if places.ray_experiment != str(places.exp_dir) else "")
          + f"; MLflow {connection.mlflow_uri}", flush=True)
    try:
        start_ray(plan, places, connection)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results, expected = run_search(plan, places, connection, resume)
    rows = report.trials_table(results, places.exp_dir)
    study = study_of(places, connection)
    interrupted = finished_trials(study) < expected
    artifacts = [report.write_trials_table(rows, places.exp_dir, plan.metric), *report.plots(study, places.exp_dir)]
    failed = [r for r in rows if r["outcome"] == "failed"]
    for reason, count in collections.Counter(r["error"] for r in failed).most_common():
        print(f"{count} of {len(rows)} trials failed: {reason}", file=sys.stderr)
    confirmation = None
    if plan.confirm is not None and not interrupted and report.scored_rows(rows):
        try:
            confirmation = confirm(plan, places, rows)
            artifacts.append(places.exp_dir / "confirmation.md")
        except ConfirmationInterrupted as stop:
            print(f"{stop}: no verdict yet (its finished runs and stages are kept for the resume)", file=sys.stderr)
            interrupted = True
    choice = report.choose(rows, plan, places, confirmation, interrupted)
    all_failed = bool(rows) and len(failed) == len(rows) and not interrupted
    status = "KILLED" if interrupted else "FAILED" if all_failed else "FINISHED"
    close(plan, places, connection, choice, artifacts, failed, len(rows), status, best=best, register=register)
    if interrupted:
        print(f"search interrupted; continue it with: {places.resume_command()}", file=sys.stderr)
        return 130
    if all_failed:
        print(f"error: every trial failed (the first: {failed[0]['error']}); see {artifacts[0]}", file=sys.stderr)
        return 1
    return 0


def confirm(plan: SearchPlan, places: Places, rows: list[dict]):
    """The confirmation phase around the top trial's method; writes ``confirmation.md``."""
    import ray

    from rayuda.hpo.confirm import confirmation_phase, table_markdown
    from rayuda.hpo.report import scored_rows
    from rayuda.hpo.tuner import fitting_trials, trial_setup

    top = scored_rows(rows)[0]
    defaults = plan.defaults_of(top["knobs"].get("method", plan.base["method"]))
    confirmation = confirmation_phase(
        trial_setup(plan, places), rows, defaults, plan.confirm, resources=plan.resources,
        concurrent=plan.max_concurrent or fitting_trials(ray.cluster_resources(), plan.resources))
    (places.exp_dir / "confirmation.md").write_text(table_markdown(confirmation.verdict))
    return confirmation


def close(plan: SearchPlan, places: Places, connection: Connection, choice, artifacts: list[Path], failed: list,
          trials: int, status: str, *, best: str | None, register: bool) -> None:
    """Write ``best.yaml`` and hand everything to the search's MLflow run (model registered when asked)."""
    from rayuda.hpo import report
    from rayuda.hpo.tracking import ensure_experiment, finish_search
    from rayuda.hpo.trial_summary import read_summary, threshold_tables
    from rayuda.runs import client_for

    metrics, tags, best_path = {}, {}, None
    if (places.work / DROPPED).is_file():  # data.bad_pairs=skip: which pairs every trial left out
        artifacts.append(places.work / DROPPED)
        tags["rayuda.dropped_pairs"] = str(len(plan.dropped))
    if choice is not None:
        best_path = report.write_best(choice, plan, places, best)
        artifacts += threshold_tables(read_summary(choice.winner_dir / "summary.json"),
                                      places.exp_dir / "winner-thresholds")
        metrics.update(choice.metrics)
        tags.update(choice.tags)
    if failed:
        tags["rayuda.error"] = f"{len(failed)} of {trials} trials failed; first: {failed[0]['error']}"[:5000]
    uri = connection.mlflow_uri
    has_model = choice is not None and (choice.winner_dir / "summary.json").exists()
    finish_search(uri, places.experiment, str(places.exp_dir), best_config=best_path, artifacts=artifacts,
                  metrics=metrics, tags=tags, status=status, winner_dir=choice.winner_dir if has_model else None,
                  register=register, champion=choice is not None and choice.champion,
                  description=choice.description if choice is not None else None)
    exp_id = ensure_experiment(client_for(uri), places.experiment, uri)
    where = (f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000" if not uri.startswith("http")
             else uri.rstrip("/"))
    print(f"trials table → {artifacts[0]}\nMLflow: {where}/#/experiments/{exp_id}?workflowType=machine_learning "
          f"(the runs table; MLflow 3 opens on its GenAI view otherwise)")
