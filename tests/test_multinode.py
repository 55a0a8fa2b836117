"""A search on a real two-node Ray cluster, tracked on a real MLflow server.

Both nodes run on this machine (``ray start --head`` plus ``ray start --address``), each with one
CPU; two concurrent one-CPU trials must therefore run on different nodes, and each trial's MLflow
child run must say which (tag ``rayuda.node_id``). The tracking server is ``mlflow server`` over
HTTP, as a team would run it, so the driver logs params, metrics and artifacts through its REST API.

The cluster gets its own ``--temp-dir`` and ports, and is torn down by killing only the processes it
started (not ``ray stop``, which would kill every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from searches import TINY

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(not (BIN / "ray").exists() or not (BIN / "mlflow").exists(),
                                reason="needs the ray and mlflow command-line tools beside the interpreter")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return env


def tail(text: str | bytes | None, n: int = 4000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


# -- killing exactly what we started ----------------------------------------------------------------
def _processes() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (ppid, pgid, state, cmdline) of every process, read from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0], cmd)
    return out


def kill_tree(pgids: set[int], marker: str | None = None, signals=(signal.SIGTERM, signal.SIGKILL),
              grace: float = 5.0) -> None:
    """Send ``signals`` in turn (waiting up to ``grace`` s for them to exit) to every live process in
    ``pgids``, whose cmdline holds ``marker``, or descending from one of those (Ray's workers make
    their own process groups)."""

    def ours() -> set[int]:
        procs = _processes()
        found = {pid for pid, (_, pgid, state, cmd) in procs.items()
                 if state != "Z" and (pgid in pgids or (marker and marker in cmd))}
        grew = True
        while grew:
            more = {pid for pid, (ppid, _, state, _) in procs.items()
                    if state != "Z" and ppid in found and pid not in found}
            found |= more
            grew = bool(more)
        found.discard(os.getpid())
        return found

    for sig in signals:
        pids = ours()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + grace
        while pids and time.time() < deadline:
            time.sleep(0.2)
            pids = ours()
        if not pids:
            return


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Starts ``mlflow server`` (SQLite store, proxied artifacts) and yields ``ready()``, which waits
    for its health check and returns its URL; so the server boots while the Ray cluster starts."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w+b")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, env=child_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready(timeout: float = 180) -> str:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return url
            except OSError:
                pass
            log.seek(0)
            assert proc.poll() is None, f"mlflow server exited with {proc.returncode}:\n{tail(log.read())}"
            assert time.time() < deadline, f"mlflow server not healthy after {timeout} s:\n{tail(log.read())}"
            time.sleep(0.5)

    try:
        yield ready
    finally:
        kill_tree({proc.pid}, grace=2.0)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Head and worker node, one CPU each; yields (address, [node ids of both nodes]).

    Each node gets its own ``RAYUDA_CACHE`` (as separate machines would have), so its trials cannot
    lean on data the driver generated; only the search's storage is shared.
    """
    temp_dir = tempfile.mkdtemp(prefix="rmn-")  # short: Ray's unix socket paths live under it
    port = free_port()
    address = f"127.0.0.1:{port}"
    caches = tmp_path_factory.mktemp("node-caches")
    env = child_env()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=200000000",
              "--disable-usage-stats"]
    head = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false",
            f"--temp-dir={temp_dir}", f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", *common]
    worker = [str(BIN / "ray"), "start", f"--address={address}",
              f"--dashboard-agent-listen-port={free_port()}", *common]
    pgids: set[int] = set()
    try:
        for cmd, node in ((head, "head"), (worker, "worker")):
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env={**env, "RAYUDA_CACHE": str(caches / node)}, start_new_session=True)
            pgids.add(proc.pid)  # the daemons it leaves behind stay in its process group
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{tail(out)}"
        # both nodes registered and alive, as seen by a driver of the cluster
        probe = ("import json, sys, time, ray\n"
                 "ray.init(address=sys.argv[1], include_dashboard=False, configure_logging=False,"
                 " log_to_driver=False)\n"
                 "deadline = time.time() + 120\n"
                 "while True:\n"
                 "    alive = [n for n in ray.nodes() if n['Alive']]\n"
                 "    if len(alive) >= 2 or time.time() > deadline: break\n"
                 "    time.sleep(0.5)\n"
                 "print('NODES ' + json.dumps([n['NodeID'] for n in alive]))\n")
        proc = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True,
                              env=env, timeout=240)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("NODES ")]
        assert proc.returncode == 0 and lines, f"cluster probe failed:\n{tail(proc.stdout)}{tail(proc.stderr)}"
        nodes = json.loads(lines[-1][len("NODES "):])
        assert len(set(nodes)) == 2, f"expected two live nodes, got {nodes}"
        yield address, sorted(nodes)
    finally:
        kill_tree(pgids, marker=temp_dir, signals=(signal.SIGKILL,))  # as `ray stop --force` does
        shutil.rmtree(temp_dir, ignore_errors=True)


# -- the test ---------------------------------------------------------------------------------------
def test_concurrent_trials_run_on_both_nodes_and_are_tracked_on_the_mlflow_server(
        mlflow_server, ray_cluster, tmp_path):
    address, nodes = ray_cluster
    mlflow_url = mlflow_server()
    cmd = [sys.executable, "-m", "rayuda.tune", "advent", "--address", address, "--mlflow-uri", mlflow_url,
           "--num-samples", "2", "--max-iters", "2", "--grace", "2", "--max-concurrent", "2",
           "--cpus-per-trial", "1", "--storage", str(tmp_path / "store"), "--name", "s",
           "--best", str(tmp_path / "best.yaml"), *TINY]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=child_env())
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"search still running after 600 s:\n{tail(err.stdout)}\n{tail(err.stderr, 6000)}")
    output = f"--- stdout ---\n{tail(proc.stdout)}\n--- stderr ---\n{tail(proc.stderr, 6000)}"
    assert proc.returncode == 0, output

    client = MlflowClient(mlflow_url)
    exp = client.get_experiment_by_name("rayuda-advent")
    assert exp is not None, output
    all_runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in all_runs if r.data.tags.get("rayuda.role") == "search"]
    children = [r for r in all_runs if r.data.tags.get("rayuda.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", output
    assert len(children) == 2, output
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children), [c.info.status for c in children]
    assert all("miou" in c.data.metrics for c in children)

    ran_on = sorted(c.data.tags.get("rayuda.node_id", "") for c in children)
    assert ran_on == nodes, f"trials ran on {ran_on}, cluster nodes are {nodes}\n{output}"

    # artifacts went through the server's proxy, not to a local path
    assert parents[0].info.artifact_uri.startswith("mlflow-artifacts:"), parents[0].info.artifact_uri
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"best.yaml", "trials.csv"} <= artifacts, artifacts
    assert (tmp_path / "best.yaml").is_file()
