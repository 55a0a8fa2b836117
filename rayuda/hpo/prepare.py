"""Everything a search needs, validated before Ray starts: its methods, their configs, the space, the data.

:func:`prepare` turns the command line into a :class:`SearchPlan` — or raises :class:`ConfigError` /
:class:`DatasetError` naming what is wrong, so that a bad flag, knob or dataset costs no Ray start.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

from rayuda.config import ConfigError, flatten, parse_assignments, set_key
from rayuda.engine.plan import check_plan, final_stage, reported_iterations
from rayuda.hpo.space import Knob, SearchSpace, load_space
from rayuda.methods import METHODS, plan_of, resolve_config

AUTO = "auto"


@dataclass(frozen=True)
class ConfirmPlan:
    """The confirmation phase: the top ``top_k`` configs and the defaults on ``seeds`` fresh seeds; a config wins
    only by at least ``min_gain`` mIoU beyond seed noise."""

    top_k: int
    seeds: int
    min_gain: float


@dataclass(frozen=True)
class SearchPlan:
    """What a search runs, decided and checked by :func:`prepare`."""

    method: str  # the command's METHOD, or ``auto``
    configs: dict[str, dict[str, Any]]  # each method's resolved base config (a trial sets its knobs in a copy)
    space: SearchSpace  # what the searcher samples (for ``auto``: across methods)
    spaces: dict[str, SearchSpace]  # each method's own space, without the fixed knobs
    fixed: dict[str, Any]  # knobs fixed by --set / --max-iters
    max_iters: int  # the longest trial's step axis (ASHA's max_t)
    grace: int  # ASHA's grace period (and the evaluation interval unless --set)
    dropped: tuple  # data.bad_pairs=skip: the image/label pairs every trial leaves out
    num_samples: int
    sampler: str
    scheduler: str
    reduction_factor: float
    max_concurrent: int | None
    resources: dict[str, float]  # per trial: {"cpu": ..., "gpu": ...}
    max_failures: int
    confirm: ConfirmPlan | None  # None: --no-confirm

    @property
    def base(self) -> dict[str, Any]:
        """The first method's config (seed, data and metric are the same in every method's config)."""
        return next(iter(self.configs.values()))

    @property
    def metric(self) -> str:
        return self.base["train"]["metric"]

    def defaults_of(self, method: str) -> dict[str, Any]:
        """The knobs of ``method`` at the paper's values, as the search's params (prefixed for ``auto``)."""
        defaults = self.spaces[method].defaults(self.fixed)
        if self.space.method != AUTO:
            return defaults
        return {"method": method, **{f"{method}:{k}": v for k, v in defaults.items()}}


def search_methods(method: str, methods: str | None, *, config: str | None = None, space: str | None = None
                   ) -> list[str]:
    """The methods a search covers: ``method``, or for ``auto`` the ``--methods`` list (default: every
    adaptation method)."""
    if method != AUTO:
        if methods:
            raise ConfigError("--methods is for `python -m rayuda.tune auto`")
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; valid methods: {AUTO}, {', '.join(sorted(METHODS))}")
        return [method]
    names = methods.split(",") if methods else sorted(set(METHODS) - {"source_only"})
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ConfigError(f"--methods: unknown {unknown}; valid methods: {', '.join(sorted(METHODS))}")
    if config or space:
        raise ConfigError("`auto` takes neither --config nor --space: it uses each method's search space; "
                          "fix keys with --set")
    return names


def method_config(args, method: str, overrides: dict[str, Any], auto: bool) -> dict[str, Any]:
    """``method``'s resolved config with the command line applied (for ``auto``: the keys it has)."""
    keys = set(flatten(resolve_config(method))) | {k for k in overrides if k.split(".")[0] in ("source", "target")}
    mine = {k: v for k, v in overrides.items() if not auto or k in keys or any(k.startswith(p + ".") for p in keys)}
    cfg = resolve_config(method, mine, args.config)
    if args.max_iters is not None:
        set_key(cfg, f"stages.{final_stage(cfg)}.iters", args.max_iters, source="--max-iters")
    return cfg


def check_flags(args) -> None:
    """Counts and ranges of the command line, before anything is resolved."""
    for flag, value in (("--num-samples", args.num_samples), ("--max-iters", args.max_iters),
                        ("--confirm-seeds", args.confirm_seeds)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be ≥ 1, got {value}")
    if args.max_failures < 0:
        raise ConfigError(f"--max-failures must be ≥ 0, got {args.max_failures}")
    if not args.no_confirm and (args.confirm_top < 0 or args.confirm_seeds < 1 or args.min_gain < 0):
        raise ConfigError("--confirm-top must be ≥ 0, --confirm-seeds ≥ 1 and --min-gain ≥ 0 (or --no-confirm)")


def command_overrides(args) -> dict[str, Any]:
    """``--set`` and the flags that stand for config keys, as dotted overrides."""
    overrides = parse_assignments(args.set)
    for key, value in (("source", args.source), ("target", args.target), ("seed", args.seed),
                       ("train.metric", args.metric), ("data.holdout", args.holdout),
                       ("data.test_fraction", args.test_fraction), ("train.deterministic", args.deterministic or None)):
        if value is not None:
            overrides[key] = value
    return overrides


def prepare(args) -> SearchPlan:
    """Validate everything the search needs before Ray starts: methods, configs, space, data specs."""
    check_flags(args)
    methods = search_methods(args.method, args.methods, config=args.config, space=args.space)
    auto = args.method == AUTO
    overrides = command_overrides(args)
    configs = {m: method_config(args, m, overrides, auto) for m in methods}
    if auto:
        unused = [k for k in overrides if not any(k in flatten(c) for c in configs.values())]
        if unused:
            raise ConfigError(f"--set {', '.join(unused)}: no method of the search has this key")
    space, spaces, fixed = search_space(args, methods, configs, overrides)
    max_iters = max(longest_trial(configs[m], spaces[m]) for m in methods)
    grace = args.grace or max(1, max_iters // 4)
    if not 0 < grace <= max_iters:
        raise ConfigError(f"--grace must lie in 1..{max_iters} (the trial length), got {grace}")
    if "train.eval_every" not in overrides:
        for cfg in configs.values():
            cfg["train"]["eval_every"] = grace  # ASHA needs a score at each rung
    dropped = check_data(configs, auto)
    return SearchPlan(
        method=args.method, configs=configs, space=space, spaces=spaces, fixed=fixed, max_iters=max_iters,
        grace=grace, dropped=tuple(dropped), num_samples=args.num_samples, sampler=args.sampler,
        scheduler=args.scheduler, reduction_factor=args.reduction_factor, max_concurrent=args.max_concurrent,
        resources={"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}, max_failures=args.max_failures,
        confirm=None if args.no_confirm else ConfirmPlan(args.confirm_top, args.confirm_seeds, args.min_gain))


def check_data(configs: dict[str, dict[str, Any]], auto: bool) -> list:
    """What ``run_pipeline`` checks before any compute, once for the whole search: each method's plan with its
    selection metric and evaluation protocol resolved, the data specs, the holdout, and every input (G builds,
    every image and label decodes). Returns the bad pairs ``data.bad_pairs=skip`` drops."""
    from rayuda.engine.pipeline import (
        check_inputs,
        describe_holdout,
        dropped_lines,
        open_inputs,
        resolve_eval_protocol,
        resolve_selection_metric,
    )

    cfg = next(iter(configs.values()))
    datasets = open_inputs(cfg)  # the command line and --config set the data for every method of the search
    class_names = list(datasets[("source", "train")].class_names)
    requested = cfg["train"]["metric"]
    for method_cfg in configs.values():
        metric = resolve_selection_metric(method_cfg)  # `auto` → what it means for this target, in every trial
        resolve_eval_protocol(method_cfg)  # null → label (a real dataset) or resized (minicity), in every trial
        check_plan(plan_of(method_cfg), method_cfg)
    if requested != metric:
        print(f"selection metric {requested!r} → {metric!r} (the target holdout "
              f"{'is' if metric == 'miou' else 'is not'} labelled)", flush=True)
    describe_holdout(cfg)  # refuses miou on a target without labels, an empty selection (before decoding)
    dropped = {}  # data.bad_pairs=skip: the image/label pairs of different sizes every trial leaves out
    for method_cfg in configs.values():
        dropped.update({pair.image: pair for pair in check_inputs(method_cfg, class_names, datasets)})
    dropped = list(dropped.values())
    if dropped:
        print("\n".join(dropped_lines(dropped)), flush=True)
    print(describe_holdout(cfg, frozenset(p.image for p in dropped)), flush=True)
    if auto and metric != "miou":
        print(f"WARNING: comparing methods on the label-free {metric!r} score favours methods that minimise "
              f"entropy (minent, advent, fgdem); prefer a few labelled target images and --metric miou", flush=True)
    return dropped


def search_space(args, methods: list[str], configs: dict[str, dict[str, Any]], overrides: dict[str, Any]
                 ) -> tuple[SearchSpace, dict[str, SearchSpace], dict[str, Any]]:
    """The space the searcher samples, each method's own space and the knobs the command line fixes; every
    knob's extreme values checked against its method's config."""
    spaces = {m: load_space(m, args.space) for m in methods}
    fixed = {k: v for k, v in overrides.items() if any(k in {kn.name for kn in sp.knobs} for sp in spaces.values())}
    if args.max_iters is not None:
        fixed.update({f"stages.{final_stage(configs[m])}.iters": args.max_iters for m in methods})
    spaces = {m: sp.without(fixed) for m, sp in spaces.items()}
    for m in methods:
        check_knob_values(spaces[m], configs[m])
    space = auto_space(spaces) if args.method == AUTO else spaces[methods[0]]
    if not space.knobs:
        raise ConfigError("every knob of the search space is fixed by --set: nothing to search")
    return space, spaces, fixed


def check_knob_values(space: SearchSpace, cfg: dict[str, Any]) -> None:
    """Each knob's extreme values (a categorical knob's every choice) set into the method's config and its plan
    checked, so a knob whose type or range its config key cannot take fails here rather than in every trial."""
    for knob in space.knobs:
        for value in knob.choices if knob.type == "categorical" else (knob.low, knob.high):
            trial_cfg = copy.deepcopy(cfg)
            try:
                set_key(trial_cfg, knob.name, value, source=f"{space.source}: knob {knob.name}")
                check_plan(plan_of(trial_cfg), trial_cfg)
            except ConfigError as err:
                raise ConfigError(f"{space.source}: knob {knob.name} = {value!r} cannot run: {err}") from None


def auto_space(spaces: dict[str, SearchSpace]) -> SearchSpace:
    """One space over several methods: ``method`` is a categorical knob (the first method's paper defaults are
    the first trial) and each method's knobs, named ``METHOD:key`` (not ``/``: Ray nests such keys), exist only
    when it is chosen."""
    methods = list(spaces)
    knobs = [Knob("method", "categorical", methods[0], choices=tuple(methods))]
    for method, space in spaces.items():
        own = {k.name for k in space.knobs}
        for knob in space.knobs:
            condition = {(f"{method}:{k}" if k in own else k): v for k, v in knob.condition.items()}
            knobs.append(replace(knob, name=f"{method}:{knob.name}", condition={**condition, "method": (method,)}))
    return SearchSpace(AUTO, tuple(knobs), ", ".join(sp.source for sp in spaces.values()))


def longest_trial(cfg: dict[str, Any], space) -> int:
    """The longest step axis a trial can have (ASHA's ``max_t``): reported iterations with every searched
    ``stages.*.iters`` knob at its high end, and the longest plan any value of a categorical or int knob
    gives (e.g. ``params.rounds``)."""
    longest = copy.deepcopy(cfg)
    for knob in space.knobs:
        if knob.name.startswith("stages.") and knob.name.endswith(".iters"):
            set_key(longest, knob.name, knob.high, source="search space")
    best = reported_iterations(longest)
    for knob in space.knobs:
        if knob.name.startswith("params.") and knob.type in ("categorical", "int"):
            values = knob.choices if knob.type == "categorical" else range(knob.low, knob.high + 1, knob.step or 1)
            for value in list(values)[:16]:
                variant = copy.deepcopy(longest)
                set_key(variant, knob.name, value, source="search space")
                best = max(best, reported_iterations(variant))
    return best
