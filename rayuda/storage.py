"""Where a search keeps what: Ray's experiment state on a path or in an object store, rayuda's own files on a POSIX
folder every node shares.

``--storage`` takes a local or shared path, or an object-store URI (``s3://BUCKET/PATH``, ``gs://…``: Ray's
pyarrow file systems; credentials and endpoint from the usual environment, e.g. ``AWS_ACCESS_KEY_ID`` and
``AWS_ENDPOINT_URL_S3`` for an S3-compatible server). Ray keeps there what it restores on ``--resume`` (the tuner,
the searcher and scheduler state, each trial's results and checkpoints). rayuda's own files — the trials' run
folders, which workers write and the driver reads, the stage cache, ``best.yaml``, the trials table — stay on a
POSIX folder (``--work-dir``; the storage path itself when it is one): it must be the same folder on every node,
which :func:`check_shared` checks on the nodes of the running cluster and :func:`check_marker` inside every trial.
"""

from __future__ import annotations

import os
import urllib.parse
import uuid
from pathlib import Path

from rayuda.config import ConfigError

#: Written by the search driver into its work folder and stage cache; a trial that cannot see it runs on a node
#: that does not share them.
MARKER = ".rayuda-shared"


def is_uri(storage: str) -> bool:
    """Whether ``--storage`` names an object store (``s3://``, ``gs://``, …) rather than a path (``file://`` is a
    path)."""
    scheme = urllib.parse.urlparse(str(storage)).scheme
    return len(scheme) > 1 and scheme != "file"


def join(uri: str, name: str) -> str:
    """``uri/name`` (a URI keeps its query, e.g. ``?endpoint_override=…``)."""
    parsed = urllib.parse.urlparse(uri)
    return urllib.parse.urlunparse(parsed._replace(path=parsed.path.rstrip("/") + "/" + name))


def check_storage_uri(uri: str) -> None:
    """Refuse, before Ray starts, an object-store URI pyarrow cannot open or whose bucket does not answer."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path.split("/", 1)[0])  # the bucket
    except Exception as err:  # noqa: BLE001 — pyarrow raises OSError/ArrowInvalid/ValueError for bad URIs
        raise ConfigError(f"--storage {uri}: cannot open it ({' '.join(str(err).split())[:300]})") from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise ConfigError(f"--storage {uri}: bucket {path.split('/', 1)[0]!r} does not exist (create it first)")


def write_markers(folders: list[Path], search: str) -> None:
    """Mark each folder as this search's shared folder (:data:`MARKER`), creating it."""
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text(f"{search}\n")


def check_marker(folders: list[str | Path], where: str) -> None:
    """Inside a trial: refuse to run on a node that does not see the driver's folders (one ``stat`` each)."""
    for folder in folders:
        if not (Path(folder) / MARKER).is_file():
            raise ConfigError(f"{folder} is not shared with this node ({where}): the search driver's work folder and "
                              f"stage cache must be one POSIX folder on every node (EFS, NFS); see --work-dir and "
                              f"--cache-dir")


def check_shared(folders: list[Path]) -> None:
    """Refuse folders that not every alive node of the connected Ray cluster sees: a fresh marker is written on the
    driver and looked for by a zero-CPU task pinned to each node. Nodes that join later are checked by every trial
    (:func:`check_marker`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return  # one node: what the driver wrote, the node sees
    probe = f".rayuda-probe-{uuid.uuid4().hex}"
    paths = [str(folder / probe) for folder in folders]
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("")

    @ray.remote(num_cpus=0)
    def sees(paths: list[str]) -> list[bool]:
        return [os.path.exists(p) for p in paths]

    try:
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(paths) for n in nodes], timeout=120)
    finally:
        for path in paths:
            Path(path).unlink(missing_ok=True)
    missing = [(n["NodeManagerAddress"], str(folder)) for n, row in zip(nodes, seen, strict=True)
               for folder, ok in zip(folders, row, strict=True) if not ok]
    if missing:
        shown = ", ".join(f"{folder} on node {ip}" for ip, folder in missing[:4])
        raise ConfigError(f"not shared across the cluster's nodes: {shown}; the work folder (--work-dir) and the "
                          f"stage cache (--cache-dir) must be one POSIX folder on every node (EFS, NFS), whatever "
                          f"--storage is")
