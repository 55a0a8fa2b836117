"""The search itself: a Ray Tune ``Tuner`` of :func:`~rayuda.hpo.trainable.run_trial` with the searcher, ASHA and
the MLflow tracker — new, or restored from Ray's experiment state (``--resume``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from rayuda.config import save_config
from rayuda.hpo.places import DROPPED, Places, write_dropped
from rayuda.hpo.prepare import SearchPlan
from rayuda.hpo.searcher import JOURNAL, StudySearcher, make_sampler
from rayuda.hpo.space import optuna_space
from rayuda.hpo.trainable import TrialSetup, run_trial


@dataclass(frozen=True)
class Connection:
    """How the search reaches its services: the Ray cluster, MLflow, the Optuna study's storage."""

    address: str | None  # --address (None: a local Ray)
    mlflow_uri: str
    optuna_storage: str  # an RDB URL (--optuna-storage) or the journal file under work/

    @classmethod
    def of(cls, places: Places, address: str | None, mlflow_uri: str, optuna_storage: str | None) -> Connection:
        """On ``--resume`` the Optuna storage the search started with (``work/search.json``) unless given now."""
        recorded = places.record().get("optuna_storage")
        return cls(address, mlflow_uri, optuna_storage or recorded or str(places.work / JOURNAL))


def fitting_trials(resources: dict[str, float], per_trial: dict[str, float]) -> int | None:
    """Trials the cluster can run at once now; None (Tune decides) when an autoscaler must add GPUs first."""
    if per_trial["gpu"] > 0:
        return int(resources.get("GPU", 0) // per_trial["gpu"]) or None
    return max(1, int(resources.get("CPU", 1) // max(per_trial["cpu"], 1e-9)))


def trial_setup(plan: SearchPlan, places: Places) -> TrialSetup:
    return TrialSetup(configs=plan.configs, work_root=str(places.work), cache_dir=str(places.cache_dir),
                      cpus_per_trial=plan.resources["cpu"])


def start_ray(plan: SearchPlan, places: Places, connection: Connection) -> None:
    """Write the search's own files, start (or join) Ray and check that every node sees the shared folders."""
    import ray

    from rayuda.storage import check_shared, write_markers

    places.work.mkdir(parents=True, exist_ok=True)
    write_dropped(plan.dropped, places.work / DROPPED)
    for method, cfg in plan.configs.items():
        save_config(cfg, places.exp_dir / ("base_config.yaml" if len(plan.configs) == 1
                                           else f"base_config-{method}.yaml"))
    ray.init(address=connection.address, include_dashboard=False, configure_logging=False, log_to_driver=True,
             ignore_reinit_error=True)
    write_markers([places.work, places.cache_dir], places.name)  # what every trial checks it can see
    check_shared([places.work, places.cache_dir])  # on every node of the cluster, before any trial


def run_search(plan: SearchPlan, places: Places, connection: Connection, resume: bool):
    """Run (or continue) the search's trials; returns Ray's ``ResultGrid``. Ray must be started
    (:func:`start_ray`)."""
    import ray
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=trial_setup(plan, places)),
                                    plan.resources)
    # rayuda's own state lives under work/: Ray re-uploads the experiment folder's top-level files it
    # restored on --resume when the search ends, which would roll them back to their old content
    if resume:
        print(f"resuming search {places.name} from {places.ray_experiment}", flush=True)
        tuner = tune.Tuner.restore(places.ray_experiment, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        from rayuda.hpo.tracking import MlflowTracker

        searcher = StudySearcher(optuna_space(plan.space, plan.fixed), metric="score",
                                 sampler=make_sampler(plan.sampler, plan.base["seed"], plan.num_samples),
                                 storage=connection.optuna_storage, study_name=places.name,
                                 first=plan.space.defaults(plan.fixed))
        scheduler = (FIFOScheduler() if plan.scheduler == "none" else
                     ASHAScheduler(time_attr="iteration", max_t=plan.max_iters, grace_period=plan.grace,
                                   reduction_factor=plan.reduction_factor))
        tracker = MlflowTracker(
            connection.mlflow_uri, places.experiment, str(places.exp_dir), places.name, plan.configs,
            {"method": plan.method, "methods": ",".join(plan.configs), "num_samples": plan.num_samples,
             "max_iters": plan.max_iters, "grace": plan.grace, "sampler": plan.sampler, "scheduler": plan.scheduler,
             "reduction_factor": plan.reduction_factor, "selection_metric": plan.metric,
             "space": plan.space.source, "dropped_pairs": len(plan.dropped)}, str(places.work))
        concurrent = plan.max_concurrent or fitting_trials(ray.cluster_resources(), plan.resources)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(metric="score", mode="max", search_alg=searcher, scheduler=scheduler,
                                        num_samples=plan.num_samples, max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=places.name, storage_path=places.ray_storage, callbacks=[tracker],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=plan.max_failures)),
        )
    record = {"num_samples": plan.num_samples, **places.record(), "mlflow_uri": connection.mlflow_uri,
              "optuna_storage": connection.optuna_storage}
    (places.work / "search.json").write_text(json.dumps(record))  # the tracker reads the MLflow URI from here
    return tuner.fit(), int(record["num_samples"])


def study_of(places: Places, connection: Connection):
    """The search's Optuna study, read back from its storage."""
    from rayuda.hpo.searcher import load_search_study

    return load_search_study(connection.optuna_storage, places.name)

