"""What a search leaves behind: the trials table, the plots, the chosen config (``best.yaml``, ``winner.json``).

:func:`choose` decides the answer from the trials and, when it ran, the confirmation; :func:`write_best` writes
it. Neither trains nor talks to MLflow (``rayuda.hpo.cli`` hands the artifacts to the tracker).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayuda.config import save_config
from rayuda.hpo.confirm import DEFAULTS, Confirmation, table_markdown
from rayuda.hpo.places import WINNER, Places
from rayuda.hpo.prepare import SearchPlan
from rayuda.hpo.space import config_for

FIRST_COLUMNS = ("trial", "outcome", "iteration", "best_score", "test_miou", "stages")


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trials_table(results, exp_dir: Path) -> list[dict[str, Any]]:
    """One row per trial, best first: outcome, best selection score, test-part mIoU, stage cache, knobs."""
    from rayuda.hpo.tracking import error_line, outcome
    from rayuda.hpo.trial_summary import read_summary, stage_lines

    rows = []
    for result in results:
        metrics = result.metrics or {}
        knobs = dict(result.config or {})
        history = result.metrics_dataframe
        best = float(history["score"].max()) if history is not None and "score" in history else float("nan")
        trial_id = metrics.get("trial_id", "")
        stages = stage_lines(read_summary(exp_dir / "work" / "trials" / trial_id / "summary.json"))
        error = error_line(str(result.error)) if result.error is not None else metrics.get("failed")
        if error is not None and math.isinf(best):
            best = float("nan")  # a trial that failed before its first evaluation has no score
        rows.append({"trial": trial_id, "outcome": outcome(metrics, error=result.error is not None), "error": error,
                     "iteration": metrics.get("iteration", 0), "best_score": best,
                     "test_miou": metrics.get("test/miou", float("nan")),
                     "stages": "; ".join(f"{k} {v}" for k, v in stages.items()), **knobs, "knobs": knobs})
    rows.sort(key=lambda r: -r["best_score"] if not math.isnan(r["best_score"]) else math.inf)
    return rows


def write_trials_table(rows: list[dict[str, Any]], exp_dir: Path, metric: str) -> Path:
    """``trials.csv`` (one column per knob), and the same table printed."""
    keys = sorted({k for r in rows for k in r} - {"knobs"}, key=lambda k: (k not in FIRST_COLUMNS, k))
    table = exp_dir / "trials.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{'trial':<14} {'outcome':<14} {'iter':>5} {'best score':>10} {'test mIoU':>9}  {'stage cache':<12} "
          f"params        (score = {metric} on the selection images; test mIoU on the test images)")
    for r in rows:
        knobs = ", ".join(f"{k}={fmt(v)}" for k, v in r["knobs"].items())
        cache = " ".join(line.split()[1][0] for line in r["stages"].split("; ") if line) or "-"
        print(f"{r['trial']:<14} {r['outcome']:<14} {r['iteration']:>5} {r['best_score']:>10.4f} "
              f"{100 * r['test_miou']:>9.2f}  {cache:<12} {knobs}")
    print("(stage cache: one letter per stage of the plan — h hit, m miss, s skipped)")
    return table


def scored_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials with a selection score that did not fail, best first."""
    return [r for r in rows if not math.isnan(r["best_score"]) and r["outcome"] != "failed"]


@dataclass(frozen=True)
class Choice:
    """The search's answer: the knobs, why (``header``, ``best.yaml``'s first lines), the run folder it comes
    from, and what MLflow records of it (``champion``: confirmed, so the registered version gets the alias)."""

    knobs: dict[str, Any]
    header: tuple[str, ...]
    winner_dir: Path
    champion: bool
    description: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def choose(rows: list[dict[str, Any]], plan: SearchPlan, places: Places, confirmation: Confirmation | None,
           interrupted: bool) -> Choice | None:
    """The confirmed winner, or (no confirmation) the best trial by selection score; None when no trial scored."""
    from rayuda.hpo.registry import CHAMPION

    scored = scored_rows(rows)
    if not scored:
        return None
    top = scored[0]
    print(f"\nbest trial by selection: {top['trial']} ({plan.metric} score {top['best_score']:.4f} on the selection "
          f"images; test mIoU {100 * top['test_miou']:.2f})")
    metrics = {"best/score": top["best_score"], "best/test_miou": top["test_miou"]}
    if confirmation is None:
        return Choice(top["knobs"], (f"best trial by {plan.metric} on the selection images: {top['trial']}",),
                      places.work / "trials" / top["trial"], champion=False, metrics=metrics,
                      description=f"search {places.name}: trial {top['trial']}, the best by {plan.metric} on the "
                                  f"selection images; not confirmed on fresh seeds "
                                  f"({'interrupted' if interrupted else '--no-confirm'}), so not the {CHAMPION}")
    verdict = confirmation.verdict
    print("\nconfirmation on fresh seeds, test images:\n" + table_markdown(verdict))
    for row in verdict["rows"]:
        slug = row["config"].replace(" ", "_")
        metrics[f"confirm/{slug}/mean"] = row["mean"]
        if "gain" in row:
            metrics[f"confirm/{slug}/gain"] = row["gain"]
    defaults = confirmation.winner == DEFAULTS
    header = (f"confirmed: {verdict['text']}",) + (("these are the paper defaults",) if defaults else ())
    return Choice(confirmation.knobs, header, confirmation.run_dir(places.work), champion=True, metrics=metrics,
                  tags={"rayuda.verdict": verdict["text"][:5000]},
                  description=champion_description(places.name, verdict, defaults))


def write_best(choice: Choice, plan: SearchPlan, places: Places, also: str | None) -> Path:
    """``best.yaml`` in the search folder (and at ``also``, ``--best``), headed by why and the winner's per-class
    thresholds; ``work/winner.json`` names the winner's run folder."""
    best_cfg = config_for(plan.configs, choice.knobs)
    from rayuda.hpo.trial_summary import read_summary

    header = [*choice.header, *threshold_lines(read_summary(choice.winner_dir / "summary.json"))]
    best_path = places.exp_dir / "best.yaml"
    save_config(best_cfg, best_path, header=header)
    if (choice.winner_dir / "summary.json").exists():  # what `rayuda.predict SEARCH_FOLDER` uses
        (places.work / WINNER).write_text(json.dumps({"run": str(choice.winner_dir.relative_to(places.exp_dir)),
                                                      "why": header[0]}))
    if also:
        save_config(best_cfg, also, header=header)
    print(f"best config → {best_path}" + (f" and {also}" if also else "")
          + f"  (python -m rayuda.train {best_cfg['method']} --config {also or best_path})")
    return best_path


def champion_description(name: str, verdict: dict[str, Any], defaults: bool) -> str:
    """The registered version's description of a confirmed winner: which config it is and the verdict."""
    what = ("the paper defaults (no tuned config beat them: keep the defaults)" if defaults
            else f"{verdict['winner']} (it beat the paper defaults)")
    return f"search {name}, confirmed on fresh seeds: {what}. Verdict: {verdict['text']}"


def threshold_lines(summary: dict[str, Any]) -> list[str]:
    """The per-class thresholds a run's pseudo-label stages decided (its summary), as lines for ``best.yaml``'s
    header."""
    lines = []
    for stage in summary.get("stages", []):
        for name, row in (stage.get("per_class") or {}).items():
            values = ", ".join(f"{k} {fmt(v)}" for k, v in row.items())
            lines.append(f"thresholds of stage {stage['stage']}, {name}: {values}")
    return lines


def plots(study, exp_dir: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances of the search's study, as PNG (skipped, with
    the reason, when there are too few trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    out = []
    for name, plot in (("optimization_history", optuna.visualization.matplotlib.plot_optimization_history),
                       ("param_importances", optuna.visualization.matplotlib.plot_param_importances)):
        try:
            plot(study)
            path = exp_dir / f"{name}.png"
            plt.gcf().set_size_inches(8, 5)
            plt.tight_layout()
            plt.savefig(path, dpi=100)
            out.append(path)
        except Exception as err:  # noqa: BLE001 — a plot is a nicety; say why it is missing
            print(f"(no {name} plot: {err})", file=sys.stderr)
        finally:
            plt.close("all")
    return out
