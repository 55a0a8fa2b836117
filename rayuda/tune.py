"""``python -m rayuda.tune METHOD``: search a method's hyperparameters on your target data.

The search service lives in :mod:`rayuda.hpo`; this module is its command (``rayuda.hpo.cli``)."""

from __future__ import annotations

import sys

from rayuda.hpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
