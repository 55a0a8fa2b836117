"""Shared test set-up: every test session gets its own cache (minicity, stage cache) in a temp dir."""

from __future__ import annotations

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="rayuda-test-cache-")
os.environ.setdefault("RAYUDA_CACHE", _CACHE)
