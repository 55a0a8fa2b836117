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


def summary_environment(summary_path: Path) -> dict[str, Any]:
    """The machine and code facts a trial's ``summary.json`` recorded (``environment``: versions, git commit,
    CPU/GPU, threads, deterministic)."""
    if not Path(summary_path).is_file():
        return {}

    return json.loads(Path(summary_path).read_text()).get("environment", {})


def summary_dropped(summary_path: Path) -> list[dict[str, str]]:
    """The bad pairs (image, label, reason) a run's ``summary.json`` says ``data.bad_pairs=skip`` left out."""
    if not Path(summary_path).is_file():
        return []
    return (json.loads(Path(summary_path).read_text()).get("bad_pairs") or {}).get("dropped", [])


def threshold_tables(summary_path: Path, out_dir: Path) -> list[Path]:
    """For every pseudo-label stage of a run that decided per-class thresholds (``per_class`` in its facts), a
    CSV table and a bar chart of them in ``out_dir`` (``thresholds-<stage>.csv`` / ``.png``); returns the files.

    Where the pass measured its pseudo-labels against the target's true labels (``truth_per_class``), each
    row also has their ``precision`` and ``recall``, and classes with true pixels the labeller did not list
    get a row of their own (class order)."""
    import csv

    if not Path(summary_path).is_file():
        return []
    files = []
    for stage in json.loads(Path(summary_path).read_text())["stages"]:
        per_class = stage.get("per_class")
        if not per_class:
            continue
        truth = stage.get("truth_per_class") or {}
        if truth:
            per_class = {name: {**per_class.get(name, {}), **scores} for name, scores in truth.items()
                         if name in per_class or scores["recall"] is not None}
        out_dir.mkdir(parents=True, exist_ok=True)
        columns = sorted({k for row in per_class.values() for k in row})
        table = out_dir / f"thresholds-{stage['stage']}.csv"
        with open(table, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", *columns])
            writer.writerows([name, *(row.get(c, "") for c in columns)] for name, row in per_class.items())
        files += [table, _threshold_chart(stage["stage"], per_class, out_dir / f"thresholds-{stage['stage']}.png")]
    return files


def _threshold_chart(stage: str, per_class: dict[str, dict[str, Any]], path: Path) -> Path:
    """Bars of each class's threshold (and kept share, pseudo-label precision and recall, where recorded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_class)
    series = [k for k in ("threshold", "scaled_threshold", "kept_share", "precision", "recall")
              if any(isinstance(per_class[n].get(k), int | float) for n in names)]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 4))
    width = 0.8 / max(len(series), 1)
    for i, key in enumerate(series):
        values = [per_class[n].get(key) if isinstance(per_class[n].get(key), int | float) else 0 for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=key)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=45, ha="right")
    ax.set_title(f"per-class thresholds of stage {stage}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pseudo_metrics(summary_path: Path) -> list[tuple[str, float, int]]:
    """``(metric, value, step)`` of the pseudo-label quality a run's passes measured against the target's true
    labels (stage facts ``pseudo/precision``, ``pseudo/recall``, ``pseudo/rare_precision``,
    ``pseudo/rare_recall``, see :func:`rayuda.engine.passes.truth_facts`); ``step`` is the stage's place in
    the plan, so a plan with several passes keeps one history per metric. Empty when none was measured."""
    if not Path(summary_path).is_file():
        return []
    stages = json.loads(Path(summary_path).read_text())["stages"]
    return [(key, float(value), step) for step, stage in enumerate(stages) for key, value in stage.items()
            if key.startswith("pseudo/") and isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value)]


def stage_lines(summary_path: Path) -> dict[str, str]:
    """``{stage: "hit 0.0 s"}`` from a trial's ``summary.json`` (empty if the trial wrote none)."""
    if not Path(summary_path).is_file():
        return {}

    stages = json.loads(Path(summary_path).read_text())["stages"]
    return {s["stage"]: f"{s['cache']} {s['seconds']:.1f} s" for s in stages}


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

        for key, value in mlflow_tags(summary_environment(trial_dir / "summary.json")).items():
            self.client.set_tag(run_id, key, value)
        dropped = summary_dropped(trial_dir / "summary.json")
        if dropped:  # data.bad_pairs=skip: the list is the parent run's dropped_pairs.tsv
            self.client.set_tag(run_id, "rayuda.dropped_pairs", str(len(dropped)))
        for stage, line in stage_lines(trial_dir / "summary.json").items():
            self.client.set_tag(run_id, f"rayuda.stage.{stage}", line.split()[0])
            self.client.log_metric(run_id, f"stage_seconds/{stage}", float(line.split()[1]))
        for key, value, step in pseudo_metrics(trial_dir / "summary.json"):  # reported, never selected on
            self.client.log_metric(run_id, key, value, step=step)
        for path in threshold_tables(trial_dir / "summary.json", trial_dir / "thresholds"):
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


# -- from the search to use: the experiment's kind, the data a search ran on, the winner's model ------------------
#: MLflow 3's experiment-kind tag: the UI opens a ``custom_model_development`` experiment on its runs table
#: (without the tag it may guess GenAI and open on empty trace panels). The UI's own guesses (``*_inferred``,
#: ``no_inferred_type``) are replaced; a kind a user chose is kept.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
_GUESSED_KINDS = ("", "no_inferred_type", "genai_development_inferred", "custom_model_development_inferred")
#: (H, W) of the input example logged with a model (G is exported for any H, W).
EXAMPLE_SIZE = (32, 64)
#: The registered-model alias of the latest confirmed winner: ``models:/rayuda-METHOD@champion``.
CHAMPION = "champion"


def dataset_input(spec: str, role: str, protocol: int):
    """``spec`` as an MLflow :class:`~mlflow.entities.DatasetInput` (context tag ``role``: source / target).

    Name: the spec; source: ``{"uri": spec}``; profile: image and labelled-image counts and the full digest;
    digest: SHA-256 (first 12 hex digits) of the sorted list of the dataset's image and label files as
    ``relative path<TAB>size in bytes`` lines, so renamed, added, removed or resized files change it.
    """
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from rayuda.data import open_dataset

    dataset = open_dataset(spec, "train", role=role, protocol=protocol)
    root = Path(dataset.root)
    lines = sorted(f"{path.relative_to(root)}\t{path.stat().st_size}"
                   for pair in dataset.files for path in pair if path is not None)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    labelled = sum(label is not None for _, label in dataset.files)
    profile = {"num_images": len(dataset.files), "num_labelled": labelled, "protocol": protocol, "sha256": digest}
    entity = Dataset(name=spec, digest=digest[:12], source_type="local", source=json.dumps({"uri": spec}),
                     profile=json.dumps(profile))
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", role)])


def log_dataset_inputs(client, run_id: str, source_spec: str, target_spec: str, protocol: int) -> list:
    """Log the source and target datasets as dataset inputs of run ``run_id`` (see :func:`dataset_input`);
    returns the logged inputs, to log on more runs with ``client.log_inputs(run_id, datasets=...)``."""
    inputs = [dataset_input(source_spec, "source", protocol), dataset_input(target_spec, "target", protocol)]
    client.log_inputs(run_id, datasets=inputs)
    return inputs


def log_winner_model(uri: str, run_id: str, run_dir: str | Path, register: bool = True, *,
                     weights: str = "best", alias: str | None = None, description: str | None = None) -> str:
    """Log G of the run or trial folder ``run_dir`` (its ``best_model.pt``; ``weights="final"``: ``model.pt``) as
    the MLflow PyTorch model ``model`` of run ``run_id``, and with ``register`` as a new version of the registered
    model ``rayuda-<method>`` (with ``description``; ``alias``, e.g. :data:`CHAMPION`, moved to it). Returns its
    URI: ``models:/rayuda-<method>/<version>``, else ``models:/<model id>``.

    Format (choice): MLflow's ``pt2`` export (``torch.export``) of G mapping an ImageNet-normalised N×3×H×W float32
    batch (any N, H, W) to N×C×H×W logits: MLflow checks it is pickle-free before loading, so
    ``mlflow.pytorch.load_model`` runs no unpickled code. Beside it, in ``extra_files/``, the resolved
    ``config.yaml`` and G's plain ``state_dict.pt``: ``rayuda.predict`` rebuilds G from them with
    ``torch.load(weights_only=True)``, on any device. The pickle format is never used (loading it unpickles
    arbitrary objects).
    """
    import shutil
    import tempfile

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from rayuda.config import save_config
    from rayuda.runs import MODEL_CONFIG, MODEL_STATE, LogitsModule, load_run, mlflow_uri

    run = load_run(run_dir, weights)
    method, names = run.config["method"], run.class_names
    example = np.random.default_rng(0).standard_normal((2, 3, *EXAMPLE_SIZE)).astype(np.float32)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(names), -1, -1))]))
    metadata = {"rayuda": {"method": method, "protocol": run.config["protocol"], "classes": names,
                           "data_size": list(run.size) if run.size else None,
                           "preprocessing": run.preprocessing,
                           "input": "N×3×H×W float32; preprocessing imagenet: RGB scaled to [0, 1], ImageNet "
                                    "mean/std normalised; caffe: BGR in 0–255 minus (104.008, 116.669, 122.675); "
                                    "resize to data_size first when set, as in training"}}
    experiment_id = client_for(uri).get_run(run_id).info.experiment_id
    with tempfile.TemporaryDirectory(prefix="rayuda-model-") as tmp, mlflow_uri(uri):
        save_config(run.config, Path(tmp) / MODEL_CONFIG)
        shutil.copyfile(run.weights, Path(tmp) / MODEL_STATE)
        logged = client_for(uri).create_logged_model(  # in the run's experiment, not the active one
            experiment_id, name="model", source_run_id=run_id,
            tags={"rayuda.method": method, "rayuda.run_dir": str(run_dir), "rayuda.weights": Path(run.weights).name},
            params={k: str(v)[:6000] for k, v in flatten(run.config).items()})
        info = mlflow.pytorch.log_model(
            LogitsModule(run.model).eval(), name="model", model_id=logged.model_id, run_id=run_id,
            serialization_format="pt2", signature=signature, input_example=example, metadata=metadata,
            extra_files=[str(Path(tmp) / MODEL_CONFIG), str(Path(tmp) / MODEL_STATE)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
            registered_model_name=f"rayuda-{method}" if register else None)
    if register:
        name, version = f"rayuda-{method}", str(info.registered_model_version)
        client = client_for(uri)
        if description:
            client.update_model_version(name, version, description=description)
        if alias:
            client.set_registered_model_alias(name, alias, version)
        return f"models:/{name}/{version}"
    return info.model_uri
