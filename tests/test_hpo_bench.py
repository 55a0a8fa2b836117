"""``bench/hpo_efficiency.py``'s accounting: the selected-so-far winner and the compute it took, on hand-made
trials and on Ray's own per-trial logs written to disk."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from hpo_efficiency import best_so_far, compute_to_reach, read_trials  # noqa: E402


def trial(name, cpu_s, best_score, test_miou):
    return {"trial": name, "cpu_s": cpu_s, "best_score": best_score, "test_miou": test_miou,
            "finished": test_miou is not None, "config": name}


def test_the_winner_so_far_is_the_finished_trial_with_the_best_selection_score():
    trials = [trial("a", 10.0, 0.20, 18.0),
              trial("b", 5.0, 0.30, None),   # best selection score, but stopped early: never the winner
              trial("c", 20.0, 0.25, 17.0),  # beats a on selection, worse on test: the winner follows selection
              trial("d", 20.0, 0.22, 25.0)]  # best on test, not selected
    curve = best_so_far(trials)
    assert [(spent, miou) for spent, miou, _ in curve] == [(10.0, 18.0), (15.0, 18.0), (35.0, 17.0), (55.0, 17.0)]
    assert curve[-1][2]["trial"] == "c"
    assert compute_to_reach(curve, 17.5) == 10.0
    assert compute_to_reach(curve, 18.5) is None  # d is never selected, so 25.0 is never reached


def test_trials_are_read_from_rays_result_files_in_the_order_they_ended(tmp_path):
    exp = tmp_path / "search"
    for name, ended, seconds, scores, test in (("t1", 200, 30.0, [0.1, 0.2], 0.19), ("t2", 100, 12.5, [0.15], None)):
        rows = [{"trial_id": name, "timestamp": ended - 10 + i, "time_total_s": seconds * (i + 1) / len(scores),
                 "score": s, "iteration": 50 * (i + 1)} for i, s in enumerate(scores)]
        (exp / f"run_trial_{name}").mkdir(parents=True)
        (exp / f"run_trial_{name}" / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if test is not None:
            (exp / "work" / "trials" / name).mkdir(parents=True)
            summary = {"test": {"final": {"miou": test}, "selected": {"miou": test}}}
            (exp / "work" / "trials" / name / "summary.json").write_text(json.dumps(summary))
    found = read_trials(exp, cpus_per_trial=2.0)
    assert [t["trial"] for t in found] == ["t2", "t1"]
    assert [t["cpu_s"] for t in found] == [25.0, 60.0]  # the trial's own timer × its CPUs
    assert [t["finished"] for t in found] == [False, True]
    assert math.isclose(found[1]["test_miou"], 19.0) and found[1]["best_score"] == 0.2
