"""What the search's machinery buys: TPE + ASHA + stage cache against plain random search and TPE alone.

    python bench/hpo_efficiency.py --out runs/hpo                      # 3 arms × 3 search seeds (~45 min, 2 cores)
    python bench/hpo_efficiency.py --out runs/hpo --analyse-only       # the table and plot from finished searches

Arms, each a real ``python -m rayuda.tune`` search with the same trial count, method and budget:

* ``tpe+asha`` — rayuda's default: TPE, ASHA early stopping, the stage cache;
* ``random`` — random search, every trial at full length (``--sampler random --scheduler none``);
* ``tpe`` — TPE without early stopping (``--scheduler none``).

All three start from the paper defaults (rayuda's first trial) and share nothing across arms: each search
has its own stage cache, so each pays its own source-only stage. Per search seed the script reads every
trial's own timer (Ray's ``time_total_s`` × CPUs per trial, early-stopped trials included), orders trials by
when they ended, and follows the *selected-so-far* winner (the finished trial with the best selection
score) and its mIoU on the test images (which no selection saw). Reported per arm: total compute; compute
until the selected winner came within 1 mIoU of the best winner any arm found at that seed; the final
winner's test mIoU; the stage-cache saving (finished trials' stages with and without the cache, as
``bench/stage_cache.py``); then every distinct winner (and the defaults) is rerun with ``rayuda.train`` on
``--confirm-seeds`` fresh seeds, which is the confirmed test mIoU. Searches and confirmation runs already
finished are reused, so an interrupted run continues. Writes ``hpo.json``, ``hpo.md`` and ``hpo.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_cache import cache_accounting  # noqa: E402

ARMS = {"tpe+asha": ["--sampler", "tpe", "--scheduler", "asha"],
        "random": ["--sampler", "random", "--scheduler", "none"],
        "tpe": ["--sampler", "tpe", "--scheduler", "none"]}
WITHIN = 1.0  # mIoU points: "reached the best" = within this of the best winner found at that seed


def search_name(arm: str, seed: int) -> str:
    return f"{arm.replace('+', '-')}-s{seed}"


def run_search(out: Path, arm: str, seed: int, args) -> Path:
    name = search_name(arm, seed)
    exp = out / "searches" / name
    if (exp / "trials.csv").is_file():
        print(f"[hpo] {name}: done earlier, reused", flush=True)
        return exp
    if exp.exists():
        raise SystemExit(f"error: {exp} holds an unfinished search; remove it (or finish it with "
                         f"python -m rayuda.tune {args.method} --resume --name {name} --storage {exp.parent})")
    cmd = [sys.executable, "-m", "rayuda.tune", args.method, *ARMS[arm], "--name", name,
           "--storage", str(out / "searches"), "--cache-dir", str(out / "caches" / name), "--seed", str(seed),
           "--num-samples", str(args.num_samples), "--max-iters", str(args.max_iters),
           "--max-concurrent", str(args.concurrent), "--no-confirm", "--no-register",
           "--mlflow-uri", f"sqlite:///{(out / 'mlflow.db').resolve()}", "--best", str(out / f"best-{name}.yaml"),
           *[a for s in args.set for a in ("--set", s)]]
    print(f"[hpo] {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    with open(out / f"{name}.log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"error: search {name} exited {code}; see {out / f'{name}.log'}")
    print(f"[hpo] {name}: {time.time() - start:.0f} s of wall time", flush=True)
    return exp


def read_trials(exp: Path, cpus_per_trial: float) -> list[dict]:
    """Every trial of a search from Ray's own per-trial logs, in the order the trials ended."""
    trials = []
    for result_file in exp.glob("*/result.json"):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        last = rows[-1]
        trial_id = last["trial_id"]
        summary_file = exp / "work" / "trials" / trial_id / "summary.json"
        test = json.loads(summary_file.read_text()).get("test", {}) if summary_file.is_file() else {}
        scores = [r["score"] for r in rows if "score" in r and not r.get("failed")]
        trials.append({"trial": trial_id, "ended": last["timestamp"], "cpu_s": last["time_total_s"] * cpus_per_trial,
                       "iteration": last.get("iteration", 0), "finished": bool(test.get("final")),
                       "best_score": max(scores) if scores else -math.inf,
                       "test_miou": 100 * test["final"]["miou"] if test.get("final") else None,
                       "config": str(exp / "work" / "trials" / trial_id / "config.yaml")})
    return sorted(trials, key=lambda t: t["ended"])


def best_so_far(trials: list[dict]) -> list[tuple[float, float | None, dict | None]]:
    """(cumulative CPU-s, test mIoU of the selected-so-far winner, that winner) after each trial ended."""
    curve, spent, winner = [], 0.0, None
    for trial in trials:
        spent += trial["cpu_s"]
        if trial["finished"] and (winner is None or trial["best_score"] > winner["best_score"]):
            winner = trial
        curve.append((spent, winner["test_miou"] if winner else None, winner))
    return curve


def compute_to_reach(curve, target: float) -> float | None:
    for spent, miou, _ in curve:
        if miou is not None and miou >= target:
            return spent
    return None


def confirm(out: Path, configs: dict[str, str], seeds: list[int], args) -> dict[str, dict[int, float]]:
    """``rayuda.train`` of every config on every fresh seed (one shared stage cache); test mIoU per seed."""
    jobs, scores = [], {name: {} for name in configs}
    for name, config in configs.items():
        for seed in seeds:
            run_dir = out / "confirm" / f"{name}-seed{seed}"
            summary = run_dir / "summary.json"
            if summary.is_file():
                scores[name][seed] = 100 * json.loads(summary.read_text())["test"]["final"]["miou"]
                continue
            cmd = [sys.executable, "-m", "rayuda.train", args.method, "--config", config, "--seed", str(seed),
                   "--out", str(run_dir), "--cache-dir", str(out / "caches" / "confirm"), "--force-new"]
            jobs.append((name, seed, run_dir, cmd))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[tuple[str, int, Path, subprocess.Popen, object]] = []
    while jobs or running:
        while jobs and len(running) < args.concurrent:
            name, seed, run_dir, cmd = jobs.pop(0)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            print(f"[hpo] confirm {name} on seed {seed}", flush=True)
            log = open(f"{run_dir}.log", "w")  # closed when the run ends
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((name, seed, run_dir, proc, log))
        time.sleep(2)
        for job in list(running):
            name, seed, run_dir, proc, log = job
            if proc.poll() is None:
                continue
            running.remove(job)
            log.close()
            if proc.returncode != 0:
                raise SystemExit(f"error: confirmation run {run_dir} exited {proc.returncode}; see {run_dir}.log")
            scores[name][seed] = 100 * json.loads((run_dir / "summary.json").read_text())["test"]["final"]["miou"]
    return scores


def mean_std(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def analyse(out: Path, args) -> dict:
    searches = {(arm, seed): out / "searches" / search_name(arm, seed) for arm in ARMS for seed in args.seeds}
    trials = {key: read_trials(exp, args.cpus_per_trial) for key, exp in searches.items()}
    curves = {key: best_so_far(t) for key, t in trials.items()}
    rows = {arm: {"total": [], "reach": [], "winner": [], "saved": [], "saved_pct": [], "reached": 0, "stopped": []}
            for arm in ARMS}
    winners: dict[str, str] = {}
    for seed in args.seeds:
        finals = {arm: curves[(arm, seed)][-1][1] for arm in ARMS if curves[(arm, seed)]}
        best = max(v for v in finals.values() if v is not None)
        for arm in ARMS:
            curve, row = curves[(arm, seed)], rows[arm]
            row["total"].append(curve[-1][0])
            reach = compute_to_reach(curve, best - WITHIN)
            row["reached"] += reach is not None
            row["reach"].append(reach)
            row["winner"].append(finals[arm])
            row["stopped"].append(sum(not t["finished"] for t in trials[(arm, seed)]))
            winner = curve[-1][2]
            winners[f"{arm}-s{seed}"] = winner["config"]
            saving = cache_accounting(searches[(arm, seed)])
            if saving:
                row["saved"].append(saving["without_cache"] - saving["with_cache"])
                row["saved_pct"].append(100 * (1 - saving["with_cache"] / max(saving["without_cache"], 1e-9)))
    return {"rows": rows, "curves": {f"{a}-s{s}": [(c, m) for c, m, _ in curve] for (a, s), curve in curves.items()},
            "winners": winners}


def distinct_configs(winners: dict[str, str], defaults_from: str) -> tuple[dict[str, str], dict[str, str]]:
    """Winners whose knobs are identical run once: ``{run name: config}`` and ``{winner: run name}``."""
    from rayuda.config import flatten, load_yaml

    runs, alias, seen = {}, {}, {}
    for name, config in [("defaults", defaults_from), *winners.items()]:
        key = json.dumps({k: v for k, v in flatten(load_yaml(config)).items() if k != "seed"}, sort_keys=True,
                         default=str)
        if key not in seen:
            seen[key] = name
            runs[name] = config
        alias[name] = seen[key]
    return runs, alias


def write_report(out: Path, found: dict, confirmed: dict[str, float], alias: dict[str, str], args) -> None:
    lines = [f"| arm | total compute (CPU-s) | compute to within {WITHIN:g} mIoU of the best (CPU-s; reached) | "
             "trials stopped early | search winner, test mIoU | winner confirmed on fresh seeds, test mIoU | "
             "stage-cache saving (finished trials) |", "|---|---|---|---|---|---|---|"]
    for arm, row in found["rows"].items():
        reached = [r for r in row["reach"] if r is not None]
        confirmed_arm = [confirmed[alias[f"{arm}-s{s}"]] for s in args.seeds]
        saved = f"{mean_std(row['saved'], 0)} s ({mean_std(row['saved_pct'], 0)} %)" if row["saved"] else "—"
        reach = f"{mean_std(reached, 0)} ({row['reached']}/{len(args.seeds)})"
        lines.append(f"| {arm} | {mean_std(row['total'], 0)} | {reach} | "
                     f"{mean_std(row['stopped'], 1)} of {args.num_samples} | {mean_std(row['winner'])} | "
                     f"{mean_std(confirmed_arm)} | {saved} |")
    lines.append(f"\npaper defaults confirmed on the same fresh seeds: {confirmed[alias['defaults']]:.2f} test mIoU")
    lines.append("\nwinners (distinct configs rerun once): "
                 + ", ".join(f"{w} → {alias[w]}" for w in alias if w != "defaults"))
    (out / "hpo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(out: Path, found: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(ARMS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curve in found["curves"].items():
        arm = name.rsplit("-s", 1)[0]
        points = [(c, m) for c, m in curve if m is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.step(xs, ys, where="post", color=colours[arm], alpha=0.8, linewidth=3 if arm == "tpe+asha" else 1.5,
                    label=arm if name.endswith(f"-s{args.seeds[0]}") else None)
            ax.plot(xs[-1], ys[-1], marker="o", color=colours[arm])  # where the search ended: its total compute
    ax.set_xlabel("compute spent by the search (CPU-seconds, trials' own timers)")
    ax.set_ylabel("test mIoU of the selected-so-far winner")
    ax.set_title(f"{args.method} on minicity: {args.num_samples} trials per search, one line per search seed "
                 "(dot: search ended)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "hpo.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hpo"))
    parser.add_argument("--method", default="advent")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="search seeds")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-iters", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=2, help="trials (and confirmation runs) at once")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--confirm-seeds", nargs="+", type=int, default=[100, 101])
    parser.add_argument("--set", action="append", default=["stages.source_only.iters=300"],
                        help="override for every search (default: a 300-iteration source-only stage)")
    parser.add_argument("--analyse-only", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if not args.analyse_only:
        for seed in args.seeds:  # arms interleaved, so a change of machine load hits every arm alike
            for arm in ARMS:
                run_search(args.out, arm, seed, args)
    found = analyse(args.out, args)
    runs, alias = distinct_configs(found["winners"], str(next((args.out / "searches").glob("*/base_config.yaml"))))
    scores = confirm(args.out, runs, args.confirm_seeds, args)
    confirmed = {name: statistics.mean(per_seed.values()) for name, per_seed in scores.items()}
    found["confirmed"] = {"seeds": args.confirm_seeds, "per_config": scores, "alias": alias}
    (args.out / "hpo.json").write_text(json.dumps(found, indent=1, default=str))
    write_report(args.out, found, confirmed, alias, args)
    plot(args.out, found, args)
    print(f"\n[hpo] {time.time() - start:.0f} s; {args.out / 'hpo.md'}, {args.out / 'hpo.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
