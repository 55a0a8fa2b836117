"""Faults survived with nothing lost, bad input refused before compute: each row of bench/faults.py that fits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from rayuda.config import ConfigError
from rayuda.data import DatasetError, open_dataset
from rayuda.data.verify import verify_dataset
from rayuda.engine import run_pipeline
from rayuda.engine.loop import NonFiniteLoss, _truncate
from rayuda.hpo.searcher import JOURNAL, load_search_study
from rayuda.methods import resolve_config
from tests.test_engine import Interrupt, stop_at, unfinished

TINY = {"data.size": [32, 64], "data.batch_size": 2, "data.holdout": 4, "train.eval_every": 2,
        "train.log_every": 1, "stages.source_only.iters": 2, "stages.minent.iters": 2}
TINY_ARGS = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rayuda.train", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# -- bad input: one `error:` line, exit 2, nothing created ----------------------------------------------------------
@pytest.mark.parametrize(("extra", "names"), [
    (["--set", "model.backbone=foo"], "model.backbone"),
    (["--set", "model.init=BAD"], "bad.pt"),
    (["--iters", "0"], "--iters"),
    (["--set", "train.eval_every=0"], "train.eval_every"),
    (["--set", "params.rank.lambda=2.0"], "lambda"),
])
def test_bad_input_is_one_error_line_and_nothing_on_disk(tmp_path, extra, names):
    (tmp_path / "bad.pt").write_bytes(b"not a tensor file")
    extra = [e.replace("BAD", str(tmp_path / "bad.pt")) for e in extra]
    method = "intrada" if "lambda" in names else "minent"
    proc = train(method, "--out", str(tmp_path / "run"), *TINY_ARGS, *extra, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and names in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_corrupt_image_is_named_before_compute_and_verified_files_are_remembered(tmp_path):
    from rayuda.data.minicity import ensure_minicity

    root = tmp_path / "mycity"
    shutil.copytree(ensure_minicity() / "target" / "leftImg8bit" / "train", root / "images", dirs_exist_ok=True)
    images = sorted((root / "images").rglob("*.png"))
    for path in images:  # flat folder layout
        path.rename(root / "images" / path.name)
    images = sorted((root / "images").glob("*.png"))
    cache = tmp_path / "verified.json"
    dataset = open_dataset(f"folder:{root}", "train", role="target")
    assert verify_dataset(dataset, "target", cache=cache) == len(images)
    assert verify_dataset(dataset, "target", cache=cache) == 0  # a second look pays nothing

    data = images[-1].read_bytes()
    images[-1].write_bytes(data[: len(data) // 2])  # truncated: the kind of file a batch would draw late
    with pytest.raises(DatasetError, match=images[-1].name):
        verify_dataset(dataset, "target", cache=cache)
    images[-1].write_bytes(data)  # repaired (a new mtime): decoded again, the others are still remembered
    assert verify_dataset(dataset, "target", cache=cache) == 1


def test_train_refuses_a_corrupt_target_image_before_any_compute(tmp_path):
    from rayuda.data.minicity import ensure_minicity

    root = tmp_path / "mycity"
    (root / "images").mkdir(parents=True)
    for path in sorted((ensure_minicity() / "target" / "leftImg8bit" / "train").rglob("*.png"))[:6]:
        shutil.copy(path, root / "images" / path.name)
    broken = sorted((root / "images").glob("*.png"))[-1]
    broken.write_bytes(broken.read_bytes()[:200])
    proc = train("minent", "--target", f"folder:{root}", "--set", "train.metric=entropy", "--out",
                 str(tmp_path / "run"), *TINY_ARGS, cwd=tmp_path)
    assert proc.returncode == 2 and broken.name in error_lines(proc)[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists() and "iter 1/" not in proc.stdout


# -- a run folder belongs to one config ---------------------------------------------------------------------------
def test_an_out_folder_of_another_config_is_refused_untouched_and_force_new_moves_it_aside(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    first = train("minent", "--out", str(out), "--cache-dir", str(cache), *TINY_ARGS, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    other = train("minent", "--out", str(out), "--cache-dir", str(cache), *TINY_ARGS,
                  "--set", "params.w_ent=0.5", cwd=tmp_path)
    assert other.returncode == 2 and "params.w_ent" in error_lines(other)[0] and "--force-new" in other.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing in the folder touched

    bookkeeping = train("minent", "--out", str(out), "--cache-dir", str(cache), *TINY_ARGS,
                        "--set", "train.log_every=2", cwd=tmp_path)
    assert bookkeeping.returncode == 0 and "already holds this finished run" in bookkeeping.stdout

    forced = train("minent", "--out", str(out), "--cache-dir", str(cache), *TINY_ARGS,
                   "--set", "params.w_ent=0.5", "--force-new", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["params"]["w_ent"] == 0.5
    assert yaml.safe_load((tmp_path / "run.old-1" / "config.yaml").read_text())["params"]["w_ent"] != 0.5


# -- failures end honestly -----------------------------------------------------------------------------------------
def test_a_diverging_run_stops_at_the_bad_iteration_with_one_error_line(tmp_path):
    proc = train("minent", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"), *TINY_ARGS,
                 "--set", "stages.minent.lr=1.0e12", "--set", "stages.minent.iters=6", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = error_lines(proc)[0]
    assert "stage minent" in line and "at iteration" in line and "Traceback" not in proc.stderr
    iteration = int(line.split("at iteration ")[1].split()[0])
    log = unfinished(tmp_path / "c", "minent")
    rows = [json.loads(x) for x in (log / "log.jsonl").read_text().splitlines()]
    assert max(r["iteration"] for r in rows) <= iteration  # nothing logged past the divergence


def test_a_torn_log_line_is_dropped_with_a_warning(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"iteration": 1, "seg": 1.0}\n{"iteration": 2, "seg": 0.9}\n{"iteration": 3, "se')
    _truncate(log, 2)
    assert [json.loads(x)["iteration"] for x in log.read_text().splitlines()] == [1, 2]
    assert "torn line" in capsys.readouterr().out


def interrupted_stage(tmp_path: Path) -> tuple[dict, Path]:
    """A tiny source-only run interrupted at its first evaluation (iteration 2 of 4): its unfinished stage's folder
    holds the checkpoint written there."""
    settings = {k: v for k, v in TINY.items() if not k.startswith("stages.minent")}
    cfg = resolve_config("source_only", {**settings, "stages.source_only.iters": 4})
    with pytest.raises(Interrupt):
        run_pipeline(cfg, tmp_path / "run", report=stop_at(2), cache_dir=tmp_path / "c")
    return cfg, unfinished(tmp_path / "c", "source_only")


def test_a_bad_checkpoint_names_its_file_and_an_orphan_tmp_is_removed_on_resume(tmp_path):
    cfg, partial = interrupted_stage(tmp_path)
    good = (partial / "checkpoint.pt").read_bytes()
    (partial / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"checkpoint .*checkpoint\.pt cannot be used"):
        run_pipeline(cfg, tmp_path / "run", cache_dir=tmp_path / "c")

    (partial / "checkpoint.pt").write_bytes(good)
    orphan = partial / ".checkpoint.pt.abc123.tmp"  # what a SIGKILL during atomic_save leaves
    orphan.write_bytes(b"x" * 1000)
    summary = run_pipeline(cfg, tmp_path / "run", cache_dir=tmp_path / "c")
    assert not orphan.exists() and summary["iterations"] == 4


def test_a_stage_killed_before_its_first_checkpoint_restarts_with_clean_logs(tmp_path):
    cfg, partial = interrupted_stage(tmp_path)
    (partial / "checkpoint.pt").unlink()  # as if killed after logging iterations 1-2, before the checkpoint
    with open(partial / "log.jsonl", "a") as handle:
        handle.write('{"iteration": 3, "se')  # and mid-append
    summary = run_pipeline(cfg, tmp_path / "run", cache_dir=tmp_path / "c")
    stage = Path(summary["stages"][0]["dir"])
    logged = [json.loads(line)["iteration"] for line in (stage / "log.jsonl").read_text().splitlines()]
    evaluated = [json.loads(line)["iteration"] for line in (stage / "evals.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4] and evaluated == [2, 4]


def test_nonfinite_loss_is_raised_by_the_engine(tmp_path):
    cfg = resolve_config("minent", {**TINY, "stages.minent.lr": 1.0e12, "stages.minent.iters": 6})
    with pytest.raises(NonFiniteLoss, match="at iteration"):
        run_pipeline(cfg, tmp_path / "run", cache_dir=tmp_path / "c")
    partial = unfinished(tmp_path / "c", "minent")
    assert not (partial / "model.pt").exists()  # the stage is not marked done


# -- the search: refused before Ray starts -------------------------------------------------------------------------
def tune(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rayuda.tune", "minent", "--storage", str(tmp_path / "store"), "--name", "s",
           "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--best", str(tmp_path / "best.yaml"),
           *TINY_ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.parametrize(("extra", "names"), [
    (["--num-samples", "0"], "--num-samples"),
    (["--num-samples", "-1"], "--num-samples"),
    (["--mlflow-uri", "http://127.0.0.1:9"], "--mlflow-uri http://127.0.0.1:9"),
    (["--space", "SPACE"], "params.w_ent"),
])
def test_the_search_refuses_bad_input_before_ray_starts(tmp_path, extra, names):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"method": "minent", "knobs": {
        "params.w_ent": {"type": "categorical", "choices": ["low", "high"], "default": "low"}}}))
    proc = tune(tmp_path, *[e.replace("SPACE", str(space)) for e in extra])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(error_lines(proc)) == 1 and names in error_lines(proc)[0], proc.stderr[-2000:]
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_search_whose_every_trial_diverges_fails_honestly(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"method": "minent", "knobs": {
        "stages.minent.lr": {"type": "categorical", "choices": [1.0e12, 2.0e12], "default": 1.0e12}}}))
    proc = tune(tmp_path, "--space", str(space), "--num-samples", "2", "--max-concurrent", "1", "--grace", "2",
                "--no-confirm", "--set", "stages.minent.iters=4")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every trial failed" in proc.stderr and "at iteration" in proc.stderr
    from rayuda.runs import client_for

    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rayuda-minent")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("rayuda.role") == "search")
    children = [r for r in runs if r.data.tags.get("rayuda.role") == "trial"]
    assert parent.info.status == "FAILED" and "2 of 2 trials failed" in parent.data.tags["rayuda.error"]
    assert len(children) == 2 and all(c.info.status == "FAILED" for c in children)
    assert all("non-finite" in c.data.tags["rayuda.error"] or "became" in c.data.tags["rayuda.error"]
               for c in children)
    study = load_search_study(tmp_path / "store" / "s" / "work" / JOURNAL, "s")
    assert sorted(t.state.name for t in study.trials) == ["FAIL", "FAIL"]
    assert not (tmp_path / "best.yaml").exists()


def test_resume_refuses_state_files_anyone_can_write(tmp_path):
    from rayuda.hpo.places import check_trusted

    exp = tmp_path / "s"
    exp.mkdir()
    state = exp / "tuner.pkl"
    state.write_bytes(b"\x80\x04N.")
    state.chmod(0o644)
    check_trusted(exp)
    state.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by anyone"):
        check_trusted(exp)
    os.chmod(state, 0o644)


def test_an_image_written_as_png_stays_valid_for_the_verifier(tmp_path):
    # guard for the verifier's cache key: rewriting a file (new mtime/size) makes it be decoded again
    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (8, 4)).save(root / "images" / "a.png")
    cache = tmp_path / "v.json"
    ds = open_dataset(f"folder:{root}", "train", role="target")
    assert verify_dataset(ds, "t", cache=cache) == 1
    Image.new("RGB", (8, 5)).save(root / "images" / "a.png")
    os.utime(root / "images" / "a.png", ns=(1, 1))
    assert verify_dataset(ds, "t", cache=cache) == 1


def test_a_resumed_search_tracks_to_the_mlflow_uri_given_at_resume(tmp_path):
    from rayuda.hpo.tracking import MlflowTracker

    old, new = f"sqlite:///{tmp_path / 'old.db'}", f"sqlite:///{tmp_path / 'new.db'}"
    tracker = MlflowTracker(old, "rayuda-minent", "s", "s", {"minent": resolve_config("minent")}, {}, str(tmp_path))
    (tmp_path / "search.json").write_text(json.dumps({"num_samples": 2, "mlflow_uri": new}))  # what main() writes
    tracker.client.search_experiments()
    assert tracker.uri == new and (tmp_path / "new.db").exists() and not (tmp_path / "old.db").exists()


def test_a_relative_sqlite_uri_gets_its_artifacts_beside_the_database(tmp_path, monkeypatch):
    from rayuda.hpo.tracking import ensure_experiment
    from rayuda.runs import client_for

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///runs/mlflow.db"  # as a user types it; MLflow reads it relative to the working directory
    exp_id = ensure_experiment(client_for(uri), "rayuda-advent", uri)
    location = client_for(uri).get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "runs" / "mlartifacts").as_uri()
    assert (tmp_path / "runs" / "mlflow.db").is_file()
