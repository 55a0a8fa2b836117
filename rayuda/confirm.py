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
from pathlib import Path
from typing import Any

from rayuda.config import set_key
from rayuda.search import config_for

DEFAULTS = "defaults"


def confirmation_seeds(search_seed: int, count: int) -> list[int]:
    """``count`` seeds other than the search's."""
    return [search_seed + 1 + i for i in range(count)]


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
            standard_error = row["gain_std"] / math.sqrt(len(diffs))
            row["beats_defaults"] = row["gain"] >= min_gain and row["gain"] > 2 * standard_error
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
        shown = f" (best: {top['config']}, {top['gain']:+.2f} ± {top['gain_std']:.2f})" if top else ""
        text = (f"no config beat the defaults beyond seed noise over {n} fresh seeds{shown}; "
                f"keep the defaults")
        winner = DEFAULTS
    return {"rows": rows, "winner": winner, "text": text, "metric": what, "min_gain": min_gain}


def table_markdown(result: dict[str, Any]) -> str:
    lines = [f"| config | {result['metric']} mean ± std | per seed | paired gain vs defaults |", "|---|---|---|---|"]
    for r in result["rows"]:
        gain = f"{r['gain']:+.2f} ± {r['gain_std']:.2f}" if "gain" in r else "—"
        per_seed = ", ".join(f"{v:.2f}" for v in r["per_seed"])
        lines.append(f"| {r['config']} | {r['mean']:.2f} ± {r['std']:.2f} | {per_seed} | {gain} |")
    return "\n".join(lines) + f"\n\n**Verdict:** {result['text']}\n"


def run_confirmation(params: dict[str, Any], *, setup: dict[str, Any]) -> None:
    """One confirmation run (a Ray trial): a candidate's knobs at one fresh seed, at full length."""
    import torch
    from ray import tune

    from rayuda.engine import run_pipeline

    torch.set_num_threads(max(1, int(setup["cpus_per_trial"])))
    cfg = config_for(setup["configs"], setup["candidates"][params["candidate"]])
    set_key(cfg, "seed", params["seed"], source="confirmation")
    slug = params["candidate"].replace(" ", "-")
    out_dir = Path(setup["work_root"]) / "confirm" / f"{slug}-seed{params['seed']}"
    summary = run_pipeline(cfg, out_dir, cache_dir=setup["cache_dir"], list_dropped=False)
    test = (summary.get("test") or {}).get("final")
    tune.report({"score": summary["score"], "test_miou": test["miou"] if test else float("nan"),
                 "candidate": params["candidate"], "seed": params["seed"]})


def confirmation_phase(setup: dict[str, Any], rows: list[dict[str, Any]], defaults: dict[str, Any], *, top_k: int,
                       seeds: int, min_gain: float, resources: dict[str, float], concurrent: int | None
                       ) -> dict[str, Any]:
    """Rerun the defaults and the ``top_k`` best finished trials at full length on ``seeds`` fresh seeds (a Ray
    ``Tuner``, grid over config × seed, sharing the stage cache) and return their :func:`verdict`, on test
    mIoU — or, on a target without labelled images, on the final label-free score."""
    from ray import tune

    cfg = next(iter(setup["configs"].values()))
    setup["candidates"] = candidates(rows, defaults, top_k)
    fresh = confirmation_seeds(int(cfg["seed"]), seeds)
    print(f"\nconfirmation: {len(setup['candidates'])} configs ({', '.join(setup['candidates'])}) × seeds "
          f"{fresh}, full length", flush=True)
    trainable = tune.with_resources(tune.with_parameters(run_confirmation, setup=setup), resources)
    tuner = tune.Tuner(trainable,
                       param_space={"candidate": tune.grid_search(list(setup["candidates"])),
                                    "seed": tune.grid_search(fresh)},
                       tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
                       run_config=tune.RunConfig(name="confirmation", storage_path=setup["work_root"], verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    finals: dict[str, dict[int, dict[str, float]]] = {}
    for result in tuner.fit():
        if result.error is not None:
            raise RuntimeError(f"a confirmation run failed: {result.error}")
        m = result.metrics
        finals.setdefault(m["candidate"], {})[int(m["seed"])] = m
    labelled = not any(math.isnan(m["test_miou"]) for runs in finals.values() for m in runs.values())
    key = "test_miou" if labelled else "score"
    scores = {name: {seed: m[key] for seed, m in runs.items()} for name, runs in finals.items()}
    return verdict(scores, min_gain, "test mIoU" if labelled else f"final {cfg['train']['metric']} score ×100")
