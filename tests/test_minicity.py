"""The minicity generator: layouts, determinism, a real domain shift, the cache and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayuda.data import minicity
from rayuda.data.minicity import CLASSES, MinicityConfig, class_frequencies, ensure_minicity, generate

SMALL = {"source_images": 8, "target_train": 8, "target_val": 4}
IDS = {cid for _, cid in CLASSES}


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pairs(root: Path, domain: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(RGB image, label id map) pairs of one domain."""
    if domain == "source":
        images = sorted((root / "source" / "images").glob("*.png"))
        labels = [root / "source" / "labels" / p.name for p in images]
    else:
        images = sorted((root / "target" / "leftImg8bit").glob("*/minicity/*_leftImg8bit.png"))
        labels = [Path(str(p).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit", "_gtFine_labelIds"))
                  for p in images]
    pairs = zip(images, labels, strict=True)
    return [(np.asarray(Image.open(i)), np.asarray(Image.open(lb))) for i, lb in pairs]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minicity")
    generate(out, MinicityConfig(**SMALL))
    return out


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """Enough images for statistics, with the shifts at full strength."""
    out = tmp_path_factory.mktemp("minicity-medium")
    config = MinicityConfig(source_images=40, target_train=40, target_val=1, gap=1.0, frequency_shift=1.0)
    generate(out, config)
    return out


def test_layout_and_names(small):
    names = {p.name for p in (small / "source" / "images").iterdir()}
    assert names == {f"{i:05d}.png" for i in range(8)}
    assert {p.name for p in (small / "source" / "labels").iterdir()} == names
    for split, n in (("train", 8), ("val", 4)):
        stems = {f"minicity_{i:06d}_000000" for i in range(n)}
        images = (small / "target" / "leftImg8bit" / split / "minicity").iterdir()
        labels = (small / "target" / "gtFine" / split / "minicity").iterdir()
        assert {p.name for p in images} == {f"{s}_leftImg8bit.png" for s in stems}
        assert {p.name for p in labels} == {f"{s}_gtFine_labelIds.png" for s in stems}
    meta = json.loads((small / "minicity.json").read_text())
    assert meta["config"] == MinicityConfig(**SMALL).to_dict()
    assert [c["id"] for c in meta["classes"]] == [cid for _, cid in CLASSES]
    assert set(meta["pixel_frequencies"]) == {"source", "target"}


@pytest.mark.parametrize("domain", ["source", "target"])
def test_images_and_labels(small, domain):
    seen = set()
    for image, label in _pairs(small, domain):
        assert image.shape == (64, 128, 3) and image.dtype == np.uint8
        assert label.shape == (64, 128) and label.dtype == np.uint8
        seen |= set(np.unique(label).tolist())
    assert seen <= IDS | {0}
    assert len(seen & IDS) >= 9  # most classes show up even in a handful of images
    assert {7, 8, 11, 23} <= seen  # road, sidewalk, building, sky


def test_deterministic(tmp_path):
    generate(tmp_path / "a", MinicityConfig(**SMALL))
    generate(tmp_path / "b", MinicityConfig(**SMALL))
    generate(tmp_path / "c", MinicityConfig(seed=1, **SMALL))
    a, b, c = (_all_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["source/images/00000.png"] != c["source/images/00000.png"]


def test_worker_processes_write_the_same_dataset(tmp_path):
    """Generation split over worker processes writes the files, and the class frequencies, of one process."""
    serial = generate(tmp_path / "one", MinicityConfig(**SMALL), processes=1)
    parallel = generate(tmp_path / "two", MinicityConfig(**SMALL), processes=2)
    assert _all_files(tmp_path / "one") == _all_files(tmp_path / "two")
    assert parallel == serial
    assert minicity.generation_processes(minicity.PARALLEL_FROM - 1) == 1


def test_layout_is_plausible(medium):
    """Sky sits above the road, which fills the bottom rows."""
    for domain in ("source", "target"):
        labels = np.stack([label for _, label in _pairs(medium, domain)])
        rows = np.arange(labels.shape[1])[None, :, None] * np.ones_like(labels)
        assert rows[labels == 23].mean() < rows[labels == 7].mean() - 15
        assert (labels[:, -8:] == 7).mean() > 0.3


def _class_means(pairs) -> dict[int, np.ndarray]:
    pixels = {cid: [] for cid in IDS}
    for image, label in pairs:
        for cid in IDS:
            pixels[cid].append(image[label == cid].astype(float))
    return {cid: np.concatenate(v).mean(0) for cid, v in pixels.items() if sum(map(len, v)) > 50}


def test_domains_look_different(medium):
    src, tgt = _pairs(medium, "source"), _pairs(medium, "target")
    ms, mt = _class_means(src), _class_means(tgt)
    common = ms.keys() & mt.keys()
    distances = [np.linalg.norm(ms[c] - mt[c]) for c in common]
    assert len(common) >= 10 and np.median(distances) > 40

    def roughness(pairs) -> float:
        """Mean absolute horizontal difference inside class regions (texture and noise, not edges)."""
        values = []
        for image, label in pairs:
            same = label[:, 1:] == label[:, :-1]
            diff = np.abs(np.diff(image.astype(float), axis=1)).mean(2)
            values.append(diff[same])
        return float(np.concatenate(values).mean())

    assert roughness(tgt) > 3 * roughness(src)


def test_frequency_shift(medium):
    freq = json.loads((medium / "minicity.json").read_text())["pixel_frequencies"]
    assert freq == class_frequencies(medium)  # the recorded statistics match the files
    for f in freq.values():
        assert abs(sum(f.values()) - 1) < 1e-3
    src, tgt = freq["source"], freq["target"]
    assert src["car"] + src["person"] + src["bus"] > 1.5 * (tgt["car"] + tgt["person"] + tgt["bus"])
    assert tgt["vegetation"] > 1.5 * src["vegetation"]


def test_no_gap_renders_alike(tmp_path):
    """With every shift off, the target is rendered like the source (same palette, no noise)."""
    generate(tmp_path, MinicityConfig(**SMALL, gap=0.0, frequency_shift=0.0, shape_shift=0.0))
    ms, mt = _class_means(_pairs(tmp_path, "source")), _class_means(_pairs(tmp_path, "target"))
    for cid in (7, 11, 23):
        assert np.linalg.norm(ms[cid] - mt[cid]) < 25


def test_config_validation():
    with pytest.raises(ValueError, match="gap"):
        MinicityConfig(gap=1.5)
    with pytest.raises(ValueError, match="height"):
        MinicityConfig(height=4.5)
    with pytest.raises(ValueError, match="unknown minicity knob"):
        ensure_minicity(colour=3)
    assert MinicityConfig(gap=1).gap == 1.0 and isinstance(MinicityConfig(gap=1).to_dict()["gap"], float)
    assert MinicityConfig().key() == MinicityConfig(seed=0).key() != MinicityConfig(seed=1).key()


def test_ensure_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAYUDA_CACHE", str(tmp_path))
    first = ensure_minicity(**SMALL)
    assert first.parent == tmp_path and first.name.startswith("minicity-")
    assert (first / "minicity.json").is_file()
    assert "generating minicity (20 images)" in capsys.readouterr().err

    def fail(*args, **kwargs):
        raise AssertionError("generated twice")

    monkeypatch.setattr(minicity, "generate", fail)
    assert ensure_minicity(**SMALL) == first
    with pytest.raises(AssertionError, match="generated twice"):
        ensure_minicity(**SMALL, seed=3)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the failed attempt left nothing
    monkeypatch.undo()

    monkeypatch.setenv("RAYUDA_CACHE", str(tmp_path))
    other = ensure_minicity(**SMALL, gap=0.2)
    assert other != first and other.parent == tmp_path
    assert json.loads((other / "minicity.json").read_text())["config"]["gap"] == 0.2


def test_ensure_explicit_root(tmp_path):
    root = ensure_minicity(tmp_path / "mc", **SMALL)
    assert root == tmp_path / "mc" and (root / "source" / "images" / "00000.png").is_file()
    with pytest.raises(ValueError, match="does not hold minicity for this config"):
        ensure_minicity(root, seed=5, **SMALL)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "rayuda.data.minicity", "--out", str(out), "--seed", "2", "--gap", "0.3",
           "--source-images", "3", "--target-train", "2", "--target-val", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "3 source images" in proc.stdout and "vegetation (21)" in proc.stdout
    meta = json.loads((out / "minicity.json").read_text())
    assert meta["config"]["seed"] == 2 and meta["config"]["gap"] == 0.3
    assert len(list((out / "source" / "images").iterdir())) == 3
    with pytest.raises(SystemExit) as exc:
        minicity.main(["--out", str(tmp_path / "bad"), "--gap", "2"])
    assert exc.value.code == 2 and "gap" in capsys.readouterr().err
