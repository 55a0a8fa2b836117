"""The Ray trials: a search trial and a confirmation run, each one :func:`rayuda.engine.run_pipeline` call.

A trial gets its knobs from the searcher and everything else from a :class:`TrialSetup` (Ray puts it in the
object store once, ``tune.with_parameters``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayuda.config import set_key
from rayuda.hpo.space import config_for


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares: each method's base config, the folders, its CPU threads."""

    configs: dict[str, dict[str, Any]]
    work_root: str  # the search's work/ folder: trials/TRIAL/ and confirm/CANDIDATE-seedS/
    cache_dir: str  # the stage cache
    cpus_per_trial: float


@contextlib.contextmanager
def report_without_weights(report_dir: Path):
    """A temporary copy of an evaluation's report folder without G's weights (``*.pt``): what the Ray checkpoint
    of a report needs to carry (the masks, which the MLflow callback logs). Nothing reads G back from Ray — a
    resumed trial continues from its stage checkpoint in the stage cache — so an evaluation writes G once less
    (docs/BENCHMARKS.md §18)."""
    with tempfile.TemporaryDirectory(prefix="rayuda-report-") as tmp:
        shutil.copytree(report_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.pt"))
        yield Path(tmp)


def _send(metrics: dict[str, Any], report_dir: Path | None) -> None:
    """One report to Tune, with the evaluation's report folder (masks, no weights) as its checkpoint."""
    from ray import tune

    if report_dir is None:
        tune.report(metrics)
        return
    with report_without_weights(report_dir) as folder:  # Ray uploads it before report returns
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))


def run_trial(params: dict[str, Any], *, setup: TrialSetup) -> None:
    """One Tune trial: the method's pipeline with the sampled knobs, reporting each evaluation.

    Tune ends a trial at its final report, so the final one (``last_report``) is held until the pipeline has
    written ``summary.json`` and is then sent with the test-part mIoU. A non-finite loss is deterministic (a
    retry would diverge again): the trial ends as failed, with a ``-inf`` score."""
    import ray
    import torch
    from ray import tune

    from rayuda.engine import run_pipeline
    from rayuda.engine.loop import NonFiniteLoss
    from rayuda.storage import check_marker

    torch.set_num_threads(max(1, int(setup.cpus_per_trial)))
    cfg = config_for(setup.configs, params)
    out_dir = Path(setup.work_root) / "trials" / tune.get_context().get_trial_id()
    node_id = ray.get_runtime_context().get_node_id()  # which machine ran it, tagged in MLflow
    check_marker([setup.work_root, setup.cache_dir], f"node {ray.util.get_node_ip_address()}")
    last: list[dict[str, Any]] = []
    reached = {"iteration": 0}  # the step axis's last reported iteration

    def report(metrics: dict[str, Any], report_dir: Path | None) -> None:
        metrics = {**metrics, "node_id": node_id}
        reached["iteration"] = metrics["iteration"]
        if metrics.get("last_report"):
            last.append(metrics)  # held until the pipeline has written summary.json
        else:
            _send(metrics, report_dir)

    try:
        summary = run_pipeline(cfg, out_dir, report=report, cache_dir=setup.cache_dir, list_dropped=False)
    except NonFiniteLoss as err:
        (out_dir / "failure.txt").write_text(str(err) + "\n")
        tune.report({"iteration": reached["iteration"], "score": float("-inf"), "failed": str(err),
                     "node_id": node_id})
        return
    dirs = {s["stage"]: s["dir"] for s in summary["stages"]}
    test = summary.get("test") or {}
    for metrics in last:  # the stage's folder has moved from .partial to its cache place since
        if "final" in test:
            metrics.update({"test/miou": test["final"]["miou"], "test/miou_selected": test["selected"]["miou"]})
        _send(metrics, Path(dirs[metrics["stage"]]) / "report")


def confirmation_dir(work_root: str | Path, candidate: str, seed: int) -> Path:
    """The run folder of one confirmation run."""
    return Path(work_root) / "confirm" / f"{candidate.replace(' ', '-')}-seed{seed}"


def run_confirmation(params: dict[str, Any], *, setup: TrialSetup, candidates: dict[str, dict[str, Any]]) -> None:
    """One confirmation run (a Ray trial): a candidate's knobs at one fresh seed, at full length
    (``params["run"]``: one of :func:`rayuda.hpo.confirm.confirmation_runs`)."""
    import torch
    from ray import tune

    from rayuda.engine import run_pipeline

    torch.set_num_threads(max(1, int(setup.cpus_per_trial)))
    name, seed = params["run"]["candidate"], params["run"]["seed"]
    cfg = config_for(setup.configs, candidates[name])
    set_key(cfg, "seed", seed, source="confirmation")
    out_dir = confirmation_dir(setup.work_root, name, seed)
    summary = run_pipeline(cfg, out_dir, cache_dir=setup.cache_dir, list_dropped=False)
    test = (summary.get("test") or {}).get("final")
    tune.report({"score": summary["score"], "test_miou": test["miou"] if test else float("nan"),
                 "candidate": name, "seed": seed})
