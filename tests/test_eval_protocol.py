"""Paper-protocol evaluation: a real dataset's holdout is scored at each label's own resolution (logits
upsampled to the label, as ``rayuda.predict`` and the papers do), one image at a time; the config and the summary
say which protocol a number used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from rayuda.engine import run_pipeline
from rayuda.engine.pipeline import describe_holdout, eval_protocol, holdout_parts, resolve_eval_protocol
from rayuda.engine.plan import stage_key, stage_slice
from rayuda.methods import plan_of, resolve_config
from rayuda.predict import ImageSet, predict_folder
from rayuda.runs import load_run

SIZE = [32, 64]  # data.size: what G sees; no label below has this size
TINY = {"data.size": SIZE, "data.batch_size": 2, "stages.source_only.iters": 2, "train.eval_every": 2,
        "train.log_every": 2, "train.probe_images": 2, "data.test_fraction": 0.0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A ``folder:`` target: 5 minicity images at 5 sizes (one JPG), 4 labelled at their image's size."""
    from rayuda.data.minicity import ensure_minicity

    root = tmp_path_factory.mktemp("mycity")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    target = ensure_minicity() / "target"
    pngs = sorted((target / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))[:5]
    for i, (png, size) in enumerate(zip(pngs, [None, (100, 50), (90, 70), (256, 128), (40, 30)], strict=True)):
        label_png = target / "gtFine" / "val" / png.parent.name / png.name.replace("_leftImg8bit", "_gtFine_labelIds")
        image, label = Image.open(png).convert("RGB"), Image.open(label_png)
        if size is not None:
            image, label = image.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
        image.save(root / "images" / (f"img{i}.jpg" if i == 2 else f"img{i}.png"), quality=95)
        if i != 4:
            label.save(root / "labels" / f"img{i}.png")
    return root


def test_the_protocol_is_chosen_per_target_spec_and_checked():
    assert resolve_eval_protocol(resolve_config("source_only", {"target": "folder:/x"})) == "label"
    for spec in ("gta5:/x", "synthia:/x", "cityscapes:/x"):
        assert eval_protocol(resolve_config("source_only", {"target": spec})) == "label"
    assert eval_protocol(resolve_config("source_only")) == "resized"  # minicity: as its benchmarks were measured
    chosen = resolve_config("source_only", {"target": "minicity", "data.eval_protocol": "label"})
    assert eval_protocol(chosen) == "label"


def test_the_label_protocol_keys_reported_stages_and_leaves_resized_keys_as_they_were():
    cfg = resolve_config("advent")
    resolve_eval_protocol(cfg)  # minicity: resized, the protocol of every stage cached before the key
    plan = plan_of(cfg)
    reported = next(s for s in plan if s.reported)
    before = stage_slice(cfg, reported)
    assert "eval_protocol" not in before["data"]  # the same slice, the same key as before the key existed
    labelled = {**cfg, "data": {**cfg["data"], "eval_protocol": "label"}}
    assert stage_slice(labelled, reported)["data"]["eval_protocol"] == "label"
    assert stage_key(reported, stage_slice(labelled, reported), None) != stage_key(reported, before, None)
    first = plan[0]  # not reported: never evaluated, so no protocol in its key
    assert stage_slice(labelled, first) == stage_slice(cfg, first)


def test_evaluate_and_predict_give_the_same_miou_on_labels_of_their_own_sizes(folder, tmp_path):
    cfg = resolve_config("source_only", {**TINY, "target": f"folder:{folder}"})
    out = tmp_path / "run"
    summary = run_pipeline(cfg, out, cache_dir=tmp_path / "cache")
    assert summary["eval_protocol"] == "label"
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["eval_protocol"] == "label"
    assert "each label at its own size" in describe_holdout(summary_cfg(out))
    select, test = holdout_parts(summary_cfg(out))
    assert test is None and len(select) == 4
    assert [tuple(select[i]["label"].shape) for i in range(4)] == [(64, 128), (50, 100), (70, 90), (128, 256)]

    run = load_run(out, "final")  # the model the last evaluation scored (summary["miou"])
    images = ImageSet(folder, run.size, 19, preprocessing=run.preprocessing)
    metrics = predict_folder(run, images, tmp_path / "pred", batch_size=1, progress_every=0)
    assert metrics["labelled_images"] == 4
    assert summary["miou"] == pytest.approx(metrics["miou"], abs=1e-12)
    for name, iou in metrics["per_class_iou"].items():
        assert summary["per_class_iou"].get(name) == (pytest.approx(iou, abs=1e-12) if iou is not None else None)

    resized = resolve_config("source_only", {**TINY, "target": f"folder:{folder}", "data.eval_protocol": "resized"})
    select, _ = holdout_parts(resized)
    assert {tuple(select[i]["label"].shape) for i in range(4)} == {tuple(SIZE)}  # the other protocol, for contrast


def summary_cfg(out: Path) -> dict:
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    return resolve_config(cfg.pop("method"), None, out / "config.yaml")


def test_a_run_saved_before_the_key_is_the_same_run(tmp_path):
    cfg = resolve_config("source_only", {k: v for k, v in TINY.items() if k != "data.test_fraction"})
    out = tmp_path / "run"
    run_pipeline(cfg, out, cache_dir=tmp_path / "cache")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"].pop("eval_protocol") == "resized"  # minicity
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))  # as written before the key
    again = run_pipeline(cfg, out, cache_dir=tmp_path / "cache")  # not refused as another config
    assert again == json.loads((out / "summary.json").read_text())
