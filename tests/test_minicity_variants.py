"""minicity variants (``minicity:NAME``): named target cities, target-only, seeded, cached, really shifted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayuda.data import SPECS, DatasetError, datasets, minicity, open_dataset
from rayuda.data.minicity import (
    CLASSES,
    VARIANTS,
    MinicityConfig,
    _world,
    class_frequencies,
    ensure_minicity,
    generate,
    variant_config,
)

SMALL = {"target_train": 8, "target_val": 4}
IDS = {cid for _, cid in CLASSES}
NAMES = list(VARIANTS)
APPEARANCE = ("dusk", "night", "fog")  # the default target's scenes, another look
CITIES = ("suburb", "suburb-dusk")  # another world model
RARE = ("person", "pole", "traffic sign", "bus", "fence")


def _files(root: Path, under: str = "") -> dict[str, bytes]:
    base = root / under
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def _stat(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _target(root: Path, what: str) -> np.ndarray:
    """Every target image (``leftImg8bit``, float RGB) or label map (``gtFine``), train then val."""
    suffix = "_leftImg8bit.png" if what == "leftImg8bit" else "_gtFine_labelIds.png"
    paths = sorted((root / "target" / what).glob(f"*/minicity/*{suffix}"))
    assert paths, f"no target {what} under {root}"
    return np.stack([np.asarray(Image.open(p)) for p in paths])


def _gray(images: np.ndarray) -> np.ndarray:
    return images.astype(float) @ np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def stats(tmp_path_factory) -> dict[str, Path]:
    """The default target and every variant, 40 + 1 images each (enough for pixel statistics)."""
    out = tmp_path_factory.mktemp("variants")
    counts = {"target_train": 40, "target_val": 1}
    roots = {"default": out / "default"}
    generate(roots["default"], MinicityConfig(source_images=0, **counts))
    for name in NAMES:
        roots[name] = out / name
        generate(roots[name], variant_config(name, **counts), name)
    return roots


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RAYUDA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------------------ the table


def test_variant_table():
    assert {"dusk", "night", "fog", "suburb", "suburb-dusk"} <= set(VARIANTS)
    assert tuple(VARIANTS) == datasets.MINICITY_VARIANTS  # the spelled-out copy in datasets.py agrees
    default = MinicityConfig()
    keys = set()
    for name in NAMES:
        assert f"minicity:{name}" in SPECS and VARIANTS[name].summary
        config = variant_config(name)
        assert config.source_images == 0  # a variant directory holds only the target
        assert (config.target_train, config.target_val) == (default.target_train, default.target_val)
        assert (config.height, config.width, config.seed, config.gap) == (default.height, default.width, 0, 0.5)
        assert variant_config(name, target_train=3, seed=2).target_train == 3
        keys.add(config.key())
    assert len(keys) == len(NAMES) and default.key() not in keys


def test_new_knobs_validated_and_default_hash_kept():
    for bad in ({"haze": 1.5}, {"illumination": 0}, {"contrast": 3}, {"tint": -2}, {"noise": -1},
                {"target_rare": 5}, {"target_green": True}, {"target_road": 0.1}, {"target_horizon": 0.3}):
        (name,) = bad
        with pytest.raises(ValueError, match=f"minicity knob {name} must be a number in"):
            MinicityConfig(**bad)
    with pytest.raises(ValueError, match="image counts"):
        MinicityConfig(source_images=-1)
    with pytest.raises(ValueError, match="image counts"):
        MinicityConfig(source_images=0, target_val=0)
    assert MinicityConfig(source_images=0).source_images == 0
    # knobs left at their defaults do not enter the dict, so the default config keeps its hash and files
    plain = MinicityConfig().to_dict()
    assert set(plain) == {"seed", "height", "width", "source_images", "target_train", "target_val", "gap",
                          "frequency_shift", "shape_shift"}
    assert MinicityConfig(haze=0.0, tint=0).key() == MinicityConfig().key() != MinicityConfig(haze=0.2).key()
    shifted = variant_config("suburb-dusk")
    assert json.loads(json.dumps(shifted.to_dict())) == shifted.to_dict()  # what _is_complete compares


@pytest.mark.parametrize("name", NAMES)
def test_unknown_variant(name):
    with pytest.raises(DatasetError) as err:
        open_dataset("minicity:nowhere", "train", role="target")
    assert "nowhere" in str(err.value) and f"minicity:{name}" in str(err.value)
    with pytest.raises(ValueError, match=f"unknown minicity variant 'nowhere'; valid variants: .*{name}"):
        ensure_minicity(variant="nowhere")


# ------------------------------------------------------------------------------------ seeded, cached, source


@pytest.mark.parametrize("name", NAMES)
def test_seeded(tmp_path, name):
    generate(tmp_path / "a", variant_config(name, **SMALL))
    generate(tmp_path / "b", variant_config(name, **SMALL))
    generate(tmp_path / "c", variant_config(name, seed=1, **SMALL))
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and not any(k.startswith("source") for k in a)
    images = [k for k in a if k.endswith("_leftImg8bit.png")]
    assert len(images) == 12 and all(a[k] != c[k] for k in images)


@pytest.mark.parametrize("name", NAMES)
def test_cached(cache, monkeypatch, capsys, name):
    first = ensure_minicity(variant=name, **SMALL)
    assert first == cache / f"minicity-{variant_config(name, **SMALL).key()}"
    assert f"generating minicity variant {name} (12 images)" in capsys.readouterr().err
    meta = json.loads((first / "minicity.json").read_text())
    assert meta["variant"] == name and meta["config"] == variant_config(name, **SMALL).to_dict()
    assert meta["images"] == {"source": 0, "target/train": 8, "target/val": 4}
    assert not (first / "source").exists()
    before = _stat(first)

    def fail(*args, **kwargs):
        raise AssertionError("generated twice")

    monkeypatch.setattr(minicity, "generate", fail)
    assert ensure_minicity(variant=name, **SMALL) == first
    assert _stat(first) == before
    with pytest.raises(AssertionError, match="generated twice"):
        ensure_minicity(variant=name, seed=3, **SMALL)  # another config is a miss


@pytest.mark.parametrize("name", NAMES)
def test_source_world_and_rendering_are_the_default(tmp_path, name):
    """A variant's knobs never reach the source: same world model, byte-identical source files."""
    assert _world("source", variant_config(name)) == _world("source", MinicityConfig())
    assert _world("target", variant_config(name)) != _world("target", MinicityConfig()) or name in APPEARANCE
    counts = {"source_images": 4, "target_train": 1, "target_val": 1}
    generate(tmp_path / "default", MinicityConfig(**counts))
    generate(tmp_path / "variant", variant_config(name, **counts))
    default, variant = _files(tmp_path / "default", "source"), _files(tmp_path / "variant", "source")
    assert len(default) == 8 and variant == default


def test_variants_leave_the_default_untouched(cache):
    default = ensure_minicity(source_images=4, **SMALL)
    before = _stat(default)
    roots = {ensure_minicity(variant=name, **SMALL) for name in NAMES}
    assert len(roots) == len(NAMES) and default not in roots
    assert _stat(default) == before
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in [default, *roots])


# ---------------------------------------------------------------------------------------- really shifted


@pytest.mark.parametrize("name", NAMES)
def test_class_set(stats, name):
    images, labels = _target(stats[name], "leftImg8bit"), _target(stats[name], "gtFine")
    assert images.shape == (41, 64, 128, 3) and images.dtype == np.uint8
    assert labels.shape == (41, 64, 128) and labels.dtype == np.uint8
    seen = set(np.unique(labels).tolist())
    assert seen <= IDS | {0}
    assert {7, 8, 11, 21, 22, 23, 26} <= seen


@pytest.mark.parametrize("name", CITIES)
def test_rare_classes_rarer(stats, name):
    base, shifted = class_frequencies(stats["default"])["target"], class_frequencies(stats[name])["target"]
    assert base == json.loads((stats["default"] / "minicity.json").read_text())["pixel_frequencies"]["target"]
    for cls in RARE:
        assert shifted[cls] < 0.75 * base[cls], cls  # at the default counts: 0.2-0.4x
    assert shifted["vegetation"] + shifted["terrain"] > 1.2 * (base["vegetation"] + base["terrain"])
    assert shifted["building"] < 0.7 * base["building"]


@pytest.mark.parametrize("name", APPEARANCE)
def test_appearance_variants_keep_the_scenes(stats, name):
    """Same label maps as the default target (a paired comparison), other pixels."""
    np.testing.assert_array_equal(_target(stats[name], "gtFine"), _target(stats["default"], "gtFine"))
    assert class_frequencies(stats[name])["target"] == class_frequencies(stats["default"])["target"]
    assert not (_target(stats[name], "leftImg8bit") == _target(stats["default"], "leftImg8bit")).all()


def test_city_variant_draws_new_scenes(stats):
    assert (_target(stats["suburb"], "gtFine") != _target(stats["default"], "gtFine")).mean() > 0.2


@pytest.mark.parametrize(("name", "light", "cast", "grain"),
                         [("dusk", 0.85, 4, 1.15), ("suburb-dusk", 0.85, 4, 1.15), ("night", 0.6, 8, 1.5)])
def test_dusk_and_night_are_dark_dull_blue_noisy(stats, tmp_path, name, light, cast, grain):
    base, dusk = (_target(stats[k], "leftImg8bit").astype(float) for k in ("default", name))
    assert _gray(dusk).mean() < light * _gray(base).mean()  # dark
    assert _gray(dusk).std((1, 2)).mean() < light * _gray(base).std((1, 2)).mean()  # low contrast
    red, blue = dusk[..., 0].mean(), dusk[..., 2].mean()
    assert blue > red + cast and abs(base[..., 2].mean() - base[..., 0].mean()) < 4  # a blue cast
    # more noise: pixel-to-pixel roughness above that of the same variant with the default noise
    generate(tmp_path, variant_config(name, noise=1.0, target_train=40, target_val=1))
    quiet = _target(tmp_path, "leftImg8bit").astype(float)
    rough = [np.abs(np.diff(_gray(x), axis=2)).mean() for x in (quiet, dusk)]
    assert rough[1] > grain * rough[0]


def test_fog_is_pale_and_thickens_towards_the_horizon(stats):
    base, fog = (_gray(_target(stats[k], "leftImg8bit")) for k in ("default", "fog"))
    assert fog.mean() > base.mean() + 15  # pale
    assert fog.std((1, 2)).mean() < 0.75 * base.std((1, 2)).mean()  # low contrast
    h = base.shape[1]
    horizon, bottom = slice(int(0.38 * h), int(0.5 * h)), slice(h - 8, h)  # the default target's horizon ≈ 0.44

    def contrast(x, rows):
        return x[:, rows].std(2).mean()

    near = contrast(fog, horizon) / contrast(base, horizon)
    far = contrast(fog, bottom) / contrast(base, bottom)
    assert near < 0.6 and near < far - 0.15


# ------------------------------------------------------------------------------------------- spec and CLI


@pytest.fixture
def small_minicity(cache, monkeypatch):
    """``ensure_minicity`` at small counts (datasets.py looks it up on the module at each call)."""
    real = minicity.ensure_minicity

    def small(root=None, *, variant=None, **knobs):
        extra = SMALL if variant else {"source_images": 4, **SMALL}
        return real(root, variant=variant, **{**extra, **knobs})

    monkeypatch.setattr(minicity, "ensure_minicity", small)
    return cache


@pytest.mark.parametrize("name", ["suburb", "dusk"])
def test_spec_opens_the_variant_target(small_minicity, name):
    root = ensure_minicity(variant=name, **SMALL) / "target"
    for role in ("source", "target"):
        train = open_dataset(f"minicity:{name}", "train", role=role)
        val = open_dataset(f"minicity:{name}", "val", role=role)
        assert train.root == root and val.root == root
        assert len(train) == 8 and len(val) == 4 and train.has_labels and val.has_labels
        assert all(image.name.endswith("_leftImg8bit.png") and label.name.endswith("_gtFine_labelIds.png")
                   for image, label in train.files)
    item = open_dataset(f"minicity:{name}", "train", role="source")[0]
    assert item["image"].shape == (3, 64, 128) and item["label"].shape == (64, 128)
    values = set(item["label"].unique().tolist())
    assert values <= set(range(19)) | {255} and len(values - {255}) >= 4


def test_plain_specs_keep_their_meaning(small_minicity):
    default = ensure_minicity(source_images=4, **SMALL)
    assert open_dataset("minicity", "train", role="source").root == default / "source"
    assert open_dataset("minicity", "train", role="target").root == default / "target"
    assert open_dataset("minicity:target", "train", role="source").root == default / "target"
    assert open_dataset("minicity:source", "train", role="target").root == default / "source"
    assert len(open_dataset("minicity", "train", role="source")) == 4


def test_cli_variant(tmp_path, capsys):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "rayuda.data.minicity", "--variant", "fog", "--out", str(out),
           "--target-train", "2", "--target-val", "1", "--seed", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "variant fog" in proc.stdout and "0 source images" in proc.stdout and "vegetation (21)" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr  # the module is not imported twice under -m
    meta = json.loads((out / "minicity.json").read_text())
    assert meta["variant"] == "fog" and meta["config"] == variant_config("fog", target_train=2, target_val=1,
                                                                         seed=3).to_dict()
    assert not (out / "source").exists()
    assert len(list((out / "target" / "leftImg8bit" / "train" / "minicity").iterdir())) == 2
    with pytest.raises(SystemExit) as exc:
        minicity.main(["--out", str(tmp_path / "bad"), "--variant", "mars"])
    assert exc.value.code == 2 and "mars" in capsys.readouterr().err
