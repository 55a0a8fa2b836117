"""Files changed under the same spec: a stage computed on the old files is not served from the cache, and a
finished run on them is not handed back as if it were this one (rayuda.engine.pipeline.input_digests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from rayuda.config import ConfigError
from rayuda.data import open_dataset
from rayuda.data.verify import content_digest
from rayuda.engine import run_pipeline
from rayuda.engine.pipeline import input_digests
from rayuda.engine.plan import stage_key, stage_slice
from rayuda.methods import plan_of, resolve_config
from rayuda.models import build_segmenter

TINY = {"data.size": [32, 64], "data.batch_size": 2, "stages.source_only.iters": 2, "train.eval_every": 2,
        "train.log_every": 2, "train.probe_images": 2, "data.test_fraction": 0.0}


def make_folder(root: Path, n: int = 4) -> Path:
    """A ``folder:`` dataset of ``n`` labelled 64×32 images (Cityscapes label ids 7 road, 26 car)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        Image.new("RGB", (64, 32), (30 * i, 90, 160)).save(root / "images" / f"img{i}.png")
        Image.new("L", (64, 32), 7).save(root / "labels" / f"img{i}.png")
    return root


def relabel(path: Path, value: int) -> None:
    """Rewrite a label with another class, and make its modification time differ whatever the clock's grain."""
    before = path.stat().st_mtime_ns
    Image.new("L", (64, 32), value).save(path)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def digest(root: Path) -> str:
    return content_digest(open_dataset(f"folder:{root}", "train", role="target"))


def test_the_digest_follows_every_file_and_the_mapping_and_nothing_else(tmp_path):
    root = make_folder(tmp_path / "mine")
    first = digest(root)
    assert digest(root) == first  # opening again changes nothing
    relabel(root / "labels" / "img1.png", 26)
    fixed = digest(root)
    assert fixed != first  # a label fixed
    Image.new("RGB", (64, 32), (1, 2, 3)).save(root / "images" / "img9.png")
    added = digest(root)
    assert added != fixed  # an image added (unlabelled)
    (root / "classes.yaml").write_text(yaml.safe_dump({"mapping": {7: "road", 26: "car"}}))
    assert digest(root) != added  # the raw-id mapping edited: the same files mean other classes


def test_minicity_and_built_in_inits_have_no_digest_so_their_keys_are_unchanged(tmp_path):
    assert input_digests(resolve_config("cra", {})) == {}
    assert input_digests(resolve_config("source_only", {"model.init": "imagenet"})) == {}
    weights = tmp_path / "backbone.pt"
    torch.save(build_segmenter(resolve_config("source_only", {})["model"], 19).state_dict(), weights)
    cfg = resolve_config("source_only", {"target": f"folder:{make_folder(tmp_path / 'mine')}",
                                         "model.init": str(weights)})
    inputs = input_digests(cfg)
    assert set(inputs) == {"target", "model"}
    os.utime(weights, ns=(1, 1))  # the weights file replaced under the same name
    assert input_digests(cfg)["model"] != inputs["model"] and input_digests(cfg)["target"] == inputs["target"]


def test_each_stage_keys_the_digests_of_what_it_reads():
    cfg = resolve_config("cra", {})
    inputs = {"source": "s" * 16, "target": "t" * 16, "model": "m" * 16}
    by_name = {stage.name: stage for stage in plan_of(cfg)}
    labels = stage_slice(cfg, by_name["regions"], inputs)  # a pseudo-label pass reads the target, not the source
    assert labels["inputs"] == {"target": "t" * 16, "model": "m" * 16}
    warm_start = by_name["source_only"]  # not reported in cra: it never sees the target
    assert stage_slice(cfg, warm_start, inputs)["inputs"] == {"source": "s" * 16, "model": "m" * 16}
    assert stage_slice(cfg, by_name["cra"], inputs)["inputs"] == inputs
    assert "inputs" not in stage_slice(cfg, warm_start)  # no digests: the slice of before
    for name, slot in (("source_only", "source"), ("regions", "target"), ("cra", "target"), ("cra", "source")):
        changed = {**inputs, slot: "u" * 16}
        assert stage_key(by_name[name], stage_slice(cfg, by_name[name], changed), None) != \
            stage_key(by_name[name], stage_slice(cfg, by_name[name], inputs), None)
    assert stage_key(warm_start, stage_slice(cfg, warm_start, {**inputs, "target": "u" * 16}), None) == \
        stage_key(warm_start, stage_slice(cfg, warm_start, inputs), None)


def test_a_fixed_label_recomputes_the_stage_and_refuses_the_old_run_folder(tmp_path):
    root = make_folder(tmp_path / "mine")
    cfg = resolve_config("source_only", {**TINY, "target": f"folder:{root}"})
    cache, out = tmp_path / "cache", tmp_path / "run"
    first = run_pipeline(cfg, out, cache_dir=cache)
    assert first["inputs"] == input_digests(cfg) and set(first["inputs"]) == {"target"}
    assert run_pipeline(cfg, tmp_path / "again", cache_dir=cache)["stages"][0]["cache"] == "hit"

    relabel(root / "labels" / "img0.png", 26)
    with pytest.raises(ConfigError, match=r"holds a run on other files: target changed"):
        run_pipeline(cfg, out, cache_dir=cache)  # not handed back as if it were this data's run
    assert (out / "summary.json").exists()  # and left as it was
    fixed = run_pipeline(cfg, tmp_path / "fixed", cache_dir=cache)
    assert fixed["stages"][0]["cache"] == "miss" and fixed["stages"][0]["key"] != first["stages"][0]["key"]
    assert fixed["inputs"]["target"] != first["inputs"]["target"]
    moved = run_pipeline(cfg, out, cache_dir=cache, force_new=True)  # --force-new moves the old run aside
    assert moved["stages"][0]["cache"] == "hit" and (tmp_path / "run.old-1" / "summary.json").exists()


def make_cityscapes(root: Path) -> Path:
    """A ``cityscapes:`` layout with two labelled images in ``train`` and one in ``val``."""
    for split, names in (("train", ("a", "b")), ("val", ("c",))):
        (root / "leftImg8bit" / split / "town").mkdir(parents=True)
        (root / "gtFine" / split / "town").mkdir(parents=True)
        for name in names:
            Image.new("RGB", (64, 32), (90, 90, 160)).save(root / "leftImg8bit" / split / "town" /
                                                           f"{name}_leftImg8bit.png")
            Image.new("L", (64, 32), 7).save(root / "gtFine" / split / "town" / f"{name}_gtFine_labelIds.png")
    return root


def test_only_the_splits_a_run_reads_are_digested(tmp_path):
    """The source's train images, the target's train and val: a change to the source's unread val split keeps
    every key; the same change to the target's holdout does not."""
    spec = f"cityscapes:{make_cityscapes(tmp_path / 'cs')}"
    as_source = resolve_config("source_only", {"source": spec})
    as_target = resolve_config("source_only", {"target": spec})
    before = input_digests(as_source)["source"], input_digests(as_target)["target"]
    relabel(tmp_path / "cs" / "gtFine" / "val" / "town" / "c_gtFine_labelIds.png", 26)
    assert input_digests(as_source)["source"] == before[0]
    assert input_digests(as_target)["target"] != before[1]


def test_the_checks_before_compute_list_each_dataset_once(tmp_path, monkeypatch):
    """``input_digests`` and ``check_inputs`` share the datasets :func:`open_inputs` opened (a folder of 25,000
    pairs takes ~0.7 s to list): the target's training folder is opened without a transform once per run (the
    training and the probe open it again, with their transforms)."""
    import rayuda.engine.pipeline as pipeline

    untransformed = []

    def spy(spec, split, **kw):
        if kw.get("transform") is None:
            untransformed.append((spec, split))
        return open_dataset(spec, split, **kw)

    monkeypatch.setattr(pipeline, "open_dataset", spy)
    spec = f"folder:{make_folder(tmp_path / 'mine')}"
    summary = run_pipeline(resolve_config("source_only", {**TINY, "target": spec}), tmp_path / "run",
                           cache_dir=tmp_path / "cache")
    assert set(summary["inputs"]) == {"target"} and summary["stages"][0]["cache"] == "miss"
    assert untransformed.count((spec, "train")) == 1  # was 3: the digests, the preflight and check_inputs each
