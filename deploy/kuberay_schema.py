"""Regenerate ``tests/data/kuberay-rayjob-v1.schema.json``: the ``ray.io/v1`` RayJob schema of a KubeRay release's CRD,
which ``tests/test_deploy.py`` checks ``deploy/rayjob.yaml`` against (offline: no cluster, no kubectl).

    python deploy/kuberay_schema.py ray.io_rayjobs.yaml v1.7.0 > tests/data/kuberay-rayjob-v1.schema.json

``ray.io_rayjobs.yaml`` is ``ray-operator/config/crd/bases/ray.io_rayjobs.yaml`` of github.com/ray-project/kuberay
(Apache-2.0) at that release. The file keeps the CRD's ``openAPIV3Schema`` without its descriptions and ``status``
(written by the operator, not by users), and subtrees
that occur more than once (the pod templates) once, under ``definitions`` (JSON-Schema ``$ref``).
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import yaml

MIN_SHARED = 2000  # characters: a repeated subtree at least this long is kept once


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _key(node) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _count(node, counts: Counter) -> None:
    if isinstance(node, dict):
        counts[_key(node)] += 1
        for value in node.values():
            _count(value, counts)
    elif isinstance(node, list):
        for value in node:
            _count(value, counts)


def _share(node, counts: Counter, definitions: dict, names: dict):
    """The schema ``node`` with every repeated long sub-schema replaced by a ``$ref`` into ``definitions`` (a
    ``properties`` mapping is no schema: only its values are)."""
    if isinstance(node, list):
        return [_share(v, counts, definitions, names) for v in node]
    if not isinstance(node, dict):
        return node
    key = _key(node)
    if counts[key] > 1 and len(key) >= MIN_SHARED:
        if key not in names:
            names[key] = f"shared{len(names)}"
            definitions[names[key]] = _children(node, counts, definitions, names)
        return {"$ref": f"#/definitions/{names[key]}"}
    return _children(node, counts, definitions, names)


def _children(node: dict, counts: Counter, definitions: dict, names: dict) -> dict:
    out = {}
    for k, v in node.items():
        if k == "properties" and isinstance(v, dict):
            out[k] = {name: _share(sub, counts, definitions, names) for name, sub in v.items()}
        else:
            out[k] = _share(v, counts, definitions, names)
    return out


def main(crd_path: str, release: str) -> None:
    crd = yaml.safe_load(open(crd_path))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strip(version["schema"]["openAPIV3Schema"])
    counts: Counter = Counter()
    _count(schema["properties"]["spec"], counts)
    definitions: dict = {}
    spec = _share(schema["properties"]["spec"], counts, definitions, {})  # a schema: its properties are shared
    out = {"$comment": f"KubeRay {release}, ray.io/v1 RayJob (ray-operator/config/crd/bases/ray.io_rayjobs.yaml), "
                       "descriptions removed, repeated subtrees under definitions; deploy/kuberay_schema.py",
           **{k: v for k, v in schema.items() if k != "properties"},
           "properties": {**{k: v for k, v in schema["properties"].items() if k != "status"}, "spec": spec},
           "definitions": definitions}
    json.dump(out, sys.stdout, separators=(",", ":"), sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
