"""MLflow tracking of a search: one parent run per search, one child run per trial.

Everything is logged from the Tune driver through a :class:`MlflowTracker` callback, so trial workers
need no MLflow access: the driver reads what trials write to the (shared) experiment storage.

* child run: resolved config as params, every evaluation's metrics against the iteration (``miou``,
  ``iou/<class>``, ``loss/<name>``, ``target_entropy``, ``score``), the predicted masks of each
  evaluation (Cityscapes palette), the best checkpoint, and a final status: ``FINISHED`` (ran to
  ``max_iters``), ``KILLED`` (stopped early by ASHA, tag ``rayuda.outcome=early_stopped``) or
  ``FAILED``.
* parent run: the search's settings, then (see ``rayuda.tune``) the best config, a trials CSV and
  Optuna plots.

Runs are found again by tags (``rayuda.search`` on the parent, ``rayuda.trial_id`` on a child), so a
resumed search continues its runs instead of duplicating them. The default store is a SQLite file in
the working directory (MLflow 3 refuses the plain ``./mlruns`` file store by default).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ray import tune

from rayuda.config import flatten

OUTCOME_STATUS = {"finished": "FINISHED", "early_stopped": "KILLED", "failed": "FAILED"}
METRIC_PREFIXES = ("miou", "iou/", "loss/", "target_entropy", "flip_agreement", "score", "pseudo")


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client, name: str, uri: str) -> str:
    """The MLflow experiment ``name`` (created on first use; local stores keep artifacts beside the db)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a Tune result that belong in MLflow."""
    out = {}
    for key, value in result.items():
        if key.startswith(METRIC_PREFIXES) and isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                out[key] = float(value)
    return out


def outcome(result: dict[str, Any] | None, max_iters: int, error: bool = False) -> str:
    """``finished`` if the trial reached ``max_iters``; ``early_stopped`` if ASHA stopped it before."""
    if error:
        return "failed"
    return "finished" if result and int(result.get("iteration", 0)) >= max_iters else "early_stopped"


class MlflowTracker(tune.Callback):
    """Tune callback that mirrors a search into MLflow (parent run + one child per trial).

    It holds only plain data so that Ray can pickle it with the experiment and restore it on resume.
    """

    def __init__(self, uri: str, experiment: str, search_id: str, run_name: str, base_config: dict[str, Any],
                 max_iters: int, search_params: dict[str, Any], work_root: str):
        self.work_root = work_root
        self.uri, self.experiment, self.search_id, self.run_name = uri, experiment, search_id, run_name
        self.base_config, self.max_iters, self.search_params = base_config, max_iters, search_params
        self._client = None
        self._experiment_id: str | None = None
        self._parent: str | None = None
        self._runs: dict[str, str] = {}
        self._tagged_nodes: set[str] = set()

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_client=None, _runs={}, _parent=None, _experiment_id=None, _tagged_nodes=set())
        return state

    # -- plumbing ---------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.uri)
            self._experiment_id = ensure_experiment(self._client, self.experiment, self.uri)
        return self._client

    def parent_run_id(self) -> str:
        """The search's parent run: found by its tag, or created (running) on first use."""
        if self._parent is None:
            client = self.client
            found = client.search_runs([self._experiment_id], f"tags.`rayuda.search` = '{self.search_id}'")
            if found:
                self._parent = found[0].info.run_id
                if found[0].info.status != "RUNNING":
                    client.update_run(self._parent, status="RUNNING")
            else:
                run = client.create_run(self._experiment_id, run_name=self.run_name,
                                        tags={"rayuda.search": self.search_id, "rayuda.role": "search"})
                self._parent = run.info.run_id
                params = {**self.search_params, **{f"base.{k}": v for k, v in flatten(self.base_config).items()}}
                self._log_params(self._parent, params)
        return self._parent

    def child_run_id(self, trial) -> str:
        run_id = self._runs.get(trial.trial_id)
        if run_id is None:
            parent = self.parent_run_id()
            query = f"tags.`rayuda.trial_id` = '{trial.trial_id}' and tags.`mlflow.parentRunId` = '{parent}'"
            found = self.client.search_runs([self._experiment_id], query)
            if found:
                run_id = found[0].info.run_id
                if found[0].info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
            else:
                tags = {"mlflow.parentRunId": parent, "rayuda.trial_id": trial.trial_id, "rayuda.role": "trial",
                        "rayuda.selection_metric": self.base_config["train"]["metric"]}
                run_id = self.client.create_run(self._experiment_id, run_name=str(trial), tags=tags).info.run_id
                params = {**flatten(self.base_config), **(trial.config or {})}
                self._log_params(run_id, params)
            self._runs[trial.trial_id] = run_id
        return run_id

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    # -- Tune hooks -------------------------------------------------------------------------------
    def setup(self, **info):
        self.parent_run_id()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.child_run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        step = int(result.get("iteration", 0))
        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, step) for k, v in trial_metrics(result).items()]
        run_id = self.child_run_id(trial)
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        if result.get("node_id") and trial.trial_id not in self._tagged_nodes:
            self.client.set_tag(run_id, "rayuda.node_id", str(result["node_id"]))  # the Ray node that ran it
            self._tagged_nodes.add(trial.trial_id)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        step = int((trial.last_result or {}).get("iteration", 0))
        with checkpoint.as_directory() as folder:
            masks = Path(folder) / "masks"
            if masks.is_dir():
                self.client.log_artifacts(self.child_run_id(trial), str(masks), f"masks/iter_{step:06d}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, outcome(trial.last_result, self.max_iters))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "failed")

    def _finish(self, trial, result: str) -> None:
        run_id = self.child_run_id(trial)
        self.client.set_tag(run_id, "rayuda.outcome", result)
        best = Path(self.work_root) / "trials" / trial.trial_id / "best_model.pt"
        if best.is_file():
            self.client.log_artifact(run_id, str(best), "checkpoint")
        self.client.set_terminated(run_id, OUTCOME_STATUS[result])

    def on_experiment_end(self, trials, **info):
        # a trial Ray never finished (e.g. the search was interrupted) must not stay RUNNING
        for trial in trials:
            run_id = self._runs.get(trial.trial_id)
            if run_id is not None and self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, "KILLED")


def finish_search(uri: str, experiment: str, search_id: str, *, best_config: Path | None, trials_csv: Path | None,
                  plots: list[Path], best_metrics: dict[str, float], status: str = "FINISHED") -> str | None:
    """Attach the search's results to its parent run and close it."""
    client = client_for(uri)
    exp_id = ensure_experiment(client, experiment, uri)
    found = client.search_runs([exp_id], f"tags.`rayuda.search` = '{search_id}'")
    if not found:
        return None
    run_id = found[0].info.run_id
    for path in [best_config, trials_csv, *plots]:
        if path is not None and Path(path).is_file():
            client.log_artifact(run_id, str(path))
    for key, value in trial_metrics(best_metrics).items():
        client.log_metric(run_id, f"best/{key}", value)
    client.set_terminated(run_id, status)
    return run_id
