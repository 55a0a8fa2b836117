"""rayuda.data: layouts, id → train-id mapping pixel by pixel, errors naming their file, transforms."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rayuda.data import DatasetError, Transform, cityscapes_lut, class_names, open_dataset, synthia_lut
from rayuda.data.transforms import IMAGENET_MEAN, IMAGENET_STD

H, W = 4, 6
MEAN, STD = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]

# Cityscapes label ids (0 = unlabeled, 1 ego vehicle, 9 parking, 6 ground are ignored everywhere)
CS_IDS = np.array(
    [[0, 7, 8, 11, 12, 13], [17, 19, 20, 21, 22, 23], [24, 25, 26, 27, 28, 31], [32, 33, 1, 9, 6, 7]],
    np.uint8,
)
CS_EXPECTED = {
    19: [[255, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [17, 18, 255, 255, 255, 0]],
    16: [[255, 0, 1, 2, 3, 4], [5, 6, 7, 8, 255, 9], [10, 11, 12, 255, 13, 255], [14, 15, 255, 255, 255, 0]],
    13: [
        [255, 0, 1, 2, 255, 255],
        [255, 3, 4, 5, 255, 6],
        [7, 8, 9, 255, 10, 255],
        [11, 12, 255, 255, 255, 0],
    ],
}
# SYNTHIA ids (0 void, 13 parking-slot, 16 terrain, 22 lanemarking have no class of the 16)
SY_IDS = np.array([[3, 4, 2, 21, 5, 7], [15, 9, 6, 1, 10, 17], [8, 19, 12, 11, 0, 16], [22, 13, 3, 3, 21, 1]])
SY_EXPECTED = {
    19: [[0, 1, 2, 3, 4, 5], [6, 7, 8, 10, 11, 12], [13, 15, 17, 18, 255, 255], [255, 255, 0, 0, 3, 10]],
    16: [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 255, 255], [255, 255, 0, 0, 3, 9]],
    13: [[0, 1, 2, 255, 255, 255], [3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 255, 255], [255, 255, 0, 0, 255, 6]],
}


# ------------------------------------------------------------------------------------------------ helpers


def rgb(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_image(path: Path, arr: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb() if arr is None else arr).save(path)
    return path


def save_label(path: Path, ids: np.ndarray, palette: bool = False, bits16: bool = False) -> Path:
    """8-bit gray (Cityscapes), 16-bit gray or palette (GTA5 style, colours unrelated to ids) label PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids)
    if palette:
        im = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.astype(np.uint8).tobytes())
        im.putpalette([(255 - i) % 256 for i in range(256) for _ in range(3)])
    else:
        im = Image.fromarray(ids.astype(np.uint16 if bits16 or ids.max() > 255 else np.uint8))
    im.save(path)
    return path


def save_png16_rgb(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def normalised(arr: np.ndarray) -> np.ndarray:
    return (arr.transpose(2, 0, 1) / 255.0 - MEAN) / STD


def raises(match_path: Path | str, fn, *args, **kwargs) -> str:
    """Assert a one-line DatasetError naming ``match_path``; return its message."""
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert str(match_path) in message, message
    assert "\n" not in message
    return message


def make_gta5(root: Path, n: int = 2) -> Path:
    for i in range(n):
        save_image(root / "images" / f"{i:05d}.png", rgb(i))
        save_label(root / "labels" / f"{i:05d}.png", CS_IDS, palette=True)
    return root


def make_cityscapes(root: Path, splits=("train", "val")) -> Path:
    for split in splits:
        for city, name in [("aachen", "aachen_000000_000019"), ("bonn", "bonn_000001_000019")]:
            save_image(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            save_label(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", CS_IDS)
    return root


def label_of(ds, i: int = 0) -> np.ndarray:
    item = ds[i]
    assert item["label"].dtype == torch.int64 and item["label"].shape == (H, W)
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, H, W)
    return item["label"].numpy()


# ------------------------------------------------------------------------------------------------ labels


def test_label_tables_follow_protocols():
    names19 = class_names(19)
    assert len(names19) == 19 and names19[6] == "traffic light" and names19[18] == "bicycle"
    assert class_names(16)[9] == "sky" and len(class_names(16)) == 16
    assert class_names(13) == ["road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation",
                               "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle"]
    lut = cityscapes_lut(19)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert (lut[7], lut[26], lut[33], lut[0], lut[34]) == (0, 13, 18, 255, 255)
    assert synthia_lut(13)[21] == 255 and synthia_lut(16)[21] == 3 and synthia_lut(19)[1] == 10
    with pytest.raises(ValueError, match="protocol"):
        class_names(7)


# ------------------------------------------------------------------------------------------------ layouts


def test_gta5_palette_labels_map_pixel_by_pixel(tmp_path):
    root = make_gta5(tmp_path / "gta")
    ds = open_dataset(f"gta5:{root}", "train", role="source")
    assert len(ds) == 2 and ds.has_labels and ds.root == root and ds.class_names == class_names(19)
    assert ds.files[1] == (root / "images" / "00001.png", root / "labels" / "00001.png")
    np.testing.assert_array_equal(label_of(ds, 1), CS_EXPECTED[19])
    assert ds[1]["name"] == "00001.png"
    np.testing.assert_allclose(ds[1]["image"].numpy(), normalised(rgb(1)), atol=1e-5)
    assert len(open_dataset(f"gta5:{root}", "val", role="source")) == 2  # no splits: val = all images


@pytest.mark.parametrize("protocol", [19, 16, 13])
@pytest.mark.parametrize("split", ["train", "val"])
def test_cityscapes_layout(tmp_path, protocol, split):
    root = make_cityscapes(tmp_path / "cs")
    ds = open_dataset(f"cityscapes:{root}", split, role="target", protocol=protocol)
    assert [item[0].name for item in ds.files] == ["aachen_000000_000019_leftImg8bit.png",
                                                    "bonn_000001_000019_leftImg8bit.png"]
    assert ds.files[0][1] == root / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    assert len(ds.class_names) == protocol
    np.testing.assert_array_equal(label_of(ds), CS_EXPECTED[protocol])


@pytest.mark.parametrize("protocol", [19, 16, 13])
def test_synthia_16bit_gray_labels(tmp_path, protocol):
    root = tmp_path / "synthia"
    save_image(root / "RGB" / "0000000.png")
    label = save_label(root / "GT" / "LABELS" / "0000000.png", SY_IDS, bits16=True)
    assert Image.open(label).mode.startswith("I;16")
    ds = open_dataset(f"synthia:{root}", "val", role="source", protocol=protocol)
    np.testing.assert_array_equal(label_of(ds), SY_EXPECTED[protocol])


def test_synthia_16bit_rgb_labels_use_first_channel(tmp_path):
    root = tmp_path / "synthia"
    save_image(root / "RGB" / "0000000.png")
    arr = np.stack([SY_IDS, np.full_like(SY_IDS, 5000), np.arange(24).reshape(H, W) * 1000], axis=-1)
    save_png16_rgb(root / "GT" / "LABELS" / "0000000.png", arr)
    ds = open_dataset(f"synthia:{root}", "train", role="source", protocol=16)
    np.testing.assert_array_equal(label_of(ds), SY_EXPECTED[16])


def test_synthia_rejects_ids_outside_table(tmp_path):
    root = tmp_path / "synthia"
    save_image(root / "RGB" / "0000000.png")
    bad = SY_IDS.copy()
    bad[0, 0] = 300
    label = save_label(root / "GT" / "LABELS" / "0000000.png", bad)
    assert "300" in raises(label, open_dataset(f"synthia:{root}", "train", role="source").__getitem__, 0)


def test_folder_default_cityscapes_ids_and_unlabelled_images(tmp_path):
    root = tmp_path / "mine"
    save_image(root / "images" / "a.png")
    save_label(root / "labels" / "a.png", CS_IDS)
    save_image(root / "images" / "b.jpg")
    train = open_dataset(f"folder:{root}", "train", role="target", protocol=16)
    assert [p.name for p, _ in train.files] == ["a.png", "b.jpg"] and train.has_labels
    np.testing.assert_array_equal(label_of(train, 0), CS_EXPECTED[16])
    np.testing.assert_array_equal(label_of(train, 1), np.full((H, W), 255))
    val = open_dataset(f"folder:{root}", "val", role="target", protocol=16)
    assert [p.name for p, _ in val.files] == ["a.png"] and val.has_labels


def test_folder_classes_yaml(tmp_path):
    root = tmp_path / "mine"
    save_image(root / "images" / "a.png")
    raw = np.array([[0, 1, 2, 3, 9, 10], [4, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 3, 3]])
    save_label(root / "labels" / "a.png", raw)
    (root / "classes.yaml").write_text("mapping:\n  0: road\n  1: sidewalk\n  2: car\n  3: wall\n"
                                       "  4: 5\n  9: ignore\n  10: 255\n")
    got19 = label_of(open_dataset(f"folder:{root}", "val", role="target", protocol=19))
    expected19 = [[0, 1, 13, 3, 255, 255], [5, 0, 0, 0, 0, 0], [1] * 6, [13, 13, 13, 13, 3, 3]]
    np.testing.assert_array_equal(got19, expected19)
    got13 = label_of(open_dataset(f"folder:{root}", "val", role="target", protocol=13))
    expected13 = [[0, 1, 9, 255, 255, 255], [5, 0, 0, 0, 0, 0], [1] * 6, [9, 9, 9, 9, 255, 255]]
    np.testing.assert_array_equal(got13, expected13)

    raw[3, 5] = 7  # a value the mapping does not define
    label = save_label(root / "labels" / "a.png", raw)
    message = raises(label, open_dataset(f"folder:{root}", "val", role="target").__getitem__, 0)
    assert "[7]" in message and "classes.yaml" in message

    (root / "classes.yaml").write_text("mapping:\n  0: roadway\n")
    raises(root / "classes.yaml", open_dataset, f"folder:{root}", "val", role="target")


def test_folder_without_labels(tmp_path):
    root = tmp_path / "mine"
    for name in ("x.png", "y.jpeg"):
        save_image(root / "images" / name)
    for split in ("train", "val"):
        ds = open_dataset(f"folder:{root}", split, role="target")
        assert len(ds) == 2 and not ds.has_labels
        np.testing.assert_array_equal(label_of(ds, 1), np.full((H, W), 255))


def test_items_collate(tmp_path):
    ds = open_dataset(f"gta5:{make_gta5(tmp_path / 'gta')}", "train", role="source")
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, H, W) and batch["label"].shape == (2, H, W)
    assert batch["name"] == ["00000.png", "00001.png"]


# ------------------------------------------------------------------------------------------------ errors


def test_bad_specs(tmp_path):
    with pytest.raises(DatasetError, match="valid specs.*folder:PATH"):
        open_dataset(f"kitti:{tmp_path}", "train", role="target")
    with pytest.raises(DatasetError, match="split"):
        open_dataset(f"gta5:{tmp_path}", "test", role="source")
    with pytest.raises(DatasetError, match="protocol"):
        open_dataset(f"gta5:{tmp_path}", "train", role="source", protocol=20)


def test_missing_root_and_split(tmp_path):
    raises(tmp_path / "nope", open_dataset, f"gta5:{tmp_path / 'nope'}", "train", role="source")
    root = make_cityscapes(tmp_path / "cs", splits=("train",))
    raises(root / "leftImg8bit" / "val", open_dataset, f"cityscapes:{root}", "val", role="target")
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    raises(empty / "images", open_dataset, f"folder:{empty}", "train", role="target")


def test_image_without_label(tmp_path):
    root = make_gta5(tmp_path / "gta")
    save_image(root / "images" / "00002.png")
    message = raises(root / "labels" / "00002.png", open_dataset, f"gta5:{root}", "train", role="source")
    assert str(root / "images" / "00002.png") in message
    cs = make_cityscapes(tmp_path / "cs")
    (cs / "gtFine" / "val" / "bonn" / "bonn_000001_000019_gtFine_labelIds.png").unlink()
    raises(cs / "gtFine" / "val" / "bonn" / "bonn_000001_000019_gtFine_labelIds.png",
           open_dataset, f"cityscapes:{cs}", "val", role="target")


def test_label_without_image(tmp_path):
    root = tmp_path / "mine"
    save_image(root / "images" / "a.png")
    orphan = save_label(root / "labels" / "zzz.png", CS_IDS)
    raises(orphan, open_dataset, f"folder:{root}", "train", role="target")
    gta = make_gta5(tmp_path / "gta")
    orphan = save_label(gta / "labels" / "00009.png", CS_IDS)
    raises(orphan, open_dataset, f"gta5:{gta}", "val", role="source")


def test_size_mismatch(tmp_path):
    root = make_gta5(tmp_path / "gta")
    label = save_label(root / "labels" / "00001.png", CS_IDS[:, :5])
    ds = open_dataset(f"gta5:{root}", "train", role="source")
    label_of(ds, 0)
    assert "5x4" in raises(label, ds.__getitem__, 1)


@pytest.mark.parametrize("which", ["images", "labels"])
def test_truncated_and_not_png(tmp_path, which):
    root = make_gta5(tmp_path / "gta")
    big = root / which / "00001.png"  # big enough that half of it cuts into the pixel data
    save_image(root / "images" / "00001.png", rgb(5, 64, 64))
    save_label(root / "labels" / "00001.png", np.random.default_rng(0).integers(0, 34, (64, 64)))
    ds = open_dataset(f"gta5:{root}", "train", role="source")
    assert ds[1]["label"].shape == (64, 64)
    truncate(big)
    raises(big, ds.__getitem__, 1)
    big.write_bytes(b"this is not a PNG file at all")
    raises(big, ds.__getitem__, 1)


def test_cityscapes_ids_outside_table(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    bad = CS_IDS.copy()
    bad[0, :2] = [34, 200]
    label = save_label(root / "gtFine" / "train" / "bonn" / "bonn_000001_000019_gtFine_labelIds.png", bad)
    ds = open_dataset(f"cityscapes:{root}", "train", role="target")
    assert "[34, 200]" in raises(label, ds.__getitem__, 1)


def test_colour_label_is_rejected(tmp_path):
    root = make_gta5(tmp_path / "gta")
    label = save_image(root / "labels" / "00000.png")  # an RGB rendering instead of ids
    assert "channel" in raises(label, open_dataset(f"gta5:{root}", "train", role="source").__getitem__, 0)


# ------------------------------------------------------------------------------------------------ transforms


def grid_sample(h: int = 16, w: int = 16) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """A random image and a label whose every pixel is unique (so crops and flips are traceable)."""
    arr = rgb(3, h, w)
    return Image.fromarray(arr), np.arange(h * w, dtype=np.uint8).reshape(h, w), arr


def test_transform_normalises():
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[..., 0], arr[..., 2] = 255, 128
    img, lbl = Transform()(Image.fromarray(arr), None)
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    np.testing.assert_allclose(img[:, 1, 2].numpy(), expected, rtol=1e-5)
    assert lbl.dtype == torch.int64 and (lbl == 255).all() and lbl.shape == (2, 3)


def test_transform_crop_is_seeded():
    image, label, arr = grid_sample()
    tf = Transform(crop=(5, 7))
    outs = {}
    for seed in range(6):
        img, lbl = tf(image, label, np.random.default_rng(seed))
        img2, lbl2 = tf(image, label, np.random.default_rng(seed))
        assert torch.equal(img, img2) and torch.equal(lbl, lbl2)
        top, left = divmod(int(lbl[0, 0]), 16)
        np.testing.assert_array_equal(lbl.numpy(), label[top : top + 5, left : left + 7])
        np.testing.assert_allclose(img.numpy(), normalised(arr[top : top + 5, left : left + 7]), atol=1e-5)
        outs[seed] = (top, left)
    assert len(set(outs.values())) > 1
    a, b = (tf(image, label, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a[1], b[1])


def test_transform_flip_moves_image_and_label_together():
    image, label, arr = grid_sample(4, 6)
    flipped = 0
    for seed in range(16):
        img, lbl = Transform(flip=True)(image, label, np.random.default_rng(seed))
        if lbl[0, 0] == label[0, -1]:
            flipped += 1
            np.testing.assert_array_equal(lbl.numpy(), label[:, ::-1])
            np.testing.assert_allclose(img.numpy(), normalised(arr[:, ::-1]), atol=1e-5)
        else:
            np.testing.assert_array_equal(lbl.numpy(), label)
            np.testing.assert_allclose(img.numpy(), normalised(arr), atol=1e-5)
    assert 0 < flipped < 16


def test_transform_resize_pad_and_jitter():
    image, label, _ = grid_sample(4, 6)
    img, lbl = Transform(size=(2, 3))(image, label)
    assert img.shape == (3, 2, 3)
    np.testing.assert_array_equal(lbl.numpy(), label[::2, ::2])  # nearest: no invented ids
    img, lbl = Transform(crop=(6, 8))(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(lbl[:4, :6].numpy(), label)
    assert (lbl[4:] == 255).all() and (lbl[:, 6:] == 255).all()
    np.testing.assert_allclose(img[:, 5, 7].numpy(), (-MEAN / STD).ravel(), rtol=1e-5)
    plain, _ = Transform()(image, label)
    j1, _ = Transform(jitter=0.5)(image, label, np.random.default_rng(0))
    j2, _ = Transform(jitter=0.5)(image, label, np.random.default_rng(0))
    assert torch.equal(j1, j2) and not torch.allclose(j1, plain)
    with pytest.raises(ValueError):
        Transform(jitter=2.0)


def test_dataset_augmentation_depends_on_seed_and_epoch(tmp_path):
    root = tmp_path / "mine"
    save_image(root / "images" / "a.png", rgb(0, 32, 32))
    tf = Transform(crop=(8, 8), flip=True, jitter=0.3)
    ds = open_dataset(f"folder:{root}", "train", role="target", transform=tf, seed=3)
    first = ds[0]["image"]
    assert torch.equal(first, ds[0]["image"])
    ds.epoch = 1
    assert not torch.equal(first, ds[0]["image"])
    other = open_dataset(f"folder:{root}", "train", role="target", transform=tf, seed=4)
    assert not torch.equal(first, other[0]["image"])
