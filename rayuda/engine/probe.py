"""The probe: what each evaluation stores so that label-free validators (:mod:`rayuda.validators`) can be
computed during a search *and* recomputed afterwards across all its trials.

The probe set is ``train.probe_images`` target-train images (default 16; 0 turns the probe off) and as many
source images, drawn with ``data.split_seed`` — the same images for every trial, method and seed of a search.
An evaluation at iteration ``i`` of a reported stage writes ``<stage folder>/probe/eval_<i>.npz`` (linked into
the run folder as ``probe/eval_<global iteration>.npz``) holding

- ``target_probs``: float16 n×C×32×64, the softmax averaged onto a fixed 32×64 grid (IM, BNM, SND, ensemble);
- ``target_features`` / ``source_features``: float16 (n·64)×d, the deepest backbone features at 64 fixed pixels
  per image (source pixels drawn among labelled ones), d ≤ 128 (a fixed seeded random projection above that);
- ``source_losses``: float32 (n·64), those source pixels' cross-entropy (DEV);
- ``names``: the target probe images.

Size at the defaults (16 images, 19 classes): 1.25 MB of probabilities + 0.5 MB of features ≈ 1.8 MB raw per
evaluation, ≈ 1.0 MB compressed (measured on minicity), whatever the image size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from rayuda.models.predict import upsample_logits

GRID = (32, 64)
PIXELS_PER_IMAGE = 64
FEATURE_DIMS = 128


def probe_indices(count: int, wanted: int, seed: int) -> list[int]:
    """``wanted`` of ``count`` items, drawn with ``seed`` (sorted; all of them when there are fewer)."""
    if wanted >= count:
        return list(range(count))
    return sorted(np.random.default_rng(seed).choice(count, size=wanted, replace=False).tolist())


def open_probe(cfg, transform, skip: frozenset[str] = frozenset()) -> tuple[Dataset, Dataset] | None:
    """The target and source probe sets of a reported stage (``None`` when ``train.probe_images`` is 0), without
    the bad pairs ``skip`` names (image paths, :func:`rayuda.data.verify.drop_pairs`)."""
    from rayuda.data import open_dataset
    from rayuda.data.verify import drop_pairs

    wanted = int(cfg["train"]["probe_images"])
    if wanted <= 0:
        return None
    seed = int(cfg["data"]["split_seed"])
    out = []
    for role in ("target", "source"):
        data = drop_pairs(open_dataset(cfg[role], "train", role=role, protocol=cfg["protocol"], transform=transform),
                          skip)
        out.append(Subset(data, probe_indices(len(data), wanted, seed)))
    return out[0], out[1]


def _batches(dataset: Dataset, batch_size: int):
    """Batches in order, without a DataLoader (whose iterator draws from torch's global RNG: storing a probe
    must not change the training that follows)."""
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        yield {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items]),
               "name": [it["name"] for it in items]}


def _projection(channels: int) -> torch.Tensor | None:
    if channels <= FEATURE_DIMS:
        return None
    gen = torch.Generator().manual_seed(channels)
    return torch.randn(channels, FEATURE_DIMS, generator=gen) / FEATURE_DIMS ** 0.5


def _pixel_features(features: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size) -> torch.Tensor:
    """The feature vectors (P×d) under pixel positions ``ys, xs`` of an image of ``size`` (nearest cell)."""
    fh, fw = features.shape[-2:]
    fy = (ys * fh // size[0]).clamp(max=fh - 1)
    fx = (xs * fw // size[1]).clamp(max=fw - 1)
    return features[:, fy, fx].T.float()


@torch.no_grad()
def collect_probe(model: torch.nn.Module, probe: tuple[Dataset, Dataset], *, device: torch.device,
                  seed: int = 0, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Run ``model`` (eval mode) over the probe sets and return the arrays :mod:`rayuda.validators` reads."""
    was_training = model.training
    model.eval()
    target_set, source_set = probe
    gen = np.random.default_rng(seed)
    grid = gen.choice(GRID[0] * GRID[1], size=PIXELS_PER_IMAGE, replace=False)
    probs, t_feats, s_feats, s_losses, names = [], [], [], [], []
    projection = None
    for batch in _batches(target_set, batch_size):
        images = batch["image"].to(device)
        out = model(images)
        p = torch.softmax(upsample_logits(out.logits["main"], images.shape[-2:]), dim=1)
        pooled = F.adaptive_avg_pool2d(p, GRID)
        probs.append(pooled.cpu().half())
        deepest = out.features[max(out.features)]
        projection = _projection(deepest.shape[1]) if projection is None else projection
        ys = torch.as_tensor(grid // GRID[1]) * images.shape[-2] // GRID[0]
        xs = torch.as_tensor(grid % GRID[1]) * images.shape[-1] // GRID[1]
        for feats in deepest:
            t_feats.append(_pixel_features(feats.cpu(), ys, xs, images.shape[-2:]))
        names += list(batch["name"])
    for batch in _batches(source_set, batch_size):
        images, labels = batch["image"].to(device), batch["label"].to(device)
        out = model(images)
        loss = F.cross_entropy(upsample_logits(out.logits["main"], labels.shape[-2:]), labels, ignore_index=255,
                               reduction="none")
        deepest = out.features[max(out.features)]
        for feats, label, pixel_loss in zip(deepest.cpu(), labels.cpu(), loss.cpu(), strict=True):
            valid = torch.nonzero(label.flatten() != 255).flatten().numpy()
            if len(valid) == 0:
                continue
            pick = torch.as_tensor(np.sort(gen.choice(valid, size=min(PIXELS_PER_IMAGE, len(valid)), replace=False)))
            ys, xs = pick // label.shape[1], pick % label.shape[1]
            s_feats.append(_pixel_features(feats, ys, xs, label.shape))
            s_losses.append(pixel_loss.flatten()[pick].float())
    model.train(was_training)

    def project(rows: list[torch.Tensor]) -> np.ndarray:
        if not rows:
            return np.zeros((0, FEATURE_DIMS), dtype=np.float16)
        x = torch.cat(rows)
        return (x @ projection if projection is not None else x).half().numpy()

    return {"target_probs": torch.cat(probs).numpy(), "target_features": project(t_feats),
            "source_features": project(s_feats),
            "source_losses": torch.cat(s_losses).numpy() if s_losses else np.zeros(0, dtype=np.float32),
            "names": np.array(names)}


def save_probe(arrays: dict[str, Any], path: Path) -> None:
    """Write the probe atomically (``np.savez_compressed`` to a temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
