"""An empty MLflow SQLite store, created once per test session and copied where a test's search writes.

Creating a store runs MLflow's schema migrations (about 5-8 s on 2 busy cores), and every search test used to pay
that in its own subprocess. A copy of a store that real MLflow created is the same store: the search opens it,
checks its schema version and writes to it as it would to a store it had just created. Tests that are about
creating a store (a relative ``sqlite:///`` URI, nothing written on a refusal) do not use this.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_TEMPLATE: Path | None = None


def fresh_store(path: Path) -> str:
    """Copy the session's empty store to ``path`` (unless a store is already there); return its URI."""
    global _TEMPLATE
    if _TEMPLATE is None:
        from mlflow import MlflowClient

        folder = Path(os.environ.get("RAYUDA_CACHE") or tempfile.mkdtemp())
        template = Path(tempfile.mkdtemp(prefix="mlflow-template-", dir=folder)) / "mlflow.db"
        client = MlflowClient(f"sqlite:///{template}")  # tracking tables
        client.search_experiments()
        client.search_registered_models()  # registry tables (same file)
        _TEMPLATE = template
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_TEMPLATE, path)
    return f"sqlite:///{path}"
