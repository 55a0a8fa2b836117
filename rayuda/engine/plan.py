"""A plan's stages as the engine sees them: the config slice each stage reads, its chained cache key,
and the trial's step axis (iterations counted across reported stages).

A stage receives *only* its slice (a :class:`ConfigSlice`): reading any other key raises, so a setting can
never influence a stage without being part of its cache key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rayuda.config import ConfigError
from rayuda.data.transforms import config_transform
from rayuda.data.verify import BAD_PAIR_POLICIES
from rayuda.engine.evaluate import AUTO, SELECTION_METRICS
from rayuda.methods import plan_of
from rayuda.methods.base import Stage

#: Bump when the engine changes what any stage computes (invalidates every cache entry).
ENGINE_VERSION = 2  # 2: transforms via torchvision.transforms.v2 (other random draws), per-domain sizes

#: What every train stage reads: seeds, the transform, G's architecture and init, the optimiser.
TRAIN_KEYS = ("seed", "protocol", "data.batch_size", "data.size", "data.crop", "data.source", "data.target",
              "data.flip", "data.jitter", "data.augment",
              "model", "optim.momentum", "optim.weight_decay", "optim.power", "train.amp", "train.amp_dtype",
              "train.deterministic", "train.ema")
#: Read by train stages whose method adds discriminators.
ADVERSARIAL_KEYS = ("optim.lr_d", "optim.betas")
#: Read by reported stages only: their evaluations on the target holdout and the probe (rayuda.engine.probe).
EVALUATION_KEYS = ("target", "data.holdout", "data.test_fraction", "data.max_selection", "data.split_seed",
                   "train.metric", "train.eval_every", "train.num_masks", "train.probe_images", "source")
#: What a pseudo-label pass reads: the target images at the evaluation size, and G's architecture.
PASS_KEYS = ("protocol", "target", "data.size", "data.target.size", "model")


class StageConfigError(ConfigError):
    """A stage read a config key outside its slice (its cache key would not cover the key)."""


class ConfigSlice(dict):
    """A read-only-by-convention view of part of a config; a missing key raises :class:`StageConfigError`."""

    def __init__(self, data: dict[str, Any], stage: str, path: str = ""):
        super().__init__({k: ConfigSlice(v, stage, f"{path}{k}.") if isinstance(v, dict) else v
                          for k, v in data.items()})
        self.stage, self.path = stage, path

    def __missing__(self, key: str):
        raise StageConfigError(
            f"stage {self.stage!r} read config key {self.path}{key!r}, which is not in its slice (so its cache "
            f"key does not cover it); declare it in rayuda/engine/plan.py")

    def plain(self) -> dict[str, Any]:
        return {k: v.plain() if isinstance(v, ConfigSlice) else v for k, v in self.items()}


def _lookup(cfg: dict[str, Any], dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _insert(out: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        out = out.setdefault(part, {})
    out[leaf] = value


def stage_keys(stage: Stage) -> list[str]:
    """The dotted config keys (or sub-trees) ``stage`` reads."""
    if stage.kind == "pseudo_labels":
        keys = list(PASS_KEYS)
    else:
        keys = [*TRAIN_KEYS, f"stages.{stage.name}"]
        if "source" in (stage.labelled, stage.unlabelled):
            keys.append("source")
        if stage.unlabelled is not None or ":" in (stage.labelled or ""):
            keys.append("target")
        if stage.step.has_discriminators:
            keys += ADVERSARIAL_KEYS
        if stage.reported:
            keys += EVALUATION_KEYS
    if stage.params:
        keys.append(stage.params)
    return sorted(set(keys))


#: ``data.eval_protocol`` values, and the one every evaluation used before the key existed.
EVAL_PROTOCOLS, LEGACY_EVAL_PROTOCOL = ("label", "resized"), "resized"
#: ``train.bn_stats`` values, and the one every stage used before the key existed.
BN_STATS, LEGACY_BN_STATS = ("target", "mixed"), "mixed"


def holds_source_statistics(stage: Stage, cfg: dict[str, Any]) -> bool:
    """Whether ``stage``'s source forwards leave G's BatchNorm running statistics to the target's
    (``train.bn_stats: target``, a train stage on the source beside unlabelled target images)."""
    return (stage.kind == "train" and stage.labelled == "source" and stage.unlabelled is not None
            and cfg["train"].get("bn_stats", LEGACY_BN_STATS) == "target")


def stage_slice(cfg: dict[str, Any], stage: Stage, inputs: dict[str, str] | None = None) -> ConfigSlice:
    """Exactly the part of ``cfg`` that ``stage`` reads. A reported stage reads ``data.eval_protocol`` too; it
    enters the slice (and the key) only when it is not :data:`LEGACY_EVAL_PROTOCOL`, so stages cached before the
    key existed keep their keys (they were evaluated that way), and the evaluation reads it with that default.
    ``train.bn_stats`` likewise enters the slices of the stages it changes (:func:`holds_source_statistics`)
    only when it is not :data:`LEGACY_BN_STATS`.

    ``inputs``: digests of the files a config key names (``source``, ``target``, ``model`` for ``model.init``;
    :func:`rayuda.engine.pipeline.input_digests`); each enters the slice as ``inputs.KEY`` of the stages that read
    that key, so a stage is not served from the cache for files changed since it was computed."""
    out: dict[str, Any] = {}
    read = stage_keys(stage)
    for dotted in read:
        _insert(out, dotted, _lookup(cfg, dotted))
    for key, digest in sorted((inputs or {}).items()):
        if key in read:
            _insert(out, f"inputs.{key}", digest)
    protocol = cfg["data"].get("eval_protocol")
    if stage.reported and protocol not in (None, LEGACY_EVAL_PROTOCOL):
        _insert(out, "data.eval_protocol", protocol)
    if holds_source_statistics(stage, cfg):  # "mixed" stays out of the keys: stages cached before keep theirs
        _insert(out, "train.bn_stats", cfg["train"]["bn_stats"])
    return ConfigSlice(out, stage.name)


def stage_identity(stage: Stage) -> dict[str, Any]:
    """Everything about a stage's definition that determines its output (beside its config slice).

    The code is named by its ``name`` (not its module), and the data slots by the names they had when the first
    stages were cached, ``source`` (:attr:`Stage.labelled`) and ``target`` (:attr:`Stage.unlabelled`): stages
    cached before the slots were renamed keep their keys (``tests/test_plan.py`` pins one)."""
    code = stage.step or stage.labeller
    return {"engine": ENGINE_VERSION, "name": stage.name, "kind": stage.kind, "code": code.name,
            "version": code.version, "source": stage.labelled, "target": stage.unlabelled, "init": stage.init,
            "teacher": stage.teacher, "reported": stage.reported}


def stage_key(stage: Stage, config_slice: ConfigSlice, upstream: str | None) -> str:
    """hash(stage definition and code version, its config slice, its upstream stage's key)."""
    text = json.dumps({"stage": stage_identity(stage), "config": config_slice.plain(), "upstream": upstream},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_params(cfg: dict[str, Any], stage: Stage) -> dict[str, Any]:
    """The knobs a stage reads as ``ctx.params`` or its labeller's params (the sub-tree at ``stage.params``)."""
    node = cfg
    for part in stage.params.split(".") if stage.params else ():
        node = node[part]
    return node if stage.params else {}


def check_plan(plan: list[Stage], cfg: dict[str, Any]) -> None:
    """Refuse a plan the engine cannot run, before any compute: unknown kinds, missing schedules, references
    to stages that do not come earlier, no reported stage; then the run settings every stage reads."""
    seen: dict[str, Stage] = {}
    for stage in plan:
        where = f"{cfg['method']} plan, stage {stage.name!r}"
        if stage.name in seen:
            raise ConfigError(f"{where}: the name is used twice")
        if stage.kind == "train":
            _check_train_stage(stage, cfg, seen, where)
        elif stage.kind == "pseudo_labels":
            _check_pseudo_label_stage(stage, cfg, seen, where)
        else:
            raise ConfigError(f"{where}: unknown kind {stage.kind!r} (train or pseudo_labels)")
        seen[stage.name] = stage
    if not any(s.reported for s in plan):
        raise ConfigError(f"{cfg['method']} plan reports no stage to the search")
    _check_settings(cfg)


def _check_train_stage(stage: Stage, cfg: dict[str, Any], seen: dict[str, Stage], where: str) -> None:
    """A train stage's step method, its schedule, and the earlier stages its data, init and teacher name."""
    if stage.step is None:
        raise ConfigError(f"{where}: a train stage needs a step method")
    if stage.name not in cfg["stages"]:
        raise ConfigError(f"{where}: no schedule stages.{stage.name} in the config")
    schedule = cfg["stages"][stage.name]
    if not isinstance(schedule.get("iters"), int) or schedule["iters"] < 0:
        raise ConfigError(f"stages.{stage.name}.iters must be an int ≥ 0, got {schedule.get('iters')!r}")
    if not schedule.get("lr", 0) > 0:
        raise ConfigError(f"stages.{stage.name}.lr must be > 0, got {schedule.get('lr')!r}")
    decay = schedule.get("decay_iters")
    if decay is not None and (type(decay) is not int or decay < schedule["iters"]):
        raise ConfigError(f"stages.{stage.name}.decay_iters must be null or an int ≥ stages.{stage.name}.iters "
                          f"({schedule['iters']}), got {decay!r}")
    for role in (stage.labelled, stage.unlabelled):
        if role and ":" in role:
            ref, _, _ = role.partition(":")
            if seen.get(ref) is None or seen[ref].kind != "pseudo_labels":
                raise ConfigError(f"{where}: {role!r} needs an earlier pseudo_labels stage {ref!r}")
        elif role not in (None, "source", "target"):
            raise ConfigError(f"{where}: data {role!r} is not source, target or STAGE:SUBSET")
    for ref in {stage.init, stage.teacher} - {None, "upstream", "model.init"}:
        if seen.get(ref) is None or seen[ref].kind != "train":
            raise ConfigError(f"{where}: {ref!r} is not an earlier train stage")


def _check_pseudo_label_stage(stage: Stage, cfg: dict[str, Any], seen: dict[str, Stage], where: str) -> None:
    """A pseudo-label stage's labeller (made once from its knobs) and the earlier model it labels with."""
    if stage.labeller is None:
        raise ConfigError(f"{where}: a pseudo_labels stage needs a labeller")
    if not any(s.kind == "train" for s in seen.values()):
        raise ConfigError(f"{where}: a pseudo_labels stage needs an earlier train stage's model")
    try:  # a labeller checks its knobs when it is made: made once here, before any compute
        stage.labeller(stage_params(cfg, stage), ["class"] * 2)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {stage.params}: {err}") from None


def _check_settings(cfg: dict[str, Any]) -> None:
    """The run settings: selection metric and probe, evaluation protocol, bad pairs, EMA, intervals, transforms."""
    train = cfg["train"]
    if train["metric"] not in (*SELECTION_METRICS, AUTO):
        raise ConfigError(f"train.metric {train['metric']!r} is not a selection metric; valid: "
                          f"{', '.join([*SELECTION_METRICS, AUTO])}")
    probes = train["probe_images"]
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 0:
        raise ConfigError(f"train.probe_images must be an int ≥ 0 (0: store no probe predictions), got {probes!r}")
    needs_probe = SELECTION_METRICS.get(train["metric"], ("",))[0].startswith("proxy/")
    if needs_probe and probes == 0:
        raise ConfigError(f"train.metric {train['metric']!r} is computed on the probe images: "
                          "train.probe_images must be ≥ 1")
    if cfg["data"]["eval_protocol"] not in (None, *EVAL_PROTOCOLS):
        raise ConfigError(f"data.eval_protocol must be one of {', '.join(EVAL_PROTOCOLS)} or null (chosen per target "
                          f"spec), got {cfg['data']['eval_protocol']!r}")
    if cfg["data"]["bad_pairs"] not in BAD_PAIR_POLICIES:
        raise ConfigError(f"data.bad_pairs must be one of {', '.join(BAD_PAIR_POLICIES)}, got "
                          f"{cfg['data']['bad_pairs']!r}")
    if train["bn_stats"] not in BN_STATS:
        raise ConfigError(f"train.bn_stats must be one of {', '.join(BN_STATS)}, got {train['bn_stats']!r}")
    ema = train["ema"]
    if isinstance(ema, bool) or not isinstance(ema, int | float) or not 0 <= ema < 1:
        raise ConfigError(f"train.ema must be a number in [0, 1) (the average's decay; 0: none), got {ema!r}")
    for key in ("eval_every", "log_every"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ConfigError(f"train.{key} must be an int ≥ 1, got {train[key]!r}")
    for role in ("source", "target"):  # sizes, crops, data.augment, model.preprocessing: refused before any compute
        try:
            config_transform(cfg, role, train=True)
        except ValueError as err:
            raise ConfigError(f"the {role} images' transform (data.{role}.*, data.*, model.preprocessing): {err}") \
                from None


def reported_stages(cfg: dict[str, Any]) -> list[Stage]:
    return [s for s in plan_of(cfg) if s.reported]


def reported_iterations(cfg: dict[str, Any]) -> int:
    """The trial's step axis: iterations summed over the reported stages (ASHA's ``max_t``)."""
    return sum(int(cfg["stages"][s.name]["iters"]) for s in reported_stages(cfg))


def final_stage(cfg: dict[str, Any]) -> str:
    """The last reported stage (what ``--iters`` sets)."""
    return reported_stages(cfg)[-1].name
