"""bench/gpu.sh in its CPU dry run: the script runs end to end and writes its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_bench  # noqa: E402


def test_gpu_script_dry_run_writes_the_step_table(tmp_path):
    """The 4-trial search is left out (--skip-tune): a Ray start costs more than this test may take."""
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--skip-tune", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "gpu_bench.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| advent", "| cram"))]
    assert len(rows) == 4 and sum("bf16+channels_last" in r for r in rows) == 2
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert result["search"] is None and all(r["step_s"] > 0 and r["peak_gib"] > 0 for r in result["steps"])


def test_search_row_of_the_table():
    search = {"command": "rayuda.tune cram --num-samples 4", "exit": 0, "wall_s": 200.4, "trials_finished": 4,
              "best_miou": 0.3123, "peak_mib_per_process": [5210, 5002]}
    env = {"gpu": "NVIDIA H100", "driver": "550", "torch": "2.x", "cuda_build": "12", "cudnn": 9, "python": "3.11"}
    text = gpu_bench.markdown(env, [], search)
    assert "NVIDIA H100" in text and "| 0 | 200 | 4 | 31.2 | 5210, 5002 |" in text
