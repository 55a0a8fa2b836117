"""Shared test set-up: one cache (minicity, the stage cache) per test run in a temp dir, torch at one thread per
process, and what lets the suite run on several pytest workers (``make test``: pytest-xdist,
``-n auto --dist loadfile``).

One thread: the suite runs several torch processes at once (pytest's workers, `rayuda.train`/`rayuda.tune`
subprocesses, Ray trials, which set their own threads to ``--cpus-per-trial``), and on 2 cores two processes
of 2 OpenMP threads each spin waiting for a core (docs/BENCHMARKS.md: about 20× slower training). Measured on
the suite (§19): one `test_plan` test took 428-504 s at the default threads beside other work and 150 s at one.
Set ``OMP_NUM_THREADS`` yourself to override; it is read before torch is imported and inherited by subprocesses.

Workers (docs/BENCHMARKS.md §19):
- every worker of one run shares the cache: minicity is generated once, under its file lock; the stage cache and
  the verified-pairs record are safe for concurrent writers by design;
- each worker has its own Ray temp dir (``RAY_TMPDIR``, inherited by the `rayuda.tune` subprocesses). A `ray
  start` or ``ray.cluster_utils.Cluster`` records its address in ``<temp dir>/ray/ray_current_cluster``, and a
  ``ray.init()`` without an address joins the cluster recorded there: with one shared temp dir, a search test on
  one worker joined another worker's two-node test cluster and died when that cluster was torn down;
- one file runs on one worker (``--dist loadfile``), so a module-scoped fixture (a search run once and inspected
  by several tests, a trained model) is built once, as in a serial run;
- the slowest files start first, so that no long file is left running alone at the end.
"""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one `pytest -n` run
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
if _RUN and _WORKER:
    _CACHE = os.path.join(tempfile.gettempdir(), f"rayuda-test-cache-{_RUN[:12]}")
    os.makedirs(_CACHE, exist_ok=True)
    _RAY_TMP = os.path.join(tempfile.gettempdir(), f"rw-{_RUN[:6]}-{_WORKER}")  # short: Ray's socket paths
    os.makedirs(_RAY_TMP, exist_ok=True)
    os.environ["RAY_TMPDIR"] = _RAY_TMP
else:
    _CACHE = tempfile.mkdtemp(prefix="rayuda-test-cache-")
os.environ.setdefault("RAYUDA_CACHE", _CACHE)

# the files whose tests take longest (docs/BENCHMARKS.md §19), slowest first
SLOWEST_FIRST = ("test_tune_stages", "test_tune", "test_multinode", "test_tune_self_training", "test_object_storage",
                 "test_search_outputs", "test_cada", "test_self_training", "test_engine", "test_reliability",
                 "test_pseudo_truth", "test_plan")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: file order within a file
