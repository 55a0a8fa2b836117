"""deploy/rayjob.yaml: the KubeRay RayJob that runs ``python -m rayuda.tune``, checked offline against
KubeRay's own RayJob schema (the v1.7.0 CRD's openAPIV3Schema, tests/data, made by deploy/kuberay_schema.py) with
unknown fields refused as ``kubectl apply --validate=strict`` refuses them, and its entrypoint parsed by rayuda."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "rayjob.yaml"
SCHEMA = Path(__file__).parent / "data" / "kuberay-rayjob-v1.schema.json"
IMAGE_HOME = "/home/ray/rayuda"  # where the Dockerfile puts the repo
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def documents() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc}


def strict(node):
    """The schema with ``additionalProperties: false`` on every object that lists its properties (and does not
    keep unknown fields): what strict field validation does with the CRD."""
    if isinstance(node, list):
        return [strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    keeps_unknown = out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not keeps_unknown:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator():
    schema = strict(json.loads(SCHEMA.read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def ray_pods(job: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cluster["workerGroupSpecs"])]


def test_the_manifest_is_a_rayjob_that_kuberays_schema_accepts(validator):
    docs = documents()
    assert set(docs) == {"RayJob", "PersistentVolumeClaim"}
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and DNS_1123.fullmatch(job["metadata"]["name"])
    errors = sorted(validator.iter_errors(job), key=lambda e: list(e.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] == 0  # a resubmission would start the same-named search again, which rayuda refuses
    lock = (REPO / "requirements.lock").read_text()
    assert spec["rayClusterSpec"]["rayVersion"] == re.search(r"^ray==(\S+)$", lock, re.M).group(1)
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}  # Ray's token authentication


@pytest.mark.parametrize("mutate, where", [
    (lambda j: j["spec"].update(entryPoint=j["spec"].pop("entrypoint")), "entryPoint"),   # a typo: unknown field
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="two"), "replicas"),
    (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].pop("template"), "template"),   # required
    (lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(mode="password"), "mode"),  # not in the enum
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
], ids=["unknown-field", "wrong-type", "missing-head-template", "bad-auth-mode", "worker-without-name"])
def test_broken_copies_are_refused_by_the_schema(validator, mutate, where):
    job = copy.deepcopy(documents()["RayJob"])
    mutate(job)
    errors = [(list(map(str, e.path)), e.message) for e in validator.iter_errors(job)]
    assert errors and any(where in path or where in message for path, message in errors), errors


def test_every_ray_pod_runs_rayudas_image_with_the_shared_volume():
    docs = documents()
    job, claim = docs["RayJob"], docs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # one POSIX folder for every node (the stage cache)
    images = {c["image"] for pod in [*ray_pods(job), job["spec"]["submitterPodTemplate"]["spec"]]
              for c in pod["containers"]}
    assert len(images) == 1 and images.pop().endswith("/rayuda:TAG")
    for pod in ray_pods(job):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert pod["securityContext"]["fsGroup"] == 1000  # the image's user
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no trial on the head
    gpu = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpu >= 1 and cluster["workerGroupSpecs"][0]["minReplicas"] == 0


def test_the_entrypoint_is_a_search_rayuda_accepts():
    from rayuda.hpo.cli import build_parser
    from rayuda.hpo.prepare import method_config

    words = shlex.split(documents()["RayJob"]["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "rayuda.tune"]
    args = build_parser().parse_args(words[3:])
    assert args.address == "auto" and args.gpus_per_trial >= 1 and args.name
    for path in (args.storage, args.best, args.mlflow_uri.removeprefix("sqlite:///")):
        assert path.startswith("/mnt/shared/"), path  # on the shared volume, not in a pod's own disk
    assert args.config.startswith(IMAGE_HOME + "/")
    local = args.config.replace(IMAGE_HOME, str(REPO), 1)
    args.config = local
    from rayuda.config import parse_assignments

    cfg = method_config(args, args.method, parse_assignments(args.set), auto=False)  # unknown keys would raise
    assert cfg["source"].startswith("gta5:/mnt/shared/") and cfg["target"].startswith("cityscapes:/mnt/shared/")
    assert cfg["data"]["bad_pairs"] == "skip"  # the stock GTA5 has bad pairs
    assert cfg["model"]["init"].startswith("/mnt/shared/")
