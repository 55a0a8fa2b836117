"""From a search to use: the data a search ran on as MLflow dataset inputs, and the winner's G as a logged (and
registered) MLflow model under the alias :data:`CHAMPION`, which ``python -m rayuda.predict`` loads."""

from __future__ import annotations

import json
from pathlib import Path

from rayuda.config import flatten
from rayuda.runs import client_for

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
