"""``run_pipeline``: a method's stage plan, end to end — the single entry point of ``rayuda.train`` and of
every Ray Tune trial.

Each stage of the plan (``Method.plan``) runs in its own folder of the stage cache, keyed by a hash of
its definition, the config slice it reads and its upstream stage's key (``rayuda.engine.plan``); a done
stage is reused, an interrupted one resumes. Reported stages report each evaluation on one step axis
(iterations counted across reported stages); a cached reported stage replays its recorded evaluations.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import Subset

from rayuda.config import ConfigError, cache_root, flatten, save_config
from rayuda.data import SegmentationDataset, open_dataset, with_pseudo_labels
from rayuda.data.split import SMALL_TEST, split_images
from rayuda.data.transforms import OwnLabelSize, Transform, config_transform
from rayuda.data.verify import BadPair, content_digest, drop_pairs, refuse_bad_pairs, verify_pairs
from rayuda.engine.accel import pick_device
from rayuda.engine.cache import cached_stage, stage_record
from rayuda.engine.checkpoint import load_checkpoint, seed_everything
from rayuda.engine.evaluate import AUTO, SELECTION_METRICS, evaluate, resolve_metric
from rayuda.engine.loop import RESUME_STATE, Report, Runtime, StageData, train_stage
from rayuda.engine.passes import LABELS, STATS, pseudo_label_pass
from rayuda.engine.plan import (
    LEGACY_BN_STATS,
    LEGACY_EVAL_PROTOCOL,
    ConfigSlice,
    check_plan,
    holds_source_statistics,
    stage_identity,
    stage_key,
    stage_params,
    stage_slice,
)
from rayuda.engine.probe import open_probe
from rayuda.methods import plan_of, resolve_config
from rayuda.methods.base import Stage
from rayuda.models import build_segmenter


def default_cache_dir() -> Path:
    return cache_root() / "stages"


@dataclass
class PlanRun:
    """What a run of a plan has so far: each done stage's folder, and the reported evaluations."""

    cfg: dict[str, Any]
    runtime: Runtime
    class_names: list[str]
    dirs: dict[str, Path] = field(default_factory=dict)
    last_train: str | None = None
    skip: frozenset[str] = frozenset()  # image paths of the bad pairs data.bad_pairs=skip drops (check_inputs)
    inputs: dict[str, str] = field(default_factory=dict)  # digests of the files the config names (input_digests)
    evals: list[dict[str, Any]] = field(default_factory=list)


def _train_transform(cfg, what: str | None) -> Transform | None:
    """The training transform of a stage's data ``what``: the source's, or the target's (``target`` and
    ``STAGE:SUBSET``, target images): per-domain size and crop (``data.<role>.*``), augmentations, preprocessing."""
    return None if what is None else config_transform(cfg, "source" if what == "source" else "target", train=True)


def _eval_transform(cfg) -> Transform:
    """Target images as G sees them at evaluation (pseudo-label passes too): the target's size, no randomness."""
    return config_transform(cfg, "target", train=False)


def eval_protocol(cfg) -> str:
    """How ``cfg``'s target holdout is scored (``data.eval_protocol``); ``null`` stands for ``label`` — each label
    at its own resolution, as the papers and ``rayuda.predict`` score — on the real datasets (``gta5:``,
    ``synthia:``, ``cityscapes:``, ``folder:``) and ``resized`` on minicity (its benchmarks were measured so).
    Absent from a stage's slice: ``resized`` (see :func:`rayuda.engine.plan.stage_slice`)."""
    value = cfg["data"].get("eval_protocol", LEGACY_EVAL_PROTOCOL)
    if value is None:
        value = LEGACY_EVAL_PROTOCOL if str(cfg["target"]).partition(":")[0] == "minicity" else "label"
    return value


def resolve_eval_protocol(cfg) -> str:
    """Replace ``data.eval_protocol: null`` in ``cfg`` by what it stands for (:func:`eval_protocol`), before
    anything is saved or keyed; return it."""
    cfg["data"]["eval_protocol"] = eval_protocol(cfg)
    return cfg["data"]["eval_protocol"]


def _holdout_transform(cfg) -> Transform | OwnLabelSize:
    """The target holdout as it is scored: images as G sees them at evaluation and, with ``data.eval_protocol:
    label``, each label at its own size (:class:`~rayuda.data.transforms.OwnLabelSize`; ``evaluate`` then runs
    one image at a time), else the label resized with the image. In a stage's slice the key is absent when it
    is the legacy ``resized`` (see :func:`rayuda.engine.plan.stage_slice`)."""
    images = _eval_transform(cfg)
    if eval_protocol(cfg) == "label":
        return OwnLabelSize(images.size, images.preprocessing)
    return images


def _train_set(run: PlanRun, cfg, what: str | None, transform: Transform):
    """The dataset a train stage names: ``source``, ``target`` or ``STAGE:SUBSET`` (pseudo-labelled)."""
    if what is None:
        return None
    if what in ("source", "target"):
        return drop_pairs(open_dataset(cfg[what], "train", role=what, protocol=cfg["protocol"], transform=transform,
                                       seed=cfg["seed"]), run.skip)
    ref, _, subset = what.partition(":")
    target = drop_pairs(open_dataset(cfg["target"], "train", role="target", protocol=cfg["protocol"],
                                     transform=transform, seed=cfg["seed"]), run.skip)
    stats = json.loads((run.dirs[ref] / STATS).read_text())
    if subset not in stats["subsets"]:
        raise ConfigError(f"stage {ref!r} made no subset {subset!r}; it made {sorted(stats['subsets'])}")
    return with_pseudo_labels(target, run.dirs[ref] / LABELS, stats["subsets"][subset], what)


def holdout_parts(cfg, skip: frozenset[str] = frozenset()) -> tuple[Subset, Subset | None]:
    """The target holdout's *selection* part (the search's score, checkpoint choice) and *test* part (the
    numbers reported as results; ``None`` when empty). With ``miou`` the labelled images are split by a seeded
    hash of their names (``data.test_fraction``, ``data.split_seed``; at most ``data.max_selection`` select);
    with a label-free metric every holdout image serves the proxy and every labelled one is test. ``skip``: image
    paths of bad pairs to leave out."""
    holdout = drop_pairs(open_dataset(cfg["target"], "val", role="target", protocol=cfg["protocol"],
                                      transform=_holdout_transform(cfg), seed=cfg["seed"]), skip)
    count = len(holdout) if cfg["data"]["holdout"] is None else min(int(cfg["data"]["holdout"]), len(holdout))
    if count < 1:
        raise ConfigError(f"data.holdout={cfg['data']['holdout']} leaves no target holdout image to evaluate on "
                          f"({len(holdout)} available); set it ≥ 1, or null for all")
    if SELECTION_METRICS[cfg["train"]["metric"]][0] != "miou":
        return Subset(holdout, range(count)), Subset(holdout, range(count)) if holdout.has_labels else None
    if not holdout.has_labels:
        proxies = ", ".join([AUTO, *(m for m, (key, _) in SELECTION_METRICS.items() if key != "miou")])
        raise ConfigError(f"target {cfg['target']!r} has no labels, so --metric miou cannot be computed; choose a "
                          f"label-free proxy: --metric {{{proxies}}} (or --set train.metric=...)")
    names = [holdout.files[i][0].name for i in range(count)]
    try:
        select, test = split_images(names, float(cfg["data"]["test_fraction"]), int(cfg["data"]["split_seed"]),
                                    cfg["data"]["max_selection"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not select:
        raise ConfigError(f"the selection part of the target holdout is empty ({count} labelled images, "
                          f"data.test_fraction={cfg['data']['test_fraction']}): lower data.test_fraction")
    return Subset(holdout, select), Subset(holdout, test) if test else None


def resolve_selection_metric(cfg) -> str:
    """Replace ``train.metric: auto`` in ``cfg`` by what it means for this target (``miou`` when its holdout is
    labelled, else :data:`rayuda.engine.evaluate.AUTO_UNLABELLED`); return the metric."""
    if cfg["train"]["metric"] == AUTO:
        holdout = open_dataset(cfg["target"], "val", role="target", protocol=cfg["protocol"])
        cfg["train"]["metric"] = resolve_metric(AUTO, holdout.has_labels)
    return resolve_metric(cfg["train"]["metric"], True)


def describe_holdout(cfg, skip: frozenset[str] = frozenset()) -> str:
    """One line saying which images produce which number, with a warning when the test part is too small."""
    select, test = holdout_parts(cfg, skip)
    metric = cfg["train"]["metric"]
    protocol = eval_protocol(cfg)
    scored = "each label at its own size" if protocol == "label" else "labels resized to the target size"
    line = (f"target holdout: {len(select)} images select ({metric}), "
            f"{len(test) if test else 0} labelled images test (reported mIoU); scored with {scored} "
            f"(data.eval_protocol={protocol})")
    if test is None:
        line += "; WARNING: no test images, results are reported on the selection images"
    elif len(test) < SMALL_TEST:
        line += f"; WARNING: under {SMALL_TEST} test images cannot separate candidates ~1 mIoU apart"
    return line


def _load_model(run: PlanRun, cfg, stage_name: str | None) -> torch.nn.Module:
    """G built from ``model`` (its ``init`` applied), with the final weights of train stage ``stage_name``."""
    model = build_segmenter(cfg["model"], len(run.class_names))
    if stage_name is not None:
        model.load_state_dict(load_checkpoint(run.dirs[stage_name] / "model.pt"))
    return model.to(run.runtime.device)


def _train(run: PlanRun, stage: Stage, index: int, cfg, work_dir: Path, report: Report | None) -> dict[str, Any]:
    deterministic = bool(cfg["train"]["deterministic"])
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    torch.use_deterministic_algorithms(deterministic)
    seed = int(cfg["seed"]) + index
    seed_everything(seed)
    init = {"upstream": run.last_train, "model.init": None}.get(stage.init, stage.init)
    model = _load_model(run, cfg, init)
    frozen = {"teacher": _load_model(run, cfg, stage.teacher)} if stage.teacher else {}
    data = StageData(labelled=_train_set(run, cfg, stage.labelled, _train_transform(cfg, stage.labelled)),
                     unlabelled=_train_set(run, cfg, stage.unlabelled, _train_transform(cfg, stage.unlabelled)),
                     holdout=holdout_parts(cfg, run.skip)[0] if stage.reported else None,
                     class_names=run.class_names, frozen=frozen,
                     probe=open_probe(cfg, _eval_transform(cfg), run.skip) if stage.reported else None,
                     hold_source_statistics=holds_source_statistics(stage, cfg))
    seed_everything(seed)
    result = train_stage(label=stage.name, config=cfg, params=stage_params(cfg, stage), method=stage.step(),
                         model=model, data=data, work_dir=work_dir, runtime=run.runtime, report=report)
    keep = ("miou", "score", "best_score", "best_iteration")
    return {"iterations": int(cfg["stages"][stage.name]["iters"]), **{k: result[k] for k in keep if k in result}}


def _pseudo_labels(run: PlanRun, stage: Stage, cfg, work_dir: Path) -> dict[str, Any]:
    model = _load_model(run, cfg, run.last_train)
    dataset = drop_pairs(open_dataset(cfg["target"], "train", role="target", protocol=cfg["protocol"],
                                      transform=_eval_transform(cfg)), run.skip)
    labeller = stage.labeller(stage_params(cfg, stage), run.class_names)
    return pseudo_label_pass(model, dataset, labeller, work_dir, device=run.runtime.device)


def environment() -> dict[str, Any]:
    """What the numbers depend on beyond the config: library, CUDA and cuDNN versions, the code (rayuda's
    version, the git commit and dirty flag from a checkout: :func:`rayuda.provenance.provenance`), the processor,
    threads."""
    import platform

    from rayuda.provenance import provenance

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {**provenance(), "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled()}


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes a hard link to (or, across file systems, a copy of) ``src``."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_probe(stage_dir: Path, metrics: dict[str, Any], out_dir: Path) -> None:
    """Link an evaluation's stored probe (``STAGE/probe/eval_<stage iteration>.npz``) into the run folder as
    ``probe/eval_<global iteration, 6 digits>.npz``, so every trial's predictions sit in its own folder."""
    src = stage_dir / "probe" / f"eval_{metrics['stage_iteration']}.npz"
    if src.is_file():
        (out_dir / "probe").mkdir(exist_ok=True)
        _link(src, out_dir / "probe" / f"eval_{metrics['iteration']:06d}.npz")


#: Keys that change no result: a run folder resumes (or is reused) under new values of these.
#: ``data.bad_pairs`` is one too: a run that ``refuse`` lets through has no bad pair, so ``skip`` drops nothing
#: from it (that is also why the key is in no stage's cache key).
BOOKKEEPING = ("train.log_every", "train.num_masks", "data.num_workers", "train.channels_last",
               "train.cudnn_benchmark", "train.compile",  # these three: GPU speed (rayuda.engine.accel)
               "data.bad_pairs")


#: Keys added after runs were saved, with the value those runs used (a saved config without the key is that run).
LEGACY = {"data.eval_protocol": LEGACY_EVAL_PROTOCOL, "train.bn_stats": LEGACY_BN_STATS}


#: The (role, split) of every dataset a run reads: the source's training images, the target's training images and
#: its holdout. :func:`check_inputs` verifies exactly these and :func:`input_digests` digests exactly these.
READ_SPLITS = (("source", "train"), ("target", "train"), ("target", "val"))

#: The datasets of :data:`READ_SPLITS`, opened (each folder listed once) by :func:`open_inputs`.
Inputs = dict[tuple[str, str], SegmentationDataset]


def open_inputs(cfg: dict[str, Any]) -> Inputs:
    """Open every dataset of :data:`READ_SPLITS` once, for :func:`input_digests` and :func:`check_inputs` to share
    (listing a folder of 25,000 pairs costs about 0.7 s, BENCHMARKS §17)."""
    return {(role, split): open_dataset(cfg[role], split, role=role, protocol=cfg["protocol"])
            for role, split in READ_SPLITS}


def check_inputs(cfg: dict[str, Any], class_names: list[str], datasets: Inputs | None = None) -> list[BadPair]:
    """What can fail without training, checked before anything is written or computed: G builds (backbone,
    ``model.init`` readable as a state dict that fits it), and every image and label of :data:`READ_SPLITS`
    decodes (:func:`rayuda.data.verify.verify_pairs`, remembered per file). ``datasets``: those splits, opened
    (:func:`open_inputs`; opened here if not given).

    Image/label pairs of different sizes are refused in one line naming them (``data.bad_pairs: refuse``) or,
    with ``skip``, returned — each file once, whichever datasets hold it — for the run to leave out."""
    try:
        build_segmenter(cfg["model"], len(class_names))
    except (ValueError, OSError, RuntimeError) as err:
        raise ConfigError(f"model: {err}") from None
    datasets = datasets or open_inputs(cfg)
    bad: dict[str, BadPair] = {}
    for (role, split), dataset in datasets.items():
        _, found = verify_pairs(dataset, f"{role} {split} {cfg[role]}")
        for pair in found:
            bad.setdefault(pair.image, pair)
    if cfg["data"]["bad_pairs"] != "skip":
        refuse_bad_pairs(list(bad.values()))
    return list(bad.values())


def input_digests(cfg: dict[str, Any], datasets: Inputs | None = None) -> dict[str, str]:
    """Digests of the files the config names, by the key naming them: ``source`` and ``target`` (every file of
    the splits a run reads, :data:`READ_SPLITS`, :func:`rayuda.data.verify.content_digest`; a split whose files
    are another's counts once) and ``model`` (``model.init``'s weights file: its size and modification time). They
    enter the stage keys (:func:`rayuda.engine.plan.stage_slice`) and ``summary.json``. minicity is generated from
    its spec, which the keys hold already, so it has none, nor have ``init: random`` and ``imagenet``; so the keys
    of runs on them are those from before digests existed. ``datasets``: as :func:`check_inputs`."""
    out: dict[str, str] = {}
    for key in ("source", "target"):
        if str(cfg[key]).partition(":")[0] != "minicity":
            datasets = datasets or open_inputs(cfg)
            parts: dict[tuple, str] = {}  # by file list: a split with the same files as another counts once
            for dataset in (dataset for (role, _), dataset in datasets.items() if role == key):
                parts.setdefault(tuple(dataset.files), content_digest(dataset))
            out[key] = hashlib.sha256("".join(parts.values()).encode()).hexdigest()[:16]
    init = cfg["model"].get("init", "random")
    if isinstance(init, str) and init not in ("random", "imagenet") and Path(init).is_file():  # else: check_inputs
        st = Path(init).stat()
        out["model"] = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return out


def dropped_lines(dropped: list[BadPair]) -> list[str]:
    """What ``data.bad_pairs=skip`` dropped, for the output: a count, then one line per pair (each file once)."""
    if not dropped:
        return []
    return [f"data.bad_pairs=skip: dropped {len(dropped)} image/label pair(s) of different sizes:",
            *(f"  dropped {pair.image} and {pair.label} ({pair.reason})" for pair in dropped)]


def move_aside(out_dir: Path) -> Path:
    """Rename ``out_dir`` to the first free ``OUT.old-N`` (nothing is deleted; its stages stay in the cache)."""
    n = 1
    while (aside := out_dir.with_name(f"{out_dir.name}.old-{n}")).exists():
        n += 1
    out_dir.rename(aside)
    return aside


def _finished(cfg: dict[str, Any], out_dir: Path, inputs: dict[str, str]) -> dict[str, Any] | None:
    """The summary of a finished run of ``cfg`` on the files ``inputs`` digests in ``out_dir``; refuse an
    ``out_dir`` of another config (one that differs only in :data:`BOOKKEEPING` keys is the same run) or of files
    changed since (a summary from before digests existed is taken as it is). Reads, never writes."""
    saved_path = out_dir / "config.yaml"
    if not saved_path.exists():
        return None
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{saved_path} is not readable YAML ({' '.join(str(err).split())[:200]})") from None
    old, new = {**LEGACY, **flatten(saved)}, flatten(cfg)
    differ = sorted(k for k in set(old) | set(new)
                    if old.get(k, "<absent>") != new.get(k, "<absent>") and k not in BOOKKEEPING)
    if differ:
        shown = ", ".join(f"{k} ({old.get(k, '<absent>')!r} → {new.get(k, '<absent>')!r})" for k in differ[:6])
        raise ConfigError(f"{out_dir} holds a run of another config; it differs in {shown}"
                          + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
                          + ": choose another --out, or pass --force-new to move the old run aside")
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    before = (summary or {}).get("inputs", inputs)
    changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
    if changed:
        raise ConfigError(f"{out_dir} holds a run on other files: {', '.join(changed)} changed since it ran "
                          "(files added, removed or modified): choose another --out, or pass --force-new to "
                          "move the old run aside")
    return summary


def run_pipeline(
    config: dict[str, Any],
    out_dir: str | Path,
    report: Report | None = None,
    cache_dir: str | Path | None = None,
    force_new: bool = False,
    list_dropped: bool = True,
) -> dict[str, Any]:
    """Run ``config``'s method end to end into ``out_dir`` and return its summary.

    ``out_dir`` receives ``config.yaml`` (the resolved config), ``summary.json`` (metrics and every stage's
    key, cache hit/miss and seconds), and ``best_model.pt`` / ``model.pt`` (links into the stage cache).
    Calling it again on an unfinished ``out_dir`` resumes; on a finished one it returns the summary (or, with
    a ``report`` hook, replays the cached stages' evaluations, so a restored Tune trial still gets its reports).
    An ``out_dir`` of another config is refused (``force_new``: moved aside); everything checkable is checked
    before ``out_dir`` is touched. ``list_dropped``: print every bad pair ``data.bad_pairs=skip`` drops (a
    search's trials pass False: the search printed them once; they print a count).
    """
    start_time = time.time()
    config = copy.deepcopy(config)
    method = config.pop("method")
    cfg = resolve_config(method, flatten(config))
    resolve_selection_metric(cfg)  # `auto` is saved as the metric it stands for
    resolve_eval_protocol(cfg)  # and null as the protocol it stands for
    out_dir = Path(out_dir)
    datasets = open_inputs(cfg)  # every dataset the run reads, listed once
    inputs = input_digests(cfg, datasets)
    try:
        done, stale = _finished(cfg, out_dir, inputs), False
    except ConfigError:
        if not force_new:
            raise
        done, stale = None, True  # moved aside below, once every check has passed
    if done is not None and report is None:  # with a report hook (a Tune trial), replay the cached stages
        print(f"[{method}] {out_dir} already holds this finished run; not training again", flush=True)
        return done
    plan, device, class_names, dropped, holdout = _preflight(cfg, datasets, list_dropped)
    if stale:
        print(f"[{method}] --force-new: moved the run of another config to {move_aside(out_dir)}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    runtime = Runtime.of(cfg, device)  # + the GPU speed settings (rayuda.engine.accel)
    run = PlanRun(cfg=cfg, runtime=runtime, class_names=class_names, skip=frozenset(p.image for p in dropped),
                  inputs=inputs)
    total = sum(_iters(cfg, s) for s in plan if s.reported)
    print(f"[{method}] {cfg['source']} → {cfg['target']} on {runtime.device}, seed {cfg['seed']}, out {out_dir}\n"
          f"[{method}] plan: " + " → ".join(s.name + (" (reported)" if s.reported else "") for s in plan)
          + f"; {total} reported iterations\n[{method}] {holdout}", flush=True)

    records, upstream, offset = [], None, 0
    for index, stage in enumerate(plan):
        records.append(_run_stage(run, plan, index, upstream=upstream, offset=offset, out_dir=out_dir,
                                  cache_dir=cache_dir, report=report))
        upstream = records[-1]["key"]
        if stage.reported:
            offset += _iters(cfg, stage)

    best = max(run.evals, key=lambda m: m["score"])
    _link(run.dirs[best["stage"]] / "best_model.pt", out_dir / "best_model.pt")
    _link(run.dirs[run.last_train] / "model.pt", out_dir / "model.pt")
    return _summarise(run, method, records, out_dir, start_time, total, _test_results(run, out_dir), dropped)


def _iters(cfg: dict[str, Any], stage: Stage) -> int:
    """A stage's iterations (0 for a pseudo-label pass)."""
    return int(cfg["stages"][stage.name]["iters"]) if stage.kind == "train" else 0


def _preflight(cfg: dict[str, Any], datasets: Inputs, list_dropped: bool
               ) -> tuple[list[Stage], torch.device, list[str], list[BadPair], str]:
    """Everything checkable, before ``out_dir`` is touched or compute is spent: the plan, the device, the holdout,
    every input of ``datasets`` (:func:`open_inputs`; :func:`check_inputs`). Returns the plan, the device, the
    class names, the bad pairs ``data.bad_pairs=skip`` drops (listed, or counted when ``list_dropped`` is False)
    and the holdout's line."""
    plan = plan_of(cfg)
    check_plan(plan, cfg)
    device = pick_device(cfg["train"]["device"])
    class_names = list(datasets[("source", "train")].class_names)
    holdout = describe_holdout(cfg)
    dropped = check_inputs(cfg, class_names, datasets)
    skip = frozenset(pair.image for pair in dropped)
    if skip:
        holdout = describe_holdout(cfg, skip)
        lines = dropped_lines(dropped)
        print("\n".join(lines if list_dropped else [lines[0].rstrip(":") + " (listed in summary.json)"]),
              flush=True)
    return plan, device, class_names, dropped, holdout


def _run_stage(run: PlanRun, plan: list[Stage], index: int, *, upstream: str | None, offset: int, out_dir: Path,
               cache_dir: Path, report: Report | None) -> dict[str, Any]:
    """Stage ``index`` of the plan: its key, then the cache — a hit replays its evaluations, a miss computes it
    (a non-reported train stage of 0 iterations is skipped). Returns the stage's record for the summary."""
    stage, cfg = plan[index], run.cfg
    last_reported = [s for s in plan if s.reported][-1]
    slc, key, record = _address(run, stage, upstream)
    tic = time.time()
    tag = f"[stage {index + 1}/{len(plan)} {stage.name}]"
    iters = _iters(cfg, stage)

    def stage_report(metrics, report_dir):
        """An evaluation on the run's step axis. One ``replayed`` from before a resume counts for the
        summary but is not reported again (the search saw it), unless it is the last."""
        replayed = metrics.get("replayed", False)
        metrics = {k: v for k, v in metrics.items() if k != "replayed"}
        metrics = {**metrics, "iteration": offset + metrics["iteration"], "stage": stage.name,
                   "stage_iteration": metrics["iteration"]}
        if stage is last_reported and metrics["stage_iteration"] == iters:
            metrics["last_report"] = True  # the trial's final report: the search driver needs no guess
        if report_dir is not None and all(metrics["score"] > m["score"] for m in run.evals):
            _link(report_dir / "model.pt", out_dir / "best_model.pt")  # there even if the search stops us
        if report_dir is not None:
            _link_probe(report_dir.parent, metrics, out_dir)
        run.evals.append(metrics)
        if report is not None and (not replayed or metrics.get("last_report")):
            report(metrics, report_dir)

    if stage.kind == "train" and iters == 0 and not stage.reported:
        print(f"{tag} skipped (0 iterations)", flush=True)
        return {"stage": stage.name, "kind": stage.kind, "key": key, "cache": "skipped", "dir": None, "seconds": 0.0}

    def compute(work_dir):
        if stage.kind == "train":
            return _train(run, stage, index, slc, work_dir, stage_report if stage.reported else None)
        return _pseudo_labels(run, stage, slc, work_dir)

    print(f"{tag} key {key}", flush=True)
    stage_dir, hit = cached_stage(cache_dir, stage.name, key, record, compute,
                                  scratch=(RESUME_STATE,) if stage.kind == "train" else ())
    if hit and stage.reported:
        _replay(run, stage_dir, offset, out_dir, stage_report)
    recorded = stage_record(stage_dir)
    if stage.kind == "train" and stage.reported and upstream is None:
        _file_as_unreported(run, stage, stage_dir, recorded, cache_dir)
    seconds = round(time.time() - tic, 2)
    print(f"{tag} {'cache hit' if hit else 'computed'} in {seconds:.1f} s (computing it took "
          f"{recorded['seconds']:.1f} s): {stage_dir}", flush=True)
    run.dirs[stage.name] = stage_dir
    if stage.kind == "train":
        run.last_train = stage.name
    return {"stage": stage.name, "kind": stage.kind, "key": key, "cache": "hit" if hit else "miss",
            "dir": str(stage_dir), "seconds": seconds, "compute_seconds": recorded["seconds"],
            **{k: v for k, v in recorded["facts"].items() if k != "iterations"}}


def _address(run: PlanRun, stage: Stage, upstream: str | None) -> tuple[ConfigSlice, str, dict[str, Any]]:
    """Where ``stage`` lives in the cache: its config slice, its chained key, and what ``stage.yaml`` records
    the key was made of."""
    slc = stage_slice(run.cfg, stage, run.inputs)
    return slc, stage_key(stage, slc, upstream), {"identity": stage_identity(stage), "config": slc.plain(),
                                                  "upstream": upstream}


def _file_as_unreported(run: PlanRun, stage: Stage, stage_dir: Path, recorded: dict[str, Any],
                        cache_dir: Path) -> None:
    """File a finished reported first stage's weights under the key the same stage has unreported, so a plan that
    warm-starts from it finds it (``source_only`` reported, then ``adaptsegnet``'s source-only stage: the same
    training, keyed apart by the evaluation keys). The evaluations read G and never change it, so the weights are
    the ones the unreported stage would train (``tests/test_engine.py`` compares them bit for bit). Only a plan's
    first stage: it is every method's warm start, while a later reported stage (a trial's last) has no plan that
    runs it unreported, and filing each trial's would only clutter the cache."""
    quiet = replace(stage, reported=False)
    _, key, record = _address(run, quiet, None)

    def link(work_dir: Path) -> dict[str, Any]:
        for name in ("model.pt", "log.jsonl"):
            if (stage_dir / name).exists():
                _link(stage_dir / name, work_dir / name)
        return {"iterations": recorded["facts"]["iterations"], "trained_as": stage_dir.name}

    cached_stage(cache_dir, stage.name, key, record, link)


def _replay(run: PlanRun, stage_dir: Path, offset: int, out_dir: Path, stage_report) -> None:
    """A cached reported stage's recorded evaluations, reported again (so a repeated config costs nothing)."""
    replay = [json.loads(line) for line in (stage_dir / "evals.jsonl").read_text().splitlines()]
    if all(max(m["score"] for m in replay) > m["score"] for m in run.evals):
        _link(stage_dir / "best_model.pt", out_dir / "best_model.pt")
    for n, metrics in enumerate(replay):
        _link_probe(stage_dir, {**metrics, "iteration": offset + metrics["iteration"],
                                "stage_iteration": metrics["iteration"]}, out_dir)
        stage_report(metrics, stage_dir / "report" if n == len(replay) - 1 else None)


def _test_results(run: PlanRun, out_dir: Path) -> dict[str, Any]:
    """The final and the selected (best-scoring) model on the holdout's test part: the reported results."""
    select, test = holdout_parts(run.cfg, run.skip)
    out: dict[str, Any] = {"selection_images": len(select), "images": len(test) if test else 0}
    if test is None:
        return out
    model = _load_model(run, run.cfg, None)  # built once (its init applied once); each result loads its weights
    final, selected = load_checkpoint(out_dir / "model.pt"), load_checkpoint(out_dir / "best_model.pt")
    for name, weights in (("final", final), ("selected", selected)):
        if name == "selected" and all(torch.equal(final[k], selected[k]) for k in final):
            out[name] = out["final"]  # the last evaluation was the best: the same model, scored once
            continue
        model.load_state_dict(weights)
        metrics = evaluate(model, test, num_classes=len(run.class_names), device=run.runtime.device,
                           class_names=run.class_names, proxies=False)
        out[name] = {"miou": metrics["miou"], "per_class_iou": {k[4:]: v for k, v in metrics.items()
                                                                if k.startswith("iou/")}}
    print(f"[{run.cfg['method']}] test part ({out['images']} images): final model mIoU "
          f"{100 * out['final']['miou']:.2f}, selected model {100 * out['selected']['miou']:.2f}", flush=True)
    return out


def _summarise(run: PlanRun, method: str, records, out_dir: Path, start_time: float, total: int,
               test: dict[str, Any], dropped: list[BadPair]) -> dict[str, Any]:
    """``summary.json``: the last evaluation and the best one (on the selection images; the best model is
    ``best_model.pt``), the test part's results, the stages, the bad pairs left out and the machine that
    computed them."""
    cfg, evals = run.cfg, run.evals
    last = evals[-1]
    best = max(evals, key=lambda m: m["score"])
    summary = {
        "method": method,
        "miou": last.get("miou", float("nan")),
        "per_class_iou": {k[4:]: v for k, v in last.items() if k.startswith("iou/")},
        "iterations": total,
        "seconds": round(time.time() - start_time, 2),
        "selection_metric": cfg["train"]["metric"],
        "eval_protocol": cfg["data"]["eval_protocol"],
        "score": last["score"],
        "best_score": best["score"],
        "best_iteration": best["iteration"],
        "target_entropy": last["target_entropy"],
        "flip_agreement": last["flip_agreement"],
        **{k: v for k, v in last.items() if k.startswith("proxy/")},
        "seed": cfg["seed"],
        "inputs": run.inputs,
        "test": test,
        "stages": records,
        "bad_pairs": {"policy": cfg["data"]["bad_pairs"],
                      "dropped": [{"image": p.image, "label": p.label, "reason": p.reason} for p in dropped]},
        "environment": environment(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["run_pipeline", "default_cache_dir", "pick_device"]
