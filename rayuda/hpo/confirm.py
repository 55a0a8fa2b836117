"""The confirmation phase of a search: is the winner better than the paper's defaults, beyond seed noise?

A search selects on one seed and one set of images, so its best trial is an optimistic pick. After the
search, the top-K configs by selection score and the paper defaults are rerun at full length on N seeds
the search did not use, as Ray trials sharing the stage cache, and compared on the holdout's *test* part
(images no selection saw), paired by seed. The verdict names a winner only when it beats the defaults by
at least ``min_gain`` mIoU and by more than twice the standard error of the paired differences.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayuda.hpo.prepare import ConfirmPlan
from rayuda.hpo.trainable import TrialSetup, confirmation_dir, run_confirmation

DEFAULTS = "defaults"


def confirmation_seeds(search_seed: int, count: int) -> list[int]:
    """``count`` seeds other than the search's."""
    return [search_seed + 1 + i for i in range(count)]


def confirmation_runs(names: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """The confirmation's runs in the order Ray starts them: every seed of one candidate before the next
    candidate's. Runs that start together then train different seeds, so each computes its own seed's shared
    stages (source-only, a first stage) instead of one waiting on the other's stage lock; the later candidates
    find them cached."""
    return [{"candidate": name, "seed": seed} for name in names for seed in seeds]


def candidates(rows: list[dict[str, Any]], defaults: dict[str, Any], top_k: int) -> dict[str, dict[str, Any]]:
    """The paper defaults plus the ``top_k`` finished trials by selection score (``rows``: the trials table
    with each trial's ``knobs``); a trial whose knobs are the defaults is the defaults."""
    chosen = {DEFAULTS: dict(defaults)}
    finished = [r for r in rows if r["outcome"] == "finished" and not math.isnan(r["best_score"])]
    for row in sorted(finished, key=lambda r: -r["best_score"]):
        if len(chosen) > top_k:
            break
        if row["knobs"] != defaults and row["knobs"] not in chosen.values():
            chosen[f"trial {row['trial']}"] = dict(row["knobs"])
    return chosen


def verdict(scores: dict[str, dict[int, float]], min_gain: float = 1.0, what: str = "test mIoU") -> dict[str, Any]:
    """Compare every candidate with the defaults, paired by seed. ``scores[name][seed]`` is a fraction
    (mIoU) or a selection score; differences are reported in points (×100).

    Returns ``{"rows": [...], "winner": name, "text": ...}``; the winner is the defaults unless a candidate's
    mean paired gain is ≥ ``min_gain`` and above twice its standard error.
    """
    base = scores[DEFAULTS]
    rows, best = [], None
    for name, per_seed in scores.items():
        seeds = sorted(per_seed)
        values = [100 * per_seed[s] for s in seeds]
        diffs = [100 * (per_seed[s] - base[s]) for s in seeds if s in base]
        row = {"config": name, "seeds": seeds, "mean": statistics.mean(values),
               "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values}
        if name != DEFAULTS and diffs:
            row["gain"] = statistics.mean(diffs)
            row["gain_std"] = statistics.stdev(diffs) if len(diffs) > 1 else float("inf")
            row["gain_2se"] = 2 * row["gain_std"] / math.sqrt(len(diffs))
            row["beats_defaults"] = row["gain"] >= min_gain and row["gain"] > row["gain_2se"]
            if row["beats_defaults"] and (best is None or row["mean"] > best["mean"]):
                best = row
        rows.append(row)
    n = len(base)
    if best is not None:
        text = (f"{best['config']} beats the defaults by {best['gain']:.2f} ± {best['gain_std']:.2f} {what} "
                f"(paired, over {n} fresh seeds): use it")
        winner = best["config"]
    else:
        top = max((r for r in rows if "gain" in r), key=lambda r: r["gain"], default=None)
        if top is None:  # the search finished no other config (ASHA stopped every challenger early)
            text = (f"no config other than the defaults finished the search, so none was compared; keep the "
                    f"defaults (their {what} over {n} fresh seeds above)")
        else:
            text = (f"no config beat the defaults by {min_gain:g} {what} beyond seed noise over {n} fresh seeds "
                    f"(best: {top['config']}, {top['gain']:+.2f} ± {top['gain_std']:.2f}, {_how_far(top, min_gain)}); "
                    f"keep the defaults")
        winner = DEFAULTS
    return {"rows": rows, "winner": winner, "text": text, "metric": what, "min_gain": min_gain}


def _how_far(row: dict[str, Any], min_gain: float) -> str:
    """Why a challenger that did not win did not: within seed noise, a real lead under the minimum gain, or a real
    loss."""
    if abs(row["gain"]) <= row["gain_2se"]:
        return f"within seed noise, 2 SE = {row['gain_2se']:.2f}"
    if row["gain"] > 0:
        return f"a real lead, above 2 SE = {row['gain_2se']:.2f}, but under --min-gain {min_gain:g}"
    return f"a real loss, beyond 2 SE = {row['gain_2se']:.2f}"


def table_markdown(result: dict[str, Any]) -> str:
    lines = [f"| config | {result['metric']} mean ± std | per seed | paired gain vs defaults |", "|---|---|---|---|"]
    for r in result["rows"]:
        gain = f"{r['gain']:+.2f} ± {r['gain_std']:.2f}" if "gain" in r else "—"
        per_seed = ", ".join(f"{v:.2f}" for v in r["per_seed"])
        lines.append(f"| {r['config']} | {r['mean']:.2f} ± {r['std']:.2f} | {per_seed} | {gain} |")
    return "\n".join(lines) + f"\n\n**Verdict:** {result['text']}\n"


class ConfirmationInterrupted(Exception):
    """The confirmation was stopped (Ctrl-C) before every run reported: there is no verdict to give."""


def final_metrics(results: Iterable[Any], runs: int) -> dict[str, dict[int, dict[str, Any]]]:
    """Each confirmation run's final metrics by candidate and seed, from Ray's ``Result`` objects. A failed run
    raises; a run stopped before it reported (Ray hands it back without metrics when the search is interrupted)
    raises :class:`ConfirmationInterrupted` rather than a verdict on part of the seeds."""
    finals: dict[str, dict[int, dict[str, Any]]] = {}
    for result in results:
        if result.error is not None:
            raise RuntimeError(f"a confirmation run failed: {result.error}")
        metrics = result.metrics or {}
        if "candidate" in metrics:
            finals.setdefault(metrics["candidate"], {})[int(metrics["seed"])] = metrics
    done = sum(len(per_seed) for per_seed in finals.values())
    if done < runs:
        raise ConfirmationInterrupted(f"the confirmation was interrupted after {done} of its {runs} runs")
    return finals


@dataclass(frozen=True)
class Confirmation:
    """The confirmation's outcome: the candidates it reran (name → knobs) and their :func:`verdict`."""

    candidates: dict[str, dict[str, Any]]
    verdict: dict[str, Any]

    @property
    def winner(self) -> str:
        return self.verdict["winner"]

    @property
    def knobs(self) -> dict[str, Any]:
        """The winner's knobs."""
        return self.candidates[self.winner]

    def run_dir(self, work_root: Path) -> Path:
        """The winner's run folder at its first fresh seed (what ``rayuda.predict SEARCH_FOLDER`` uses)."""
        return confirmation_dir(work_root, self.winner, self.verdict["rows"][0]["seeds"][0])


def confirmation_phase(setup: TrialSetup, rows: list[dict[str, Any]], defaults: dict[str, Any], plan: ConfirmPlan,
                       *, resources: dict[str, float], concurrent: int | None) -> Confirmation:
    """Rerun the defaults and the ``plan.top_k`` best finished trials at full length on ``plan.seeds`` fresh seeds
    (a Ray ``Tuner``, grid over config × seed, sharing the stage cache) and compare them (:func:`verdict`) on test
    mIoU — or, on a target without labelled images, on the final label-free score."""
    from ray import tune

    cfg = next(iter(setup.configs.values()))
    chosen = candidates(rows, defaults, plan.top_k)
    fresh = confirmation_seeds(int(cfg["seed"]), plan.seeds)
    print(f"\nconfirmation: {len(chosen)} configs ({', '.join(chosen)}) × seeds {fresh}, full length", flush=True)
    trainable = tune.with_resources(tune.with_parameters(run_confirmation, setup=setup, candidates=chosen),
                                    resources)
    tuner = tune.Tuner(trainable,
                       param_space={"run": tune.grid_search(confirmation_runs(list(chosen), fresh))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
                       run_config=tune.RunConfig(name="confirmation", storage_path=setup.work_root, verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    finals = final_metrics(tuner.fit(), runs=len(chosen) * len(fresh))
    labelled = not any(math.isnan(m["test_miou"]) for runs in finals.values() for m in runs.values())
    key = "test_miou" if labelled else "score"
    scores = {name: {seed: m[key] for seed, m in runs.items()} for name, runs in finals.items()}
    what = "test mIoU" if labelled else f"final {cfg['train']['metric']} score ×100"
    return Confirmation(chosen, verdict(scores, plan.min_gain, what))
