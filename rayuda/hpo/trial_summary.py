"""What a trial's ``summary.json`` tells MLflow: its environment, dropped bad pairs, stage cache lines, the
pseudo-label quality its passes measured against the truth, and per-class threshold tables. The file is read
once (:func:`read_summary`; a missing one reads as nothing) and each reader takes what it holds, so the tracker
and the search's report share them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_summary(summary_path: Path) -> dict[str, Any]:
    """A run's ``summary.json`` (``{}`` if the run wrote none)."""
    path = Path(summary_path)
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_environment(summary: dict[str, Any]) -> dict[str, Any]:
    """The machine and code facts a trial's summary recorded (``environment``: versions, git commit, CPU/GPU,
    threads, deterministic)."""
    return summary.get("environment", {})


def summary_dropped(summary: dict[str, Any]) -> list[dict[str, str]]:
    """The bad pairs (image, label, reason) a run's summary says ``data.bad_pairs=skip`` left out."""
    return (summary.get("bad_pairs") or {}).get("dropped", [])


def threshold_tables(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """For every pseudo-label stage of a run that decided per-class thresholds (``per_class`` in its facts), a
    CSV table and a bar chart of them in ``out_dir`` (``thresholds-<stage>.csv`` / ``.png``); returns the files.

    Where the pass measured its pseudo-labels against the target's true labels (``truth_per_class``), each
    row also has their ``precision`` and ``recall``, and classes with true pixels the labeller did not list
    get a row of their own (class order)."""
    import csv

    files = []
    for stage in summary.get("stages", []):
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


def pseudo_metrics(summary: dict[str, Any]) -> list[tuple[str, float, int]]:
    """``(metric, value, step)`` of the pseudo-label quality a run's passes measured against the target's true
    labels (stage facts ``pseudo/precision``, ``pseudo/recall``, ``pseudo/rare_precision``,
    ``pseudo/rare_recall``, see :func:`rayuda.engine.passes.truth_facts`); ``step`` is the stage's place in
    the plan, so a plan with several passes keeps one history per metric. Empty when none was measured."""
    stages = summary.get("stages", [])
    return [(key, float(value), step) for step, stage in enumerate(stages) for key, value in stage.items()
            if key.startswith("pseudo/") and isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value)]


def stage_lines(summary: dict[str, Any]) -> dict[str, str]:
    """``{stage: "hit 0.0 s"}`` from a trial's summary (empty if the trial wrote none)."""
    stages = summary.get("stages", [])
    return {s["stage"]: f"{s['cache']} {s['seconds']:.1f} s" for s in stages}
