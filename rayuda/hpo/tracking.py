"""MLflow tracking of a search: one parent run per search, one child run per trial.

Everything is logged from the Tune driver through a :class:`MlflowTracker` callback, so trial workers
need no MLflow access: the driver reads what trials write to the (shared) experiment storage.

* child run: resolved config as params, every evaluation's metrics against the iteration (``miou``,
  ``iou/<class>``, ``loss/<name>``, ``target_entropy``, the validators ``proxy/*``, ``score``), the predicted
  masks of each evaluation (Cityscapes palette), the best checkpoint, every stage of the trial's plan (tag
  ``rayuda.stage.<name>`` = cache hit/miss, metric ``stage_seconds/<name>``), and a final status:
  ``FINISHED`` (its last stage reported its final evaluation), ``KILLED`` (stopped early by ASHA, tag
  ``rayuda.outcome=early_stopped``) or ``FAILED``.
* parent run: the search's settings, then (see ``rayuda.hpo.cli``) the best config, a trials CSV and
  Optuna plots.

Runs are found again by tags (``rayuda.search`` on the parent, ``rayuda.trial_id`` on a child), so a
resumed search continues its runs instead of duplicating them. The default store is a SQLite file in
the working directory (MLflow 3 refuses the plain ``./mlruns`` file store by default).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ray import tune

from rayuda.config import ConfigError, flatten
from rayuda.hpo.registry import CHAMPION, dataset_input, log_dataset_inputs, log_winner_model
from rayuda.hpo.trial_summary import (
    pseudo_metrics,
    read_summary,
    stage_lines,
    summary_dropped,
    summary_environment,
    threshold_tables,
)
from rayuda.runs import client_for

OUTCOME_STATUS = {"finished": "FINISHED", "early_stopped": "KILLED", "failed": "FAILED"}
METRIC_PREFIXES = ("miou", "iou/", "loss/", "target_entropy", "flip_agreement", "proxy/", "score", "pseudo", "test/")


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_tracking_uri(uri: str, flag: str = "--mlflow-uri") -> None:
    """Refuse, before any compute, a tracking URI that cannot work: an HTTP server that does not answer (one
    request, 5 s), or a ``sqlite:``/``file:`` store whose folder is missing or not writable."""
    import urllib.error
    import urllib.parse
    import urllib.request

    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # something answered: MLflow will say more if it is not an MLflow server
        except (urllib.error.URLError, OSError) as err:
            raise ConfigError(f"{flag} {uri}: no MLflow server answers ({getattr(err, 'reason', err)}); start one "
                              f"(mlflow server --host 127.0.0.1 --port 5000) or pass another {flag}") from None
        return
    if scheme == "sqlite":
        folder = Path(uri[len("sqlite:///"):]).parent  # sqlite:///relative.db or sqlite:////absolute.db
    elif scheme in ("file", ""):
        folder = Path(urllib.parse.urlparse(uri).path if scheme else uri)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent  # a file store's folders are made on first use
    else:
        return  # databricks, a plugin's scheme, ...: MLflow's own errors are the best we can do
    if not folder.is_dir():
        raise ConfigError(f"{flag} {uri}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{flag} {uri}: folder {folder} is not writable")


def ensure_experiment(client, name: str, uri: str) -> str:
    """The MLflow experiment ``name`` (created on first use; local stores keep artifacts beside the db), tagged
    as a model-training experiment (:data:`EXPERIMENT_KIND_TAG`; MLflow 3.17's UI still needs the link's
    ``?workflowType=machine_learning`` to open on the runs table, see ``bench/mlflow_ui.py``)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND_TAG, "") in _GUESSED_KINDS:
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # a relative database path is relative to the working directory, as MLflow reads it
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a Tune result that belong in MLflow."""
    out = {}
    for key, value in result.items():
        if key.startswith(METRIC_PREFIXES) and isinstance(value, int | float) and not isinstance(value, bool):
            if math.isfinite(value):
                out[key] = float(value)
    return out


def outcome(result: dict[str, Any] | None, error: bool = False) -> str:
    """``finished`` if the trial's last result is the engine's final report; ``failed`` if it raised or reported
    a failure (a loss went non-finite); ``early_stopped`` otherwise."""
    if error or (result or {}).get("failed"):
        return "failed"
    return "finished" if result and result.get("last_report") else "early_stopped"


def error_line(text: str) -> str:
    """The line of a traceback (or an exception's text) that says what went wrong: its last non-empty line."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:1000] if lines else "unknown error"


def trial_error(trial) -> str:
    """The error a Ray trial ended with, in one line (from the error file Ray writes beside it)."""
    path = getattr(trial, "error_file", None)
    try:
        return error_line(Path(path).read_text()) if path else "unknown error"
    except OSError:
        return "unknown error (its error file could not be read)"


def driver_tags() -> dict[str, str]:
    """The provenance tags of the process that runs the search (:func:`rayuda.provenance.provenance`: library,
    CUDA and cuDNN versions, rayuda's version, ``mlflow.source.git.commit`` and the dirty flag)."""
    from rayuda.provenance import mlflow_tags, provenance

    return mlflow_tags(provenance())


# -- from the search to use: the experiment's kind, the data a search ran on, the winner's model ------------------
#: MLflow 3's experiment-kind tag: the UI opens a ``custom_model_development`` experiment on its runs table
#: (without the tag it may guess GenAI and open on empty trace panels). The UI's own guesses (``*_inferred``,
#: ``no_inferred_type``) are replaced; a kind a user chose is kept.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
_GUESSED_KINDS = ("", "no_inferred_type", "genai_development_inferred", "custom_model_development_inferred")


class MlflowTracker(tune.Callback):
    """Tune callback that mirrors a search into MLflow (parent run + one child per trial).

    It holds only plain data so that Ray can pickle it with the experiment and restore it on resume.
    """

    def __init__(self, uri: str, experiment: str, search_id: str, run_name: str,
                 base_configs: dict[str, dict[str, Any]], search_params: dict[str, Any], work_root: str):
        """``base_configs``: each method's resolved config before the knobs (one entry unless ``auto``)."""
        self.work_root = work_root
        self.uri, self.experiment, self.search_id, self.run_name = uri, experiment, search_id, run_name
        self.base_configs, self.search_params = base_configs, search_params
        self._client = None
        self._experiment_id: str | None = None
        self._parent: str | None = None
        self._runs: dict[str, str] = {}
        self._tagged_nodes: set[str] = set()
        self._inputs: list | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_client=None, _runs={}, _parent=None, _experiment_id=None, _tagged_nodes=set(), _inputs=None)
        return state

    # -- plumbing ---------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            record = Path(self.work_root) / "search.json"  # on --resume, the URI given then (Ray pickled ours)
            if record.is_file():
                self.uri = json.loads(record.read_text()).get("mlflow_uri", self.uri)
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
                                        tags={"rayuda.search": self.search_id, "rayuda.role": "search",
                                              **driver_tags()})
                self._parent = run.info.run_id
                first = next(iter(self.base_configs.values()))  # which images: source and target as inputs
                self._inputs = log_dataset_inputs(client, self._parent, first["source"], first["target"],
                                                  first["protocol"])
                base = first if len(self.base_configs) == 1 else {}
                params = {**self.search_params, **{f"base.{k}": v for k, v in flatten(base).items()}}
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
                        "rayuda.selection_metric": self._config_of(trial)["train"]["metric"],
                        **driver_tags()}  # the trial's own summary (its worker's versions) replaces them
                run_id = self.client.create_run(self._experiment_id, run_name=str(trial), tags=tags).info.run_id
                config = self._config_of(trial)
                params = {**flatten(config), **(trial.config or {})}
                self._log_params(run_id, params)
                if self._inputs is None:
                    self._inputs = [dataset_input(config["source"], "source", config["protocol"]),
                                    dataset_input(config["target"], "target", config["protocol"])]
                self.client.log_inputs(run_id, datasets=self._inputs)
            self._runs[trial.trial_id] = run_id
        return run_id

    def _config_of(self, trial) -> dict[str, Any]:
        """The base config of the trial's method."""
        method = (trial.config or {}).get("method")
        return self.base_configs.get(method) or next(iter(self.base_configs.values()))

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
        self._finish(trial, outcome(trial.last_result), (trial.last_result or {}).get("failed"))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "failed", trial_error(trial))

    def _finish(self, trial, result: str, error: str | None = None) -> None:
        run_id = self.child_run_id(trial)
        self.client.set_tag(run_id, "rayuda.outcome", result)
        if error:
            self.client.set_tag(run_id, "rayuda.error", error[:5000])
        trial_dir = Path(self.work_root) / "trials" / trial.trial_id
        from rayuda.provenance import mlflow_tags

        summary = read_summary(trial_dir / "summary.json")
        for key, value in mlflow_tags(summary_environment(summary)).items():
            self.client.set_tag(run_id, key, value)
        dropped = summary_dropped(summary)
        if dropped:  # data.bad_pairs=skip: the list is the parent run's dropped_pairs.tsv
            self.client.set_tag(run_id, "rayuda.dropped_pairs", str(len(dropped)))
        for stage, line in stage_lines(summary).items():
            self.client.set_tag(run_id, f"rayuda.stage.{stage}", line.split()[0])
            self.client.log_metric(run_id, f"stage_seconds/{stage}", float(line.split()[1]))
        for key, value, step in pseudo_metrics(summary):  # reported, never selected on
            self.client.log_metric(run_id, key, value, step=step)
        for path in threshold_tables(summary, trial_dir / "thresholds"):
            self.client.log_artifact(run_id, str(path), "thresholds")
        best = trial_dir / "best_model.pt"
        if best.is_file():
            self.client.log_artifact(run_id, str(best), "checkpoint")
        self.client.set_terminated(run_id, OUTCOME_STATUS[result])

    def on_experiment_end(self, trials, **info):
        # a trial Ray never finished (e.g. the search was interrupted) must not stay RUNNING
        for trial in trials:
            run_id = self._runs.get(trial.trial_id)
            if run_id is not None and self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, "KILLED")


def finish_search(uri: str, experiment: str, search_id: str, *, best_config: Path | None, artifacts: list[Path],
                  metrics: dict[str, float], tags: dict[str, str] | None = None, status: str = "FINISHED",
                  winner_dir: Path | None = None, register: bool = True, champion: bool = False,
                  description: str | None = None) -> str | None:
    """Attach the search's results (best config, trials table, plots, confirmation) to its parent run; log the
    winner's model from ``winner_dir`` (and register it, see :func:`log_winner_model`; ``champion``: the
    confirmed winner, given the alias :data:`CHAMPION`; ``description``: the version's); close the run."""
    client = client_for(uri)
    exp_id = ensure_experiment(client, experiment, uri)
    found = client.search_runs([exp_id], f"tags.`rayuda.search` = '{search_id}'")
    if not found:
        return None
    run_id = found[0].info.run_id
    for path in [best_config, *artifacts]:
        if path is not None and Path(path).is_file():
            client.log_artifact(run_id, str(path))
    for key, value in metrics.items():
        if isinstance(value, int | float) and math.isfinite(value):
            client.log_metric(run_id, key, float(value))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    if winner_dir is not None:
        model_uri = log_winner_model(uri, run_id, winner_dir, register=register,
                                     alias=CHAMPION if register and champion else None, description=description)
        client.set_tag(run_id, "rayuda.model_uri", model_uri)
        if register and champion:
            name = model_uri.split("/")[1]
            print(f"winner's model → {model_uri}, alias {CHAMPION} (python -m rayuda.predict "
                  f"models:/{name}@{CHAMPION} --images DIR)", flush=True)
        else:
            print(f"winner's model → {model_uri} (python -m rayuda.predict {model_uri} --images DIR)", flush=True)
    client.set_terminated(run_id, status)
    return run_id
