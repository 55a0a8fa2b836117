"""The method registry: name → class. Adding a method = one module (or package) here + one ``search_spaces``
YAML: every module of this package is imported below, and defining a :class:`Method` subclass registers it
(:meth:`Method.__init_subclass__`).

It is also where a method's defaults meet the base config: :func:`default_config` / :func:`resolve_config`
hand ``rayuda.config`` the method's knobs and stage schedules.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path
from typing import Any

from rayuda import config as _config
from rayuda.methods.base import METHODS, Method, Stage

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def register_plugins(modules: str) -> None:
    """Import ``modules`` (comma-separated import paths; ``$RAYUDA_METHODS``), whose :class:`Method` subclasses
    register themselves, so a method of your own runs in ``rayuda.train`` / ``rayuda.tune`` (and in every Ray
    worker) without a fork."""
    for module_name in filter(None, (m.strip() for m in modules.split(","))):
        try:
            importlib.import_module(module_name)
        except ImportError as err:
            raise _config.ConfigError(f"RAYUDA_METHODS: cannot import {module_name!r}: {err}") from None


register_plugins(os.environ.get("RAYUDA_METHODS", ""))


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise _config.ConfigError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}") from None


def default_config(name: str) -> dict[str, Any]:
    """The full default config of method ``name``: base defaults, its paper knobs and its stage schedules."""
    cls = get_method(name)
    return _config.default_config(name, cls.defaults, cls.schedules())


def resolve_config(
    name: str, overrides: dict[str, Any] | None = None, config_file: str | Path | None = None
) -> dict[str, Any]:
    """Defaults of method ``name`` ← ``config_file`` ← dotted ``overrides``; validated."""
    return _config.resolve_config(default_config(name), overrides, config_file)


def plan_of(cfg: dict[str, Any]) -> list[Stage]:
    """The stage plan of a resolved config."""
    return get_method(cfg["method"]).plan(cfg["params"])


__all__ = ["METHODS", "Method", "Stage", "default_config", "get_method", "plan_of", "register_plugins",
           "resolve_config"]
