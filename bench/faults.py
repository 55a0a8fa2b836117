"""Fault injection: every fault and bad input ARCHITECTURE lists (*Faults and bad input*) run for real on minicity
(tiny settings), one table row each — exit code, the message a user sees, compute lost (iterations trained twice
or thrown away), the MLflow state and duplicate runs.

    python bench/faults.py                 # ≈ 10 min on 2 cores; prints a markdown table
    python bench/faults.py --only train    # only the `rayuda.train` rows (≈ 3 min)

Rerun it when the engine, `rayuda.train` or `rayuda.tune` changes, and paste the table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TINY = {"data.size": [32, 64], "data.batch_size": 2, "data.holdout": 4, "train.eval_every": 4, "train.log_every": 1,
        "stages.source_only.iters": 4, "stages.minent.iters": 8}
SETS = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
ROWS: list[dict[str, str]] = []


def run(args: list[str], cwd: Path, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0", **(env or {})})


def message(text: str) -> str:
    """The line a user reads: the `error:` line, else the last non-empty line; a traceback is flagged."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    line = errors[0] if errors else (lines[-1] if lines else "")
    line = re.sub(r"/tmp/[^ ]*/", "…/", line)
    return ("TRACEBACK " if "Traceback" in text else "") + (line[:150] + ("…" if len(line) > 150 else ""))


def row(case: str, proc_or_rc, text: str = "", lost: str = "0", mlflow: str = "–", dupes: str = "–") -> None:
    rc = proc_or_rc.returncode if hasattr(proc_or_rc, "returncode") else proc_or_rc
    text = text or (proc_or_rc.stderr + proc_or_rc.stdout if hasattr(proc_or_rc, "stderr") else "")
    ROWS.append({"case": case, "exit": str(rc), "message": message(text).replace("|", "\\|"), "lost": lost,
                 "mlflow": mlflow, "dupes": dupes})
    print(f"{case}: exit {rc}; {message(text)}", flush=True)


def created(path: Path) -> str:
    return "created" if path.exists() else "nothing created"


# -- rayuda.train ----------------------------------------------------------------------------------------------------
def train_rows(tmp: Path) -> None:
    cache = ["--cache-dir", str(tmp / "cache")]
    out = tmp / "run"
    first = run(["rayuda.train", "minent", "--out", str(out), *cache, *SETS], tmp)
    assert first.returncode == 0, first.stderr[-2000:]
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def untouched() -> str:
        return "0 (folder untouched)" if {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp else "TOUCHED"

    proc = run(["rayuda.train", "minent", "--out", str(out), *cache, *SETS, "--set", "params.w_ent=0.5"], tmp)
    row("rerun into --out with another knob", proc, lost=untouched())
    proc = run(["rayuda.train", "minent", "--out", str(out), *cache, *SETS, "--set", "model.multi_level=true"], tmp)
    row("rerun into --out with a shape-incompatible model", proc, lost=untouched())
    proc = run(["rayuda.train", "minent", "--out", str(out), *cache, *SETS, "--set", "train.log_every=2"], tmp)
    row("rerun into --out differing only in log cadence", proc, lost="0 (finished run reused)")

    unlabelled = tmp / "unlabelled"
    (unlabelled / "images").mkdir(parents=True)
    from rayuda.data.minicity import ensure_minicity

    for path in sorted((ensure_minicity() / "target" / "leftImg8bit" / "train").rglob("*.png"))[:8]:
        shutil.copy(path, unlabelled / "images" / path.name)
    bad_args: list[tuple[str, list[str]]] = [
        ("folder target without labels, default metric miou", ["--target", f"folder:{unlabelled}"]),
        ("data.holdout=0", ["--set", "data.holdout=0"]),
        ("train.metric=foo", ["--set", "train.metric=foo"]),
        ("--iters 0", ["--iters", "0"]),
        ("train.eval_every=0", ["--set", "train.eval_every=0"]),
        ("model.backbone=foo", ["--set", "model.backbone=foo"]),
        ("model.init: an empty file", ["--set", f"model.init={tmp / 'empty.pt'}"]),
        ("model.init: a pickle with code", ["--set", f"model.init={tmp / 'evil.pt'}"]),
    ]
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "evil.pt").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")  # a classic pickle payload
    for case, extra in bad_args:
        target = tmp / "bad-run"
        proc = run(["rayuda.train", "minent", "--out", str(target), *cache, *SETS, *extra], tmp)
        row(case, proc, lost=f"0 ({created(target)})")

    corrupt = tmp / "corrupt"
    shutil.copytree(unlabelled, corrupt)
    victim = sorted((corrupt / "images").glob("*.png"))[-1]
    victim.write_bytes(victim.read_bytes()[:300])
    proc = run(["rayuda.train", "minent", "--target", f"folder:{corrupt}", "--set", "train.metric=entropy", "--out",
                str(tmp / "corrupt-run"), *cache, *SETS], tmp)
    row("a corrupt image a batch would draw late", proc, lost=f"0 ({created(tmp / 'corrupt-run')})")

    diverge = tmp / "diverge"
    proc = run(["rayuda.train", "minent", "--out", str(diverge), *cache, *SETS, "--set", "stages.minent.lr=1e12"], tmp)
    row("losses become NaN/inf (lr 1e12)", proc, lost="stops at the logging iteration where it happens")

    # Ctrl-C in the reported stage, then the printed resume command
    slow = [*SETS, "--set", "stages.minent.iters=40", "--set", "train.eval_every=10"]
    cmd = [sys.executable, "-m", "rayuda.train", "minent", "--out", str(tmp / "ctrlc"), *cache, *slow]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)
    seen = ""
    while "[minent] iter 13/40" not in seen:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    resume = next((ln.strip() for ln in err.splitlines() if ln.strip().startswith("python -m rayuda.train")), "")
    again = subprocess.run([sys.executable, *shlex.split(resume)[1:]], capture_output=True, text=True, cwd=tmp,
                           timeout=600) if resume else None
    redone = re.findall(r"resuming from iteration (\d+)", again.stdout) if again else []
    last = max(int(n) for n in re.findall(r"\[minent\] iter (\d+)/40", seen + out)) if "iter" in seen else 0
    lost = f"{last - int(redone[0])} iterations (since the checkpoint at {redone[0]})" if redone else "?"
    row("Ctrl-C during training", proc.returncode, err + out, lost=lost)
    row("… then the printed resume command", again if again else 1, lost="–")

    # a torn last log line and an orphan .tmp from a SIGKILL during the stage's first checkpoint save: no checkpoint
    # yet, so the stage restarts from iteration 0 with emptied logs
    stage = _interrupted_copy(tmp)
    with open(stage / "log.jsonl", "a") as handle:
        handle.write('{"iteration": 99, "ent')
    (stage / ".checkpoint.pt.dead.tmp").write_bytes(b"x" * 10_000)
    proc = run(["rayuda.train", "minent", "--out", str(tmp / "torn"), *cache, *slow], tmp)
    lost = "– (the rerun failed)"
    if proc.returncode == 0:
        done = stage_dir_of(tmp / "cache", "minent", 40)  # the interrupted folder, renamed once done
        iterations = [json.loads(line)["iteration"] for line in (done / "log.jsonl").read_text().splitlines()]
        orphan = "KEPT" if (done / ".checkpoint.pt.dead.tmp").exists() else "removed"
        clean = "restarted clean" if iterations == sorted(set(iterations)) else "HOLDS OLD LINES"
        lost = f"the stage so far (no checkpoint yet); orphan {orphan}; log {clean}"
    row("killed during its first checkpoint save (torn log line, orphan .tmp), then rerun", proc,
        lost=lost)

    good = stage_dir_of(tmp / "cache", "minent", 40)
    partial = good.with_name(f".{good.name}.partial")
    shutil.copytree(good, partial)
    (partial / "stage.yaml").unlink()
    (partial / "checkpoint.pt").write_bytes(b"\0" * 100)
    shutil.rmtree(good)
    proc = run(["rayuda.train", "minent", "--out", str(tmp / "badckpt"), *cache, *slow], tmp)
    row("bad checkpoint.pt in an interrupted stage", proc, lost="0 (file named; nothing overwritten)")


def stage_dir_of(cache: Path, name: str, iters: int) -> Path:
    """The finished stage ``name`` of ``iters`` iterations in the stage cache."""
    import yaml

    return next(p for p in cache.glob(f"{name}-*")
                if yaml.safe_load((p / "stage.yaml").read_text())["config"]["stages"][name]["iters"] == iters)


def _interrupted_copy(tmp: Path) -> Path:
    """The 40-iteration minent stage turned back into an interrupted one. A done stage keeps no checkpoint, so it
    resumes from iteration 0 and must drop the lines logged before (a stage killed before its first checkpoint)."""
    done = stage_dir_of(tmp / "cache", "minent", 40)
    partial = done.with_name(f".{done.name}.partial")
    shutil.copytree(done, partial)
    (partial / "stage.yaml").unlink()
    shutil.rmtree(done)
    return partial


# -- rayuda.tune -----------------------------------------------------------------------------------------------------
def tune_cmd(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["rayuda.tune", "minent", "--storage", str(tmp / "store"), "--name", name, "--mlflow-uri",
            f"sqlite:///{tmp / 'mlflow.db'}", "--best", str(tmp / f"{name}.yaml"), *SETS, *extra]


def mlflow_state(tmp: Path, name: str) -> tuple[str, str]:
    """(parent status + child statuses, duplicate trial runs) of search ``name``."""
    from collections import Counter

    from rayuda.runs import client_for

    client = client_for(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rayuda-minent")
    if exp is None:
        return "no experiment", "–"
    runs = client.search_runs([exp.experiment_id], f"tags.`rayuda.search` = '{tmp / 'store' / name}'")
    if not runs:
        return "no parent run", "–"
    parent = runs[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    statuses = Counter(c.info.status for c in children if c.data.tags.get("rayuda.role") == "trial")
    ids = Counter(c.data.tags.get("rayuda.trial_id") for c in children if c.data.tags.get("rayuda.role") == "trial")
    dupes = sum(n - 1 for n in ids.values())
    text = f"parent {parent.info.status}; trials " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    return text, str(dupes)


def space_file(tmp: Path, name: str, knobs: dict) -> str:
    import yaml

    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"method": "minent", "knobs": knobs}))
    return str(path)


def tune_rows(tmp: Path) -> None:
    for case, extra in [
        ("--num-samples 0", ["--num-samples", "0"]),
        ("--num-samples -1", ["--num-samples", "-1"]),
        ("a knob whose type its config key cannot take",
         ["--space", space_file(tmp, "typo", {"params.w_ent": {"type": "categorical", "choices": ["a", "b"],
                                                               "default": "a"}})]),
    ]:
        proc = run(tune_cmd(tmp, "bad", *extra), tmp)
        row(f"tune {case}", proc, lost=f"0 ({created(tmp / 'store')})")
    tic = time.time()
    proc = run(tune_cmd(tmp, "bad", "--mlflow-uri", "http://127.0.0.1:9"), tmp)
    row(f"tune --mlflow-uri http://127.0.0.1:9 (nothing listening; {time.time() - tic:.0f} s)", proc,
        lost=f"0 ({created(tmp / 'store')})")

    base = ["--max-concurrent", "1", "--grace", "8", "--no-confirm", "--set", "train.eval_every=4"]
    proc = run(tune_cmd(tmp, "allnan", "--num-samples", "2", *base, "--space", space_file(
        tmp, "nan", {"stages.minent.lr": {"type": "categorical", "choices": [1e12, 2e12], "default": 1e12}})), tmp)
    state, dupes = mlflow_state(tmp, "allnan")
    row("tune: every trial's losses go NaN", proc, mlflow=state, dupes=dupes, lost="each stops where it diverges")

    proc = run(tune_cmd(tmp, "onenan", "--num-samples", "3", *base, "--space", space_file(
        tmp, "onenan", {"stages.minent.lr": {"type": "categorical", "choices": [2.5e-4, 1e-3, 1e12],
                                             "default": 1e12}})), tmp)  # the first trial is the default: NaN
    state, dupes = mlflow_state(tmp, "onenan")
    failed = re.findall(r"(\d+) of (\d+) trials failed", proc.stderr)
    row(f"tune: one trial's losses go NaN ({failed[0][0] if failed else 0} of 3 failed)", proc, mlflow=state,
        dupes=dupes, lost="the failed trial only")

    worker_kill(tmp)
    driver_kill(tmp)


def _wait_for(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        if proc.poll() is not None:
            raise RuntimeError(f"the search ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.5)


def worker_kill(tmp: Path) -> None:
    """SIGKILL the trial's worker process after its first evaluation: Ray retries it from its checkpoint."""
    cmd = [sys.executable, "-m", *tune_cmd(tmp, "workerkill", "--num-samples", "1", "--max-concurrent", "1",
                                           "--grace", "16", "--no-confirm", "--set", "stages.minent.iters=16",
                                           "--set", "train.eval_every=4")]
    log = tmp / "workerkill.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, text=True, cwd=tmp,
                                env={**os.environ, "RAY_DEDUP_LOGS": "0"}, start_new_session=True)
        _wait_for(proc, lambda: "iter 6/16" in log.read_text())
        pids = subprocess.run(["pgrep", "-f", "ray::ImplicitFunc"], capture_output=True, text=True).stdout.split()
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        proc.wait(timeout=900)
    text = log.read_text()
    trained = len(re.findall(r"\[minent\] iter \d+/16", text))
    resumed = re.findall(r"resuming from iteration (\d+)", text)
    state, dupes = mlflow_state(tmp, "workerkill")
    row(f"tune: trial worker SIGKILLed ({len(pids)} process) after iteration 6", proc.returncode, text,
        lost=f"{trained - 16} iterations (resumed from {resumed[0] if resumed else '?'})", mlflow=state, dupes=dupes)


def driver_kill(tmp: Path) -> None:
    """SIGKILL the search driver mid-search, then `--resume`: every trial once, nothing left RUNNING."""
    args = tune_cmd(tmp, "driverkill", "--num-samples", "3", "--max-concurrent", "1", "--grace", "8", "--no-confirm")
    log = tmp / "driverkill.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=handle, stderr=subprocess.STDOUT, text=True,
                                cwd=tmp, env={**os.environ, "RAY_DEDUP_LOGS": "0"}, start_new_session=True)
        trials = tmp / "store" / "driverkill" / "work" / "trials"
        _wait_for(proc, lambda: len(list(trials.glob("*/summary.json"))) >= 1)
        time.sleep(3)
        proc.kill()  # the driver only: like a head node that lost its process
        proc.wait()
        time.sleep(5)
    resumed = run([*args, "--resume"], tmp)
    state, dupes = mlflow_state(tmp, "driverkill")
    from rayuda.hpo.searcher import JOURNAL, load_search_study

    study = load_search_study(tmp / "store" / "driverkill" / "work" / JOURNAL, "driverkill")
    states = ", ".join(sorted(t.state.name for t in study.trials))
    row(f"tune: driver SIGKILLed, then --resume (Optuna: {states})", resumed, mlflow=state, dupes=dupes,
        lost="the running trial's iterations since its last checkpoint")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["train", "tune"], default=None)
    args = parser.parse_args(argv)
    tic = time.time()
    with tempfile.TemporaryDirectory(prefix="rayuda-faults-") as name:
        tmp = Path(name)
        os.environ.setdefault("RAYUDA_CACHE", str(tmp / "rayuda-cache"))
        if args.only in (None, "train"):
            train_rows(tmp)
        if args.only in (None, "tune"):
            tune_rows(tmp)
    print(f"\n{len(ROWS)} cases in {time.time() - tic:.0f} s\n")
    print("| case | exit | message | lost compute | MLflow | duplicates |\n|---|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['case']} | {r['exit']} | {r['message']} | {r['lost']} | {r['mlflow']} | {r['dupes']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
