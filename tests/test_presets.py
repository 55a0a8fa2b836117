"""The paper-scale presets (``presets/gta5_cityscapes_<method>.yaml``): each loads, validates (keys, plan,
schedules, transforms) and holds the papers' setting. Loaded, never trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rayuda.data.transforms import config_transform
from rayuda.engine.plan import check_plan, stage_slice
from rayuda.methods import plan_of, resolve_config

PRESETS = Path(__file__).resolve().parent.parent / "presets"
SEED_METHODS = ("advent", "cram", "fgdem", "cra", "pixintrada", "cada")


def load(method: str) -> dict:
    path = PRESETS / f"gta5_cityscapes_{method}.yaml"
    cfg = resolve_config(yaml.safe_load(path.read_text())["method"], config_file=path)
    check_plan(plan_of(cfg), cfg)
    return cfg


def test_every_seed_method_has_a_preset():
    assert {p.name for p in PRESETS.glob("*.yaml")} == {f"gta5_cityscapes_{m}.yaml" for m in SEED_METHODS}


@pytest.mark.parametrize("method", SEED_METHODS)
def test_preset_loads_validates_and_sets_the_paper_scale(method):
    cfg = load(method)
    assert cfg["method"] == method
    assert cfg["source"].startswith("gta5:") and cfg["target"].startswith("cityscapes:")
    assert config_transform(cfg, "source", train=True).size == (720, 1280)
    assert config_transform(cfg, "target", train=True).size == (512, 1024)
    assert config_transform(cfg, "target", train=False).size == (512, 1024)
    model = cfg["model"]
    assert (model["backbone"], model["layers"], model["multi_level"], model["freeze_bn"]) == ("resnet101", 4, True,
                                                                                              True)
    assert model["align_corners"] is True and cfg["data"]["batch_size"] == 1
    # the Caffe checkpoint goes with Caffe input; torchvision weights with ImageNet normalisation
    assert model["preprocessing"] == ("imagenet" if model["init"] == "imagenet" else "caffe")
    for stage in plan_of(cfg):
        if stage.kind != "train":
            continue
        schedule = cfg["stages"][stage.name]
        assert schedule["decay_iters"] is None or schedule["decay_iters"] >= schedule["iters"]
        stage_slice(cfg, stage)  # every key the stage reads exists


def test_presets_hold_the_reference_schedules():
    advent = load("advent")["stages"]
    assert (advent["advent"]["iters"], advent["advent"]["decay_iters"], advent["advent"]["lr"]) == (120000, 250000,
                                                                                                    2.5e-4)
    assert advent["source_only"]["iters"] == 0
    fgdem = load("fgdem")["stages"]
    assert (fgdem["source_only"]["iters"], fgdem["fgdem"]["iters"], fgdem["fgdem"]["decay_iters"]) == (20000, 40000,
                                                                                                       62500)
    cram = load("cram")
    assert cram["stages"]["cram"]["iters"] == 120000 and cram["params"]["order"] == "d_first"
    assert (cram["params"]["lambda_style"], cram["params"]["style_weight"]) == (0.1, 0.5)
    assert load("cra")["stages"]["cra"]["iters"] == 40000 and load("cra")["optim"]["weight_decay"] == 1.0e-4
    pix = load("pixintrada")
    assert pix["params"]["split"]["alpha"] == 0.85 and pix["stages"]["intra"]["lr"] == 2.4e-4
