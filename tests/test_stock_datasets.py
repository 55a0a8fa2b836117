"""Stock datasets: image/label pairs of different sizes, as the stock GTA5 download has, are refused
in one line naming them, or dropped with ``data.bad_pairs=skip`` and listed (output, summary.json, MLflow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayuda.data import DatasetError, open_dataset
from rayuda.data.verify import drop_pairs, refuse_bad_pairs, verify_dataset, verify_pairs

TINY = {"data.size": [32, 64], "data.batch_size": 2, "data.holdout": 4, "train.eval_every": 2,
        "train.log_every": 1, "stages.source_only.iters": 2, "stages.minent.iters": 2, "train.probe_images": 4}
TINY_ARGS = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
BAD = ("00003", "00007")  # the two pairs whose label is one row short (the stock GTA5's 15188 and 17705 kind)


def gta5_with_bad_pairs(root: Path, count: int = 12) -> Path:
    """A GTA5-layout folder (``images/NNNNN.png``, ``labels/NNNNN.png``) of real PNGs from minicity's source
    rendering, where the labels of :data:`BAD` are one row shorter than their images."""
    from rayuda.data.minicity import ensure_minicity

    source = ensure_minicity() / "source"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
        for path in sorted((source / sub).glob("*.png"))[:count]:
            shutil.copy(path, root / sub / path.name)
    names = sorted(p.stem for p in (root / "labels").glob("*.png"))
    for stem in BAD:
        assert stem in names
        label = root / "labels" / f"{stem}.png"
        with Image.open(label) as im:
            ids = np.array(im)
        Image.fromarray(ids[:-1]).save(label)
    return root


def bad_labels(root: Path) -> list[str]:
    return [str(root / "labels" / f"{stem}.png") for stem in BAD]


def train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rayuda.train", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_verify_lists_every_bad_pair_remembers_them_and_refuses_in_one_line(tmp_path):
    root = gta5_with_bad_pairs(tmp_path / "gta5")
    cache = tmp_path / "verified.json"
    dataset = open_dataset(f"gta5:{root}", "train", role="source")
    decoded, bad = verify_pairs(dataset, "source", cache=cache)
    assert decoded == 12 and [p.label for p in bad] == bad_labels(root)
    assert bad[0].image == str(root / "images" / f"{BAD[0]}.png") and bad[0].reason == "label 128x63, image 128x64"
    again, remembered = verify_pairs(dataset, "source", cache=cache)
    assert again == 0 and remembered == bad  # a second look decodes nothing and still knows the bad pairs

    with pytest.raises(DatasetError) as info:
        verify_dataset(dataset, "source", cache=cache)
    message = str(info.value)
    assert "\n" not in message and all(label in message for label in bad_labels(root))
    assert "--set data.bad_pairs=skip" in message

    kept = drop_pairs(dataset, {p.image for p in bad})
    assert len(kept) == 10 and len(dataset) == 12 and kept.has_labels
    assert not {str(image) for image, _ in kept.files} & {p.image for p in bad}
    verify_pairs(kept, "kept", cache=tmp_path / "fresh.json")  # what stays decodes without a bad pair
    refuse_bad_pairs([])  # nothing to refuse


def test_a_fixed_pair_is_decoded_again_and_no_longer_bad(tmp_path):
    root = gta5_with_bad_pairs(tmp_path / "gta5")
    cache = tmp_path / "verified.json"
    dataset = open_dataset(f"gta5:{root}", "train", role="source")
    verify_pairs(dataset, "source", cache=cache)
    shutil.copy(root / "labels" / "00000.png", root / "labels" / f"{BAD[0]}.png")  # a re-downloaded label
    decoded, bad = verify_pairs(dataset, "source", cache=cache)
    assert decoded == 1 and [p.label for p in bad] == bad_labels(root)[1:]


def test_train_refuses_bad_pairs_by_default_and_skip_drops_and_lists_each_once(tmp_path):
    root = gta5_with_bad_pairs(tmp_path / "gta5")
    base = ["minent", "--source", f"gta5:{root}", "--cache-dir", str(tmp_path / "cache"), *TINY_ARGS]
    refused = train(*base, "--out", str(tmp_path / "refused"), cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in refused.stderr
    assert all(label in errors[0] for label in bad_labels(root)) and "data.bad_pairs=skip" in errors[0]
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "run"
    proc = train(*base, "--set", "data.bad_pairs=skip", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in bad_labels(root):  # every dropped file once in the output
        assert proc.stdout.count(label) == 1, proc.stdout
        assert proc.stdout.count(label.replace("/labels/", "/images/")) == 1
    assert "dropped 2 image/label pair(s)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad_pairs"]["policy"] == "skip"
    assert [d["label"] for d in summary["bad_pairs"]["dropped"]] == bad_labels(root)
    assert summary["bad_pairs"]["dropped"][1]["reason"] == "label 128x63, image 128x64"

    # refuse and skip train on the same data whenever both run: the same run folder, the same stage keys
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    for stem in BAD:
        for sub in ("images", "labels"):
            (clean / sub / f"{stem}.png").unlink()
    first = train("minent", "--source", f"gta5:{clean}", "--cache-dir", str(tmp_path / "cache2"), *TINY_ARGS,
                  "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = train("minent", "--source", f"gta5:{clean}", "--cache-dir", str(tmp_path / "cache2"), *TINY_ARGS,
                   "--set", "data.bad_pairs=skip", "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert second.returncode == 0 and "already holds this finished run" in second.stdout, second.stderr[-2000:]


def test_an_unknown_bad_pairs_policy_is_refused_naming_the_key(tmp_path):
    proc = train("minent", "--set", "data.bad_pairs=ignore", "--out", str(tmp_path / "r"), *TINY_ARGS, cwd=tmp_path)
    assert proc.returncode == 2 and "data.bad_pairs" in proc.stderr and not (tmp_path / "r").exists()
