"""Search spaces as data: ``search_spaces/<method>.yaml`` → an Optuna define-by-run space.

A space file names the method and its knobs. Each knob is a dotted config key (``params.w_adv``,
``stages.cram.lr``, ...) with a type and range, the paper's default and, optionally, a condition::

    method: cram
    knobs:
      params.w_adv: {type: float, low: 1.0e-4, high: 1.0e-2, log: true, default: 1.0e-3}
      params.style_layers: {type: categorical, choices: [layer1+layer2, layer2+layer3], default: layer1+layer2}
      params.style_weight:
        {type: float, low: 0.1, high: 0.9, default: 0.5, condition: {params.sfa: [true]}}

A knob with a ``condition`` exists only when every named knob (sampled or fixed) has one of the listed
values. Everything is validated by :func:`load_space` before Ray starts: unknown keys, bad types, empty
or inverted ranges, defaults outside their range, conditions on unknown knobs.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayuda.config import ConfigError, flatten, load_yaml, set_key
from rayuda.methods import default_config

#: Package data (shipped in the wheel); the checkout's top-level ``search_spaces/`` links here.
SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
KNOB_TYPES = ("float", "int", "categorical")
_KNOB_FIELDS = {"type", "low", "high", "log", "step", "choices", "default", "condition"}


@dataclass(frozen=True)
class Knob:
    name: str
    type: str
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    condition: dict[str, tuple] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what the pickled define-by-run function carries)."""
        return {
            "name": self.name, "type": self.type, "default": self.default, "low": self.low, "high": self.high,
            "log": self.log, "step": self.step, "choices": list(self.choices),
            "condition": {k: list(v) for k, v in self.condition.items()},
        }


@dataclass(frozen=True)
class SearchSpace:
    method: str
    knobs: tuple[Knob, ...]
    source: str

    def defaults(self, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
        """The paper's setting: each active knob at its default (the search's first trial)."""
        values = dict(fixed or {})
        out = {}
        for knob in self.knobs:
            if _active(knob.to_dict(), values):
                values[knob.name] = out[knob.name] = knob.default
        return out

    def without(self, fixed: dict[str, Any]) -> SearchSpace:
        """The space with the knobs fixed by ``--set`` taken out."""
        return SearchSpace(self.method, tuple(k for k in self.knobs if k.name not in fixed), self.source)


def space_path(method: str) -> Path:
    return SPACES_DIR / f"{method}.yaml"


def load_space(method: str, path: str | Path | None = None) -> SearchSpace:
    """Read and validate the search space of ``method`` (its packaged file unless ``path`` is given)."""
    path = Path(path) if path is not None else space_path(method)
    if not path.exists():
        raise ConfigError(f"search space file not found: {path}")
    data = load_yaml(path)
    where = str(path)
    file_method = data.get("method", method)
    if file_method != method:
        raise ConfigError(f"{where}: search space is for method {file_method!r}, not {method!r}")
    unknown = set(data) - {"method", "knobs"}
    if unknown:
        raise ConfigError(f"{where}: unknown top-level keys {sorted(unknown)}; expected 'method' and 'knobs'")
    raw = data.get("knobs")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}: 'knobs' must be a non-empty mapping of config key → knob")
    config_keys = flatten(default_config(method))
    knobs = tuple(_parse_knob(where, name, spec, config_keys) for name, spec in raw.items())
    names = {k.name for k in knobs}
    for knob in knobs:
        for other in knob.condition:
            if other not in names and other not in config_keys:
                raise ConfigError(f"{where}: knob {knob.name!r} has a condition on unknown key {other!r}")
    return SearchSpace(method, knobs, where)


def _parse_knob(where: str, name: str, spec: Any, config_keys: dict[str, Any]) -> Knob:
    at = f"{where}: knob {name!r}"
    if name not in config_keys:
        raise ConfigError(f"{at} is not a config key of this method; valid keys: {', '.join(sorted(config_keys))}")
    if not isinstance(spec, dict):
        raise ConfigError(f"{at} must be a mapping with 'type', a range or choices, and 'default'")
    extra = set(spec) - _KNOB_FIELDS
    if extra:
        raise ConfigError(f"{at} has unknown fields {sorted(extra)}; allowed: {sorted(_KNOB_FIELDS)}")
    kind = spec.get("type")
    if kind not in KNOB_TYPES:
        raise ConfigError(f"{at}: type must be one of {KNOB_TYPES}, got {kind!r}")
    if "default" not in spec:
        raise ConfigError(f"{at} has no 'default' (the paper's value)")
    default = spec["default"]
    condition = spec.get("condition") or {}
    if not isinstance(condition, dict):
        raise ConfigError(f"{at}: condition must map knob names to allowed values")
    condition = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in condition.items()}
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{at}: a categorical knob needs a non-empty 'choices' list")
        if default not in choices:
            raise ConfigError(f"{at}: default {default!r} is not among the choices {choices}")
        return Knob(name, kind, default, choices=tuple(choices), condition=condition)
    low, high = spec.get("low"), spec.get("high")
    numeric = (int,) if kind == "int" else (int, float)
    for label, value in (("low", low), ("high", high), ("default", default)):
        if isinstance(value, bool) or not isinstance(value, numeric):
            raise ConfigError(f"{at}: {label} must be a{'n int' if kind == 'int' else ' number'}, got {value!r}")
    if not low < high:
        raise ConfigError(f"{at}: low ({low}) must be below high ({high})")
    if not low <= default <= high:
        raise ConfigError(f"{at}: the default {default} lies outside the range [{low}, {high}]")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{at}: a log-scale range must be positive, got low={low}")
    return Knob(name, kind, default, low=low, high=high, log=log, step=spec.get("step"), condition=condition)


def _active(knob: dict[str, Any], values: dict[str, Any]) -> bool:
    return all(values.get(other) in allowed for other, allowed in knob["condition"].items())


def define_by_run(trial, knobs: list[dict[str, Any]], fixed: dict[str, Any]) -> None:
    """Optuna define-by-run space: suggest each knob whose condition holds (module level, so it pickles)."""
    values = dict(fixed)
    for knob in knobs:
        if not _active(knob, values):
            continue
        name = knob["name"]
        if knob["type"] == "categorical":
            values[name] = trial.suggest_categorical(name, knob["choices"])
        elif knob["type"] == "int":
            values[name] = trial.suggest_int(name, knob["low"], knob["high"], log=knob["log"], step=knob["step"] or 1)
        else:
            values[name] = trial.suggest_float(name, knob["low"], knob["high"], log=knob["log"], step=knob["step"])


def optuna_space(space: SearchSpace, fixed: dict[str, Any] | None = None):
    """The define-by-run callable for ``OptunaSearch(space=...)``."""
    return functools.partial(define_by_run, knobs=[k.to_dict() for k in space.knobs], fixed=dict(fixed or {}))


def config_for(configs: dict[str, dict[str, Any]], knobs: dict[str, Any]) -> dict[str, Any]:
    """A trial's resolved config: its method's base config (``configs[method]``) with the sampled knobs set.
    In a search across methods the knobs hold ``method`` and ``METHOD:key`` entries
    (:func:`rayuda.hpo.prepare.auto_space`)."""
    knobs = dict(knobs)
    method = knobs.pop("method", None) or next(iter(configs))
    cfg = copy.deepcopy(configs[method])
    for key, value in knobs.items():
        owner, _, name = key.rpartition(":")
        if owner in ("", method):
            set_key(cfg, name, value, source="search space")
    return cfg
