"""Shared test set-up: every test session gets its own cache (minicity, stage cache) in a temp dir, and torch
runs one thread per process.

One thread: the suite runs several torch processes at once (pytest itself, `rayuda.train`/`rayuda.tune`
subprocesses, Ray trials, which set their own threads to ``--cpus-per-trial``), and on 2 cores two processes
of 2 OpenMP threads each spin waiting for a core (docs/BENCHMARKS.md: about 20× slower training). Measured on
the suite (§19): one `test_plan` test took 428-504 s at the default threads beside other work and 150 s at one.
Set ``OMP_NUM_THREADS`` yourself to override; it is read before torch is imported and inherited by subprocesses.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

_CACHE = tempfile.mkdtemp(prefix="rayuda-test-cache-")
os.environ.setdefault("RAYUDA_CACHE", _CACHE)
