"""``--storage s3://BUCKET/PATH`` against a real S3-compatible server started on 127.0.0.1 (moto's server
mode, a test dependency in requirements.lock): Ray's experiment state goes to the bucket, rayuda's files to the
shared POSIX work folder, and ``--resume`` restores the search from the bucket."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_store import fresh_store

from rayuda.config import ConfigError
from rayuda.hpo.searcher import JOURNAL, load_search_study
from rayuda.storage import MARKER, check_marker, check_shared, is_uri, join, write_markers

BUCKET = "rayuda-test"
TINY = ["--set", "data.size=[32,64]", "--set", "data.batch_size=2", "--set", "data.holdout=4",
        "--set", "stages.source_only.iters=2", "--set", "train.log_every=2", "--set", "train.num_masks=1",
        "--set", "train.probe_images=2"]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with an empty bucket; the environment that points AWS clients at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    yield client, env
    server.stop()


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def tune(tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rayuda.tune", "advent", "--storage", f"s3://{BUCKET}/searches",
           "--work-dir", str(tmp_path / "work"), "--name", "s", "--mlflow-uri", fresh_store(tmp_path / "mlflow.db"),
           "--best", str(tmp_path / "best.yaml"), *TINY, "--num-samples", "2", "--max-iters", "2", "--grace", "2",
           "--max-concurrent", "1", "--no-confirm", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, **env})


def test_uris_and_paths_are_told_apart():
    assert is_uri("s3://b/p") and is_uri("gs://b/p") and not is_uri("/mnt/shared/x") and not is_uri("file:///x")
    assert not is_uri("rayuda_results") and not is_uri("C:/x")
    assert join("s3://b/p/", "s") == "s3://b/p/s"
    assert join("s3://b/p?endpoint_override=http://h:1", "s") == "s3://b/p/s?endpoint_override=http://h:1"


def test_a_trial_on_a_node_without_the_shared_folder_is_refused_by_name(tmp_path):
    shared, other = tmp_path / "shared", tmp_path / "elsewhere"
    write_markers([shared], "s")
    assert (shared / MARKER).read_text() == "s\n"
    check_marker([shared], "node 10.0.0.2")  # the driver's folder: fine
    other.mkdir()
    with pytest.raises(ConfigError, match=rf"{other} is not shared with this node \(node 10.0.0.2\)"):
        check_marker([other], "node 10.0.0.2")


def test_both_nodes_of_a_two_node_cluster_see_the_work_folder(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, configure_logging=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        check_shared([tmp_path / "work", tmp_path / "cache"])  # a task pinned to each node finds the probe
        assert not list((tmp_path / "work").iterdir()) and not list((tmp_path / "cache").iterdir())  # cleaned up
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_missing_bucket_is_refused_before_ray_starts(s3, tmp_path):
    _, env = s3
    proc = subprocess.run([sys.executable, "-m", "rayuda.tune", "advent", "--storage", "s3://no-such-bucket/x",
                           "--work-dir", str(tmp_path / "work"), *TINY], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, **env})
    assert proc.returncode == 2 and "error: --storage s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist" \
        in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "work").exists()


def test_a_search_keeps_rays_state_in_the_bucket_and_resumes_from_it(s3, tmp_path):
    client, env = s3
    proc = tune(tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"storage s3://{BUCKET}/searches/s, work folder {tmp_path / 'work' / 's'}" in proc.stdout
    stored = keys(client, "searches/s/")
    assert "searches/s/tuner.pkl" in stored and any(k.rsplit("/", 1)[-1].startswith("experiment_state") for k in stored)
    assert sum(k.endswith("/result.json") for k in stored) == 2  # each trial's results
    assert any("/checkpoint_" in k for k in stored)  # the reports' checkpoints
    work = tmp_path / "work" / "s"
    assert (work / "best.yaml").is_file() and (work / "trials.csv").is_file()
    assert len(list(work.glob("work/trials/*/summary.json"))) == 2 and (work / "stage-cache").is_dir()
    assert not any(k.startswith("searches/s/work/") for k in stored)  # rayuda's own files stay on the POSIX folder

    resumed = tune(tmp_path, env, "--resume")  # everything restored from the bucket; every trial already finished
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert f"resuming search s from s3://{BUCKET}/searches/s" in resumed.stdout
    assert "unpickles the search's state from s3://" in resumed.stderr
    client_ml = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client_ml.search_runs([client_ml.get_experiment_by_name("rayuda-advent").experiment_id])
    trials = [r for r in runs if r.data.tags.get("rayuda.role") == "trial"]
    assert len(trials) == 2 and len({r.data.tags["rayuda.trial_id"] for r in trials}) == 2  # none duplicated
    study = load_search_study(work / "work" / JOURNAL, work.name)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"]
