"""A target rayuda did not generate: minicity's target scenes under a corruption from another team's library.

Issue 22 asks for "a shifted target that the team did not generate" run through the service, to check that the
gains measured on the shipped ``minicity:NAME`` variants are not specific to them. No dataset can be downloaded
here, so this is the nearest honest stand-in: the 2,000 labelled val images of minicity's default target, each
corrupted by ``imagecorruptions`` (Michaelis et al. 2019, the ImageNet-C corruptions of Hendrycks & Dietterich
2019 for any image size) — whose ``frost`` overlays crops of real photographs of frost, a shift whose design and
content are not ours. Written as a user's ``folder:`` dataset (``images/*.png`` + ``labels/*.png`` with
Cityscapes label ids), so every run reads it the way it reads a user's city.

It needs only numpy, Pillow and ``imagecorruptions`` (not a rayuda dependency: install it in its own
environment, e.g. ``python -m venv ic && ic/bin/pip install imagecorruptions``)::

    ic/bin/python bench/outside_target.py --out runs/outside/frost --corruption frost --severity 3

Each image is corrupted under its own seed (``--seed`` + index), so the folder is reproducible.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minicity", type=Path, default=None,
                        help="minicity's cache folder holding target/ (default: the newest under ~/.cache/rayuda)")
    parser.add_argument("--out", type=Path, required=True, help="the folder dataset to write")
    parser.add_argument("--corruption", default="frost", help="an imagecorruptions name (default frost)")
    parser.add_argument("--severity", type=int, default=3, choices=range(1, 6))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        from imagecorruptions import corrupt, get_corruption_names
    except ImportError:
        sys.exit("error: needs `imagecorruptions` (pip install imagecorruptions, in its own environment)")
    if args.corruption not in get_corruption_names("all"):
        sys.exit(f"error: --corruption {args.corruption!r} is not one of {', '.join(get_corruption_names('all'))}")
    root = args.minicity or _minicity_with_target()
    images_at, labels_at = root / "target" / "leftImg8bit" / "val", root / "target" / "gtFine" / "val"
    pairs = sorted((p, labels_at / p.parent.name / p.name.replace("_leftImg8bit", "_gtFine_labelIds"))
                   for p in images_at.glob("*/*_leftImg8bit.png"))
    if not pairs:
        sys.exit(f"error: {images_at}: no minicity target val images")
    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "images").mkdir(parents=True)
    (args.out / "labels").mkdir()
    for index, (image_path, label_path) in enumerate(pairs):
        image = np.asarray(Image.open(image_path).convert("RGB"))
        np.random.seed(args.seed + index)  # imagecorruptions draws from numpy's global generator
        shifted = np.uint8(np.clip(corrupt(image, corruption_name=args.corruption, severity=args.severity), 0, 255))
        stem = f"{args.corruption}_{index:05d}"
        Image.fromarray(shifted).save(args.out / "images" / f"{stem}.png")
        shutil.copyfile(label_path, args.out / "labels" / f"{stem}.png")
        if (index + 1) % 500 == 0:
            print(f"{index + 1}/{len(pairs)} images", flush=True)
    (args.out / "made_by.json").write_text(json.dumps({
        "from": str(root), "images": len(pairs), "corruption": args.corruption, "severity": args.severity,
        "seed": args.seed, "library": "imagecorruptions"}, indent=1))
    print(f"{len(pairs)} images and labels → {args.out}")
    return 0


def _minicity_with_target() -> Path:
    cache = Path.home() / ".cache" / "rayuda"
    found = [p for p in cache.glob("minicity-*") if (p / "source").is_dir() and (p / "target").is_dir()]
    if not found:
        sys.exit(f"error: no minicity with a source and a target under {cache}: run rayuda once, or pass --minicity")
    return max(found, key=lambda p: p.stat().st_mtime)


if __name__ == "__main__":
    raise SystemExit(main())
