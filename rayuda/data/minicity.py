"""minicity: the embedded benchmark, small procedural street scenes in two renderings.

No real dataset can be downloaded, so rayuda generates one. Every image is a street seen from a car: sky
on top, a road in perspective (a trapezoid to the vanishing point, dashed centre line), sidewalks and
grass verges beside it, building facades with windows, hedges and tree lines along the street, fences,
poles carrying traffic signs, trees, cars and buses on the road and persons on the sidewalks. One scene
geometry is first drawn into a label map; the pixels are then coloured by one of two *domains*:

- **source** (synthetic, like a game engine): a flat, saturated palette, sharp edges, almost no noise.
- **target** (real-looking): the palette permuted between classes and desaturated, textures, per-pixel
  noise, a horizontal lighting gradient, a colour cast, soft shadows, a small blur, and sometimes the
  ego vehicle's bonnet at the bottom (unlabelled, id 0).

Source and target scenes are independent draws of the same world model, with different class frequencies
(more cars, buses, persons and poles in the source; more vegetation, terrain and buildings in the target)
and slightly different shapes (horizon, road width, object proportions).

Classes (12 of the 19 Cityscapes classes, Cityscapes label ids): road 7, sidewalk 8, building 11, fence 13,
pole 17, traffic sign 20, vegetation 21, terrain 22, sky 23, person 24, car 26, bus 28; 0 = unlabelled.

Layouts written by :func:`generate` (label PNGs are 8-bit grayscale Cityscapes label ids)::

    OUT/minicity.json                        config, classes, image counts, class pixel frequencies
    OUT/source/images/00000.png              GTA5 layout (source rendering)
    OUT/source/labels/00000.png
    OUT/target/leftImg8bit/{train,val}/minicity/minicity_000000_000000_leftImg8bit.png   Cityscapes layout
    OUT/target/gtFine/{train,val}/minicity/minicity_000000_000000_gtFine_labelIds.png

Knobs (:class:`MinicityConfig`): ``seed`` (default 0) seeds every image through
``numpy.random.default_rng([seed, domain, split, index])``, so the same config gives byte-identical
files; ``height`` × ``width`` (64 × 128); ``source_images`` (600), ``target_train`` (600), ``target_val``
(2000: with ``data.max_selection`` 500 selection and about 1,500 test images, so that one model's test mIoU moves
by under 0.2 points between image draws, docs/BENCHMARKS.md §16); ``gap`` (0.5), the strength of the appearance shift;
``frequency_shift`` (0.5), how much class frequencies differ; ``shape_shift`` (0.5), how much layout and
object proportions differ. Target-only knobs, off by default: the target's weather and light
(``illumination``, ``contrast``, ``haze``, ``tint``, ``noise``) and its city (``target_rare``,
``target_green``, ``target_road``, ``target_horizon``).

**Variants** (:data:`VARIANTS`): named target cities where the paper defaults may be wrong. A variant sets
target-only knobs, so its source would be exactly the default source: its directory holds only the
target part (``source_images=0``), and its image counts follow :class:`MinicityConfig`'s defaults.

- ``dusk``: the default target's scenes at dusk: darker, lower contrast, a blue cast, more sensor noise.
- ``night``: the same scenes near dark: very dark, low contrast, a strong blue cast and strong noise (a
  source-only model trained without photometric augmentation fails almost completely there, BENCHMARKS §16).
- ``fog``: the default target's scenes in fog: haze thickening towards the horizon, low contrast.
- ``suburb``: another city (class-frequency and layout shift): persons, poles (so traffic signs), buses and
  fences 2.5-5× rarer (pixel shares), wider roads, more vegetation and terrain, lower buildings, a lower horizon.
- ``suburb-dusk``: ``suburb`` at dusk, both shifts at once.

The appearance variants keep the target world, so they draw the same scenes (same label maps) as the
default target, a paired comparison where only the look changes; ``suburb`` draws new scenes.

:func:`ensure_minicity` generates on first use into ``$RAYUDA_CACHE/minicity-<config hash>`` (default
``~/.cache/rayuda``); ``ensure_minicity(variant="suburb")`` does the same for a variant. Command line:
``python -m rayuda.data.minicity --out DIR [--variant NAME] [--processes N] [--seed S] [--gap G] ...``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image

from rayuda.config import cache_root, usable_cpus

#: Bumped whenever the generator's output changes, so cached copies are regenerated.
VERSION = 1
CITY = "minicity"
DOMAINS = ("source", "target")

#: (name, Cityscapes label id) of the classes present, in the generator's internal order.
CLASSES = (
    ("road", 7), ("sidewalk", 8), ("building", 11), ("fence", 13), ("pole", 17), ("traffic sign", 20),
    ("vegetation", 21), ("terrain", 22), ("sky", 23), ("person", 24), ("car", 26), ("bus", 28),
)  # fmt: skip
ROAD, SIDEWALK, BUILDING, FENCE, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR, BUS = range(len(CLASSES))
VOID = len(CLASSES)  # unlabelled (written as id 0): the ego vehicle's bonnet
_ID_LUT = np.array([cid for _, cid in CLASSES] + [0], dtype=np.uint8)

# Surface details, drawn over a class's colour without changing its label.
# DARK: glass, wheels, gaps; LIGHT: markings, sign faces, heads; SHADE: a darker tone (leaves, trousers).
PLAIN, DARK, LIGHT, SHADE = range(4)

#: Source palette: flat, saturated, game-like (row = internal class index; the last row is VOID).
_PALETTE = np.array([
    (125, 100, 145), (235, 150, 205), (205, 110, 65), (215, 195, 80), (250, 230, 40), (40, 205, 235),
    (55, 190, 45), (175, 225, 105), (85, 160, 250), (240, 55, 60), (45, 65, 225), (250, 140, 20),
    (50, 50, 55),
], dtype=np.float32)  # fmt: skip
_SKY_TOP = np.array((40, 90, 220), dtype=np.float32)
# Instance paint weight per class: how much an object's own random colour replaces its class colour.
_PAINT = np.array([0, 0, 0, 0, 0, 0.45, 0, 0, 0, 0.6, 0.55, 0.3, 0], dtype=np.float32)
# Target texture strength per class (relative amplitude of multiplicative noise at gap 1).
_TEXTURE = np.array([0.12, 0.1, 0.14, 0.1, 0.05, 0.05, 0.4, 0.3, 0.03, 0.1, 0.06, 0.06, 0.05],
                    dtype=np.float32)


#: Allowed range of each numeric knob (integers are checked apart).
_RANGES = {
    "gap": (0.0, 1.0), "frequency_shift": (0.0, 1.0), "shape_shift": (0.0, 1.0),
    "illumination": (0.1, 2.0), "contrast": (0.1, 2.0), "haze": (0.0, 1.0), "tint": (-1.0, 1.0),
    "noise": (0.0, 5.0), "target_rare": (0.0, 4.0), "target_green": (0.0, 1.0), "target_road": (0.5, 2.0),
    "target_horizon": (-0.15, 0.15),
}  # fmt: skip
#: Knobs added after version 1: :meth:`MinicityConfig.to_dict` lists them only when they differ from their
#: defaults, so a config that leaves them alone keeps its hash (cache directory) and ``minicity.json``.
_LATER_KNOBS = ("illumination", "contrast", "haze", "tint", "noise", "target_rare", "target_green",
                "target_road", "target_horizon")


@dataclass(frozen=True)
class MinicityConfig:
    """Generator knobs; :meth:`key` hashes them (with :data:`VERSION`) into the cache directory name.

    - ``seed``: generation seed (default 0); image ``i`` of a domain/split is drawn from
      ``default_rng([seed, domain, split, i])`` and the target palette permutation from ``seed``.
    - ``height``, ``width``: image size in pixels.
    - ``source_images``, ``target_train``, ``target_val``: image counts (source has no split);
      ``source_images`` may be 0 (a target-only directory, as for the :data:`VARIANTS`).
    - ``gap`` in [0, 1]: strength of the appearance shift. Palette permutation and desaturation, texture
      and sensor noise, lighting gradient, colour cast, shadows and blur all scale with it; 0 renders the
      target like the source. A CPU probe (ResNet-18 to layer3 from scratch, 600 SGD steps of batch 8,
      target val mIoU over the 12 classes) gave source-only / target-trained oracle / +300 steps of
      entropy minimisation: 23.0 / 52.9 / 35.8 at gap 0.4, 19.1 / 52.8 / 24.3 at the default 0.5,
      14.7 / 51.8 / 18.4 at 0.6 and 11.0 / 51.3 / 11.4 at 0.8.
    - ``frequency_shift`` in [0, 1]: how much class frequencies differ (0: the same world model).
    - ``shape_shift`` in [0, 1]: how much layout (horizon, road and sidewalk widths, building heights) and
      object proportions (cars, persons) differ between the domains.

    Target rendering only (weather and light; the defaults change nothing):

    - ``illumination`` in [0.1, 2] (1): scene brightness factor.
    - ``contrast`` in [0.1, 2] (1): contrast about each image's mean.
    - ``haze`` in [0, 1] (0): fog, the weight of a pale haze colour, highest at the horizon row and
      fading above and below it (the sky takes it fully).
    - ``tint`` in [-1, 1] (0): colour cast, warm (red up, blue down) above 0, blue below.
    - ``noise`` in [0, 5] (1): factor on the target's grain and sensor noise.

    Target world only (another city; the defaults change nothing):

    - ``target_rare`` in [0, 4] (1): factor on the mean counts of persons, poles (and so traffic signs)
      and buses, and on the fence probability.
    - ``target_green`` in [0, 1] (0): turns building blocks into vegetation and open blocks, adds grass
      verges and trees, lowers the buildings.
    - ``target_road`` in [0.5, 2] (1): factor on the road width.
    - ``target_horizon`` in [-0.15, 0.15] (0): shift of the mean horizon row, a fraction of the height
      (above 0: lower in the image, more sky).
    """

    seed: int = 0
    height: int = 64
    width: int = 128
    source_images: int = 600
    target_train: int = 600
    target_val: int = 2000
    gap: float = 0.5
    frequency_shift: float = 0.5
    shape_shift: float = 0.5
    illumination: float = 1.0
    contrast: float = 1.0
    haze: float = 0.0
    tint: float = 0.0
    noise: float = 1.0
    target_rare: float = 1.0
    target_green: float = 0.0
    target_road: float = 1.0
    target_horizon: float = 0.0

    def __post_init__(self):
        for name in ("seed", "height", "width", "source_images", "target_train", "target_val"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"minicity knob {name} must be an integer, got {value!r}")
        if self.height < 16 or self.width < 16:
            raise ValueError(f"minicity images must be at least 16x16 pixels, got {self.width}x{self.height}")
        if self.source_images < 0 or min(self.target_train, self.target_val) < 1:
            raise ValueError("minicity image counts must be >= 1 (target_train, target_val) and >= 0 "
                             "(source_images)")
        for name, (lo, hi) in _RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
                raise ValueError(f"minicity knob {name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
            object.__setattr__(self, name, float(value))

    @property
    def total_images(self) -> int:
        """Images over both domains and splits."""
        return self.source_images + self.target_train + self.target_val

    def to_dict(self) -> dict:
        """The knobs, without the later knobs left at their defaults (see :data:`_LATER_KNOBS`)."""
        defaults = {f.name: f.default for f in fields(MinicityConfig)}
        return {k: v for k, v in asdict(self).items() if k not in _LATER_KNOBS or v != defaults[k]}

    def key(self) -> str:
        """Short hash of the knobs and the generator version."""
        text = json.dumps({"version": VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Variant:
    """A named target city (module docstring): ``knobs`` set over :class:`MinicityConfig`'s defaults, all of
    them target-only; ``summary`` says what shift it is."""

    summary: str
    knobs: tuple[tuple[str, float], ...]

    def config(self, **overrides) -> MinicityConfig:
        """The variant's config: no source images, the default image counts, ``overrides`` last."""
        return MinicityConfig(**{"source_images": 0, **dict(self.knobs), **overrides})


_DUSK = (("illumination", 0.8), ("contrast", 0.85), ("tint", -0.3), ("noise", 1.5))
_NIGHT = (("illumination", 0.5), ("contrast", 0.65), ("tint", -0.5), ("noise", 2.5))
_SUBURB = (("target_rare", 0.3), ("target_green", 0.6), ("target_road", 1.35), ("target_horizon", 0.06))
#: The named variants (``minicity:NAME`` dataset specs). Changing a variant's knobs regenerates its data (a
#: new config hash), but the stage cache keys runs on the spec string and would not notice: add a new name.
VARIANTS = {
    "dusk": Variant("appearance: darker, lower contrast, blue cast, more noise (same scenes)", _DUSK),
    "night": Variant("appearance: very dark, low contrast, strong blue cast and noise (same scenes)", _NIGHT),
    "fog": Variant("appearance: haze thickening towards the horizon, low contrast (same scenes)",
                   (("haze", 0.75), ("contrast", 0.75))),
    "suburb": Variant("class frequencies and layout: rare classes 2.5-5x rarer, wide roads, green, low horizon",
                      _SUBURB),
    "suburb-dusk": Variant("both: suburb at dusk", _SUBURB + _DUSK),
}


def variant_config(name: str, **overrides) -> MinicityConfig:
    """The config of variant ``name`` (``ValueError`` listing the valid names if there is none)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown minicity variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    return VARIANTS[name].config(**overrides)


# ------------------------------------------------------------------------------------------- world model


@dataclass(frozen=True)
class _World:
    """Per-domain distribution of scenes (lengths in camera heights, counts are Poisson means)."""

    horizon: float  # mean horizon row, fraction of the image height
    road: float  # mean road half-width
    sidewalk: float  # mean sidewalk width
    verge_p: float  # probability of a grass verge between sidewalk and facades (per side)
    building_h: float  # mean building height
    facade: tuple[float, float, float]  # probabilities of a building / vegetation / open block
    cars: float
    buses: float
    persons: float
    poles: float
    trees: float
    fence_p: float
    car_aspect: float  # car width / height multiplier
    person_h: float  # mean person height


def _world(domain: str, cfg: MinicityConfig) -> _World:
    """The source world leans one way and the target the other, by the frequency and shape knobs; the
    target-only knobs then move the target (:func:`_target_city`)."""
    f = cfg.frequency_shift * (1 if domain == "source" else -1)
    s = cfg.shape_shift * (-0.5 if domain == "source" else 0.5)
    veg = 0.2 * (1 - 0.6 * f)
    build = 0.55 * (1 - 0.15 * f)
    world = _World(
        horizon=0.42 + 0.08 * s, road=1.45 * (1 - 0.35 * s), sidewalk=0.55 * (1 + 0.5 * s),
        verge_p=0.35 * (1 - 0.6 * f), building_h=5.5 * (1 + 0.4 * s),
        facade=(build, veg, 1 - build - veg), cars=3.0 * (1 + 0.7 * f), buses=0.35 * (1 + 0.8 * f),
        persons=2.5 * (1 + 0.7 * f), poles=2.0 * (1 + 0.5 * f), trees=1.6 * (1 - 0.7 * f),
        fence_p=0.35 * (1 - 0.3 * f), car_aspect=1 - 0.2 * s, person_h=1.12 * (1 + 0.15 * s),
    )  # fmt: skip
    return world if domain == "source" else _target_city(world, cfg)


def _target_city(world: _World, cfg: MinicityConfig) -> _World:
    """The target world moved by the target-only city knobs (unchanged at their defaults)."""
    rare, green = cfg.target_rare, cfg.target_green
    build, veg, _ = world.facade
    greener = build * (1 - 0.7 * green)  # building blocks turned: 60 % to vegetation, the rest open
    veg += (build - greener) * 0.6
    return replace(
        world, horizon=world.horizon + cfg.target_horizon, road=world.road * cfg.target_road,
        verge_p=world.verge_p + (1 - world.verge_p) * 0.8 * green, building_h=world.building_h * (1 - 0.4 * green),
        facade=(greener, veg, 1 - greener - veg), buses=world.buses * rare, persons=world.persons * rare,
        poles=world.poles * rare, trees=world.trees * (1 + green), fence_p=world.fence_p * rare,
    )  # fmt: skip


class _Canvas:
    """Label, detail and instance maps of one scene, plus each instance's random paint and brightness and
    the horizon row."""

    def __init__(self, rng: np.random.Generator, h: int, w: int):
        self.rng, self.h, self.w = rng, h, w
        self.horizon = h / 2
        self.label = np.full((h, w), SKY, np.uint8)
        self.detail = np.zeros((h, w), np.uint8)
        self.inst = np.zeros((h, w), np.uint8)
        self.paints: list[np.ndarray] = [np.zeros(3)]  # hue, saturation, value in [0, 1]
        self.bright: list[float] = [1.0]

    def instance(self) -> int:
        if len(self.paints) == 255:
            return 254
        self.paints.append(self.rng.random(3))
        self.bright.append(1 + self.rng.uniform(-0.15, 0.15))
        return len(self.paints) - 1

    def _box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        a, c = round(x0), round(y0)
        b, d = max(round(x1), a + 1), max(round(y1), c + 1)
        a, b, c, d = max(a, 0), min(b, self.w), max(c, 0), min(d, self.h)
        return (slice(c, d), slice(a, b)) if a < b and c < d else None

    def rect(self, x0, x1, y0, y1, cls: int, inst: int, detail: int = PLAIN) -> None:
        """Fill the pixel rectangle (at least one pixel wide and high) with a class, or just a detail."""
        box = self._box(x0, x1, y0, y1)
        if box is not None:
            if cls >= 0:
                self.label[box], self.inst[box] = cls, inst
            self.detail[box] = detail

    def ellipse(self, cx, cy, rx, ry, cls: int, inst: int, detail: int = PLAIN) -> None:
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        box = self._box(cx - rx, cx + rx, cy - ry, cy + ry)
        if box is None:
            return
        yy = np.arange(box[0].start, box[0].stop)[:, None] + 0.5
        xx = np.arange(box[1].start, box[1].stop)[None, :] + 0.5
        m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        if cls >= 0:
            self.label[box][m], self.inst[box][m] = cls, inst
        self.detail[box][m] = detail


def _noise1d(rng: np.random.Generator, n: int, cell: float) -> np.ndarray:
    """Smooth 1-D noise (about unit variance), linearly interpolated between knots ``cell`` apart."""
    knots = rng.standard_normal(int(n / cell) + 2)
    return np.interp(np.arange(n) / cell, np.arange(len(knots)), knots)


def _noise2d(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth 2-D noise (about unit variance): bilinear interpolation of a coarse Gaussian grid."""
    grid = rng.standard_normal((int(h / cell) + 2, int(w / cell) + 2))
    y, x = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    g = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    g2 = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return (g * (1 - fy) + g2 * fy) * 1.6


@dataclass(frozen=True)
class _Street:
    """One scene's street layout, in camera heights (see :func:`_scene`), and the pixel grids it is drawn on."""

    h: int
    w: int
    yh: float  # horizon row
    xv: float  # vanishing point's column
    c: float  # road centre relative to the camera
    r: float  # road half-width
    walk: list[float]  # sidewalk width per side (0 left, 1 right)
    verge: list[float]  # grass verge width per side
    xs: np.ndarray  # pixel-centre columns, 1×w
    dy: np.ndarray  # pixel-centre rows below the horizon, h×1
    zmin: float  # the nearest and farthest depth an object stands at
    zmax: float

    def lateral(self, where: float, k: int) -> float:
        """Lateral position on side k (0 left, 1 right): ``where`` 0 at the kerb, 1 at the facade."""
        sgn = 2 * k - 1
        return self.c + sgn * (self.r + 0.15 + where * max(self.walk[k] + self.verge[k] - 0.3, 0.2))


def _scene(rng: np.random.Generator, h: int, w: int, world: _World, ego: bool) -> _Canvas:
    """Draw one street scene's geometry. Units: lengths in camera heights, the focal length is ``h`` px.

    A ground point at lateral offset X and depth Z projects to ``x = xv + X q``, ``y = yh + q`` with
    ``q = h / Z`` (pixels per camera height at that depth); everything at depth Z scales with q.
    """
    cv = _Canvas(rng, h, w)
    yh = cv.horizon = h * float(np.clip(world.horizon + rng.normal(0, 0.035), 0.25, 0.6))
    xv = w * rng.uniform(0.38, 0.62)
    ys, xs = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    c = rng.uniform(-0.35, 0.35)
    r = world.road * rng.uniform(0.75, 1.25)
    walk = [world.sidewalk * rng.uniform(0.6, 1.4) if rng.random() < 0.9 else 0.0 for _ in range(2)]
    verge = [rng.uniform(0.4, 2.0) if rng.random() < world.verge_p else 0.0 for _ in range(2)]
    street = _Street(h=h, w=w, yh=yh, xv=xv, c=c, r=r, walk=walk, verge=verge, xs=xs, dy=ys - yh,
                     zmin=h / ((h - yh) * 1.1), zmax=h / 3.0)
    _ground(cv, rng, street)
    for k, sgn in enumerate((-1, 1)):
        _facade(cv, rng, street, world, k, sgn)
    for z, kind_name, v in _objects(rng, street, world):  # far to near
        q = h / z
        _DRAW[kind_name](cv, rng, street, world, q, yh + q, int(v < 0.5))
    veg = cv.label == VEGETATION
    leaves = _noise2d(rng, h, w, 1.5) > 0.3
    cv.detail[veg & leaves & (cv.detail == PLAIN)] = SHADE
    if ego:
        cx, ry = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.07, 0.13)
        cv.ellipse(cx, h * 1.03, w * 0.8, ry, VOID, cv.instance())
    return cv


def _ground(cv: _Canvas, rng: np.random.Generator, st: _Street) -> None:
    """Road, sidewalk, then terrain, by the lateral offset from the road centre; the dashed centre line."""
    dy = st.dy
    ground = (dy > 0) & np.ones((1, st.w), bool)
    u = (st.xs - st.xv) / np.maximum(dy, 1e-3) - st.c
    side = (u > 0).astype(int)
    a = np.abs(u)
    ground_cls = np.where(a < st.r, ROAD, np.where(a < st.r + np.take(st.walk, side), SIDEWALK, TERRAIN))
    cv.label[ground] = ground_cls[ground]
    depth = st.h / np.maximum(dy, 1e-3)
    dash = (np.abs(u) < 0.045) & (np.mod(depth / 4.0 + rng.random(), 1) < 0.5) & (dy > 2) & ground
    if rng.random() < 0.8:
        cv.detail[dash] = LIGHT


def _facade(cv: _Canvas, rng: np.random.Generator, st: _Street, world: _World, k: int, sgn: int) -> None:
    """Side k's facade: a vertical plane split along the street into building / vegetation / open blocks,
    with windows where they are resolvable."""
    h, w, dy = st.h, st.w, st.dy
    X = st.c + sgn * (st.r + st.walk[k] + st.verge[k])
    q = (st.xs[0] - st.xv) / X  # pixels per camera height of the facade in each column
    cols = q > 0.25
    if not cols.any():
        return
    zcol = h / np.maximum(q, 0.25)
    bounds = np.cumsum(rng.uniform(5, 18, 40)) + rng.uniform(-8, 0)
    kind = rng.choice(3, size=41, p=world.facade)
    height = world.building_h * rng.uniform(0.4, 1.8, 41)
    height[kind == 1] = rng.uniform(0.8, 2.6, int((kind == 1).sum()))
    blk = np.searchsorted(bounds, zcol)
    top = height[blk] * np.where(kind[blk] == 1, 1 + 0.2 * _noise1d(rng, w, 3), 1.0)
    hgt = 1 - dy / np.maximum(q, 0.25)  # height of the facade point seen by each pixel
    m = cols & (hgt >= 0) & (hgt <= top) & (kind[blk] != 2)
    inst = np.zeros(41, np.uint8)
    for b in np.unique(blk[cols & (kind[blk] != 2)]):
        inst[b] = cv.instance()
    cls = np.where(kind[blk] == 0, BUILDING, VEGETATION) * np.ones((h, 1), np.uint8)
    cv.label[m], cv.inst[m] = cls[m], (inst[blk] * np.ones((h, 1), np.uint8))[m]
    # Windows where they are resolvable: a grid in (depth, height) facade coordinates.
    pz, ph = rng.uniform(1.6, 2.6), rng.uniform(1.6, 2.2)
    fine = h / (np.maximum(q, 0.25) ** 2 * abs(X)) < pz / 3
    win = (np.mod(zcol / pz, 1) > 0.35) & (np.mod(hgt / ph + 0.5, 1) > 0.45)
    win &= (hgt > 0.8) & (hgt < top - 0.3)
    cv.detail[m & win & fine & (kind[blk] == 0)] = DARK


def _objects(rng: np.random.Generator, st: _Street, world: _World) -> list[tuple[float, str, float]]:
    """The objects standing on the ground — (depth, kind, a uniform draw for the side) — far to near."""
    objects: list[tuple[float, str, float]] = []
    for kind_name, lam in (("car", world.cars), ("bus", world.buses), ("person", world.persons),
                           ("pole", world.poles), ("tree", world.trees)):
        for z in np.exp(rng.uniform(np.log(st.zmin), np.log(st.zmax), rng.poisson(lam))):
            objects.append((float(z), kind_name, float(rng.random())))
    if rng.random() < world.fence_p:
        objects.append((st.zmax * 2, "fence", float(rng.random())))
    objects.sort(key=lambda o: -o[0])
    return objects


def _car(cv: _Canvas, rng: np.random.Generator, st: _Street, world: _World, q: float, yb: float, k: int) -> None:
    cw, ch = 1.15 * world.car_aspect * rng.uniform(0.9, 1.1), 0.95 * rng.uniform(0.85, 1.15)
    xc = st.xv + (st.c + rng.uniform(-1, 1) * max(st.r - 0.6, 0.05)) * q
    W_, H_ = cw * q, ch * q
    i = cv.instance()
    cv.rect(xc - W_ / 2, xc + W_ / 2, yb - 0.6 * H_, yb - 0.14 * H_, CAR, i)
    cv.rect(xc - 0.4 * W_, xc + 0.4 * W_, yb - 0.97 * H_, yb - 0.6 * H_, CAR, i)
    cv.rect(xc - 0.33 * W_, xc + 0.33 * W_, yb - 0.92 * H_, yb - 0.64 * H_, -1, i, DARK)
    for sx in (-1, 1):
        cv.rect(xc + sx * 0.48 * W_ - 0.09 * W_, xc + sx * 0.48 * W_ + 0.09 * W_, yb - 0.22 * H_, yb,
                CAR, i, DARK)
        cv.rect(xc + sx * 0.4 * W_ - 0.06 * W_, xc + sx * 0.4 * W_ + 0.06 * W_, yb - 0.5 * H_,
                yb - 0.42 * H_, -1, i, LIGHT)


def _bus(cv: _Canvas, rng: np.random.Generator, st: _Street, world: _World, q: float, yb: float, k: int) -> None:
    W_, H_ = 1.75 * q, 2.1 * rng.uniform(0.9, 1.1) * q
    xc = st.xv + (st.c + rng.uniform(-1, 1) * max(st.r - 0.9, 0.05)) * q
    i = cv.instance()
    cv.rect(xc - W_ / 2, xc + W_ / 2, yb - H_, yb - 0.1 * H_, BUS, i)
    cv.rect(xc - 0.45 * W_, xc + 0.45 * W_, yb - 0.86 * H_, yb - 0.52 * H_, -1, i, DARK)
    cv.rect(xc - 0.25 * W_, xc + 0.25 * W_, yb - 0.96 * H_, yb - 0.9 * H_, -1, i, LIGHT)
    for sx in (-1, 1):
        cv.rect(xc + sx * 0.36 * W_ - 0.08 * W_, xc + sx * 0.36 * W_ + 0.08 * W_, yb - 0.15 * H_, yb,
                BUS, i, DARK)


def _person(cv: _Canvas, rng: np.random.Generator, st: _Street, world: _World, q: float, yb: float, k: int) -> None:
    ph = world.person_h * rng.uniform(0.85, 1.15) * q
    xc = st.xv + st.lateral(rng.uniform(0, 0.8), k) * q
    i = cv.instance()
    for sx in (-1, 1):
        leg = xc + sx * 0.065 * ph
        cv.rect(leg - 0.045 * ph, leg + 0.045 * ph, yb - 0.5 * ph, yb, PERSON, i, SHADE)
    cv.ellipse(xc, yb - 0.66 * ph, 0.14 * ph, 0.2 * ph, PERSON, i)
    cv.ellipse(xc, yb - 0.9 * ph, 0.07 * ph, 0.08 * ph, PERSON, i, LIGHT)


def _pole(cv: _Canvas, rng: np.random.Generator, st: _Street, world: _World, q: float, yb: float, k: int) -> None:
    """A pole, with a square or round traffic sign on 65 % of them."""
    hp = rng.uniform(2.2, 3.4) * q
    xc = st.xv + st.lateral(rng.uniform(0, 0.3), k) * q
    cv.rect(xc - 0.06 * q, xc + 0.06 * q, yb - hp, yb, POLE, cv.instance())
    if rng.random() < 0.65:
        i, s = cv.instance(), rng.uniform(0.5, 0.8) * q
        ys_ = yb - hp + 0.6 * s
        if rng.random() < 0.5:
            cv.rect(xc - s / 2, xc + s / 2, ys_ - s / 2, ys_ + s / 2, SIGN, i)
            cv.rect(xc - s / 3, xc + s / 3, ys_ - s / 3, ys_ + s / 3, -1, i, LIGHT)
        else:
            cv.ellipse(xc, ys_, s / 2, s / 2, SIGN, i)
            cv.ellipse(xc, ys_, s / 3, s / 3, -1, i, LIGHT)


def _tree(cv: _Canvas, rng: np.random.Generator, st: _Street, world: _World, q: float, yb: float, k: int) -> None:
    xc = st.xv + st.lateral(rng.uniform(0.3, 1.0), k) * q
    i = cv.instance()
    cv.rect(xc - 0.07 * q, xc + 0.07 * q, yb - 1.6 * q, yb, VEGETATION, i, SHADE)
    hc = rng.uniform(2.0, 3.0)
    for _ in range(rng.integers(3, 7)):
        cv.ellipse(xc + rng.uniform(-0.6, 0.6) * q, yb - (hc + rng.uniform(-0.5, 0.5)) * q,
                   rng.uniform(0.45, 0.9) * q, rng.uniform(0.4, 0.8) * q, VEGETATION, i)


def _fence(cv: _Canvas, rng: np.random.Generator, st: _Street, world: _World, q: float, yb: float, k: int) -> None:
    """A fence along the kerb side of the sidewalk's outer edge, over a stretch of the street."""
    h, dy = st.h, st.dy
    X = st.c + (2 * k - 1) * (st.r + st.walk[k])
    q = (st.xs[0] - st.xv) / X
    z0 = rng.uniform(st.zmin, st.zmax / 4)
    zc = h / np.maximum(q, 0.25)
    cols = (q > 0.25) & (zc > z0) & (zc < z0 + rng.uniform(10, 60))
    hf = rng.uniform(0.45, 0.8)
    hgt = 1 - dy / np.maximum(q, 0.25)
    m = cols & (hgt >= 0) & (hgt <= hf)
    cv.label[m], cv.inst[m] = FENCE, cv.instance()
    fine = h / (np.maximum(q, 0.25) ** 2 * abs(X)) < 0.25
    holes = (np.mod(zc / 0.7, 1) > 0.3) & (hgt < hf - 0.12) & (hgt > 0.08) & fine
    cv.detail[m & holes] = DARK
    cv.detail[m & ~holes] = PLAIN


#: How each kind of object is drawn: ``draw(canvas, rng, street, world, q, bottom row, side)``.
_DRAW = {"car": _car, "bus": _bus, "person": _person, "pole": _pole, "tree": _tree, "fence": _fence}


# ------------------------------------------------------------------------------------------------ rendering


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """N×3 HSV in [0, 1] → N×3 RGB in [0, 255]."""
    hh, s, v = hsv[:, 0] * 6, hsv[:, 1], hsv[:, 2]
    i = np.floor(hh).astype(int) % 6
    f = hh - np.floor(hh)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sectors = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
    table = np.stack([np.stack(x, 1) for x in sectors])
    return table[i, np.arange(len(i))] * 255


def _gray(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _desaturate(rgb: np.ndarray, amount: float) -> np.ndarray:
    return rgb + (_gray(rgb)[..., None] - rgb) * amount


def _blur(img: np.ndarray) -> np.ndarray:
    """3×3 binomial blur with edge padding."""
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    v = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (v[:, :-2] + 2 * v[:, 1:-1] + v[:, 2:]) / 4


def target_palette(config: MinicityConfig) -> np.ndarray:
    """The target's class colours: the source palette moved towards a seed-drawn derangement of itself
    by ``gap``, then desaturated and dulled by ``gap``."""
    rng = np.random.default_rng([config.seed, 7919])
    n = len(CLASSES)
    perm = np.arange(n)
    while (perm == np.arange(n)).any():
        perm = rng.permutation(n)
    g = config.gap
    pal = _PALETTE.copy()
    pal[:n] = _PALETTE[:n] + (_PALETTE[perm] - _PALETTE[:n]) * g
    pal[:n] = _desaturate(pal[:n], 0.55 * g) * (1 - 0.2 * g) + 20 * g
    return pal


def _weather(rng: np.random.Generator, img: np.ndarray, cv: _Canvas, cfg: MinicityConfig) -> np.ndarray:
    """The target's weather and light knobs (haze, illumination, contrast, tint), before the camera's blur
    and noise. Draws from ``rng`` only when haze is on."""
    if cfg.haze > 0:
        rows = np.abs(np.arange(cv.h) + 0.5 - cv.horizon)[:, None] / cv.h
        weight = cfg.haze * np.where(cv.label == SKY, 1.0, np.exp(-5 * rows))
        haze = np.array((198, 202, 206), np.float32) * (1 + 0.04 * _noise2d(rng, cv.h, cv.w, 12.0))[..., None]
        img += (haze - img) * weight[..., None]
    if cfg.illumination != 1:
        img *= cfg.illumination
    if cfg.contrast != 1:
        mean = img.mean((0, 1), keepdims=True)
        img = mean + (img - mean) * cfg.contrast
    if cfg.tint != 0:
        img *= np.array((1 + 0.25 * cfg.tint, 1, 1 - 0.25 * cfg.tint), np.float32)
    return img


def _render(rng: np.random.Generator, cv: _Canvas, domain: str, palette: np.ndarray, cfg: MinicityConfig
            ) -> np.ndarray:
    """Colour a scene: class palette, instance paints, details, then the domain's camera effects (and, in
    the target, the weather and light knobs)."""
    h, w = cv.h, cv.w
    target = domain == "target"
    g = cfg.gap if target else 0.0
    paints = _hsv_to_rgb(np.stack(cv.paints) * [1, 0.5, 0.45] + [0, 0.5, 0.55]).astype(np.float32)
    if target:
        paints = _desaturate(paints, 0.6 * g) * (1 - 0.25 * g)
    weight = _PAINT[cv.label] * (cv.inst > 0)
    img = palette[cv.label]
    img += (paints[cv.inst] - img) * weight[..., None]
    img *= np.asarray(cv.bright, np.float32)[cv.inst][..., None]
    # Sky: darker towards the top.
    sky = cv.label == SKY
    ramp = np.clip(np.arange(h) / max(h * 0.45, 1), 0, 1)[:, None, None] * np.ones((1, w, 1))
    top = _SKY_TOP if not target else _desaturate(_SKY_TOP[None], 0.6 * g)[0] * (1 - 0.2 * g) + 20 * g
    img[sky] = (img * ramp + top * (1 - ramp))[sky]
    dark, light = np.array((22, 22, 28), np.float32), np.array((238, 238, 232), np.float32)
    d = cv.detail
    img[d == DARK] += (dark - img[d == DARK]) * 0.8
    img[d == LIGHT] += (light - img[d == LIGHT]) * (0.75 - 0.25 * g)
    img[d == SHADE] *= 0.6
    img *= rng.uniform(0.92, 1.08)  # exposure
    if target:
        amp = _TEXTURE[cv.label] * g  # class-dependent surface texture: fine grain plus blotches
        img *= (1 + amp * (0.6 * _noise2d(rng, h, w, 1.0) + 0.4 * _noise2d(rng, h, w, 3.0)))[..., None]
        img *= 1 + 0.12 * g * _noise2d(rng, h, w, 16.0)[..., None]  # uneven illumination
        slope = rng.uniform(0.5, 1.0) * rng.choice((-1, 1))
        img *= 1 + 0.5 * g * slope * (np.arange(w) / w - 0.5)[None, :, None]  # lighting gradient
        img *= 1 + 0.1 * g * rng.standard_normal(3).astype(np.float32)  # colour cast
        if rng.random() < 0.6 * g:  # a soft shadow across part of the scene
            ang, off = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3)
            ys, xs = np.arange(h)[:, None] / h - 0.5, np.arange(w)[None, :] / w - 0.5
            edge = np.clip((np.cos(ang) * xs + np.sin(ang) * ys - off) * 12, 0, 1)
            img *= 1 - 0.35 * g * edge[..., None]
        img = _weather(rng, img, cv, cfg)
        img += (_blur(img) - img) * g  # a small blur
        n = cfg.noise
        img += rng.normal(0, 9 * g * n, (h, w, 1)) + rng.normal(0, 4 * g * n, (h, w, 3))  # grain, sensor noise
    else:
        img += rng.normal(0, 1.5, (h, w, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ writing


def _jobs(out: Path, config: MinicityConfig) -> list[tuple[str, str, int, Path, Path]]:
    """(domain, split, index, image path, label path) of every image, in generation order."""
    jobs = []
    src = out / "source"
    for i in range(config.source_images):
        jobs.append(("source", "train", i, src / "images" / f"{i:05d}.png", src / "labels" / f"{i:05d}.png"))
    tgt = out / "target"
    for split, n in (("train", config.target_train), ("val", config.target_val)):
        for i in range(n):
            name = f"{CITY}_{i:06d}_000000"
            jobs.append(("target", split, i, tgt / "leftImg8bit" / split / CITY / f"{name}_leftImg8bit.png",
                         tgt / "gtFine" / split / CITY / f"{name}_gtFine_labelIds.png"))
    return jobs


def _frequencies(counts: np.ndarray) -> dict[str, float]:
    """Class → fraction of the labelled pixels."""
    total = max(int(counts[: len(CLASSES)].sum()), 1)
    return {name: round(float(counts[i]) / total, 5) for i, (name, _) in enumerate(CLASSES)}


def _render_jobs(jobs: list[tuple[str, str, int, Path, Path]], config: MinicityConfig) -> dict[str, np.ndarray]:
    """Draw, render and write the images of ``jobs``; return each domain's label-pixel counts. Every image
    has its own generator (module docstring), so any split of the jobs writes the same files."""
    h, w = config.height, config.width
    worlds = {d: _world(d, config) for d in DOMAINS}
    palettes = {"source": _PALETTE, "target": target_palette(config)}
    counts = {d: np.zeros(len(CLASSES) + 1, np.int64) for d in DOMAINS}
    codes = {"source": 0, "target": 1, "train": 0, "val": 1}
    for domain, split, i, image_path, label_path in jobs:
        rng = np.random.default_rng([config.seed, codes[domain], codes[split], i])
        ego = domain == "target" and rng.random() < 0.4
        cv = _scene(rng, h, w, worlds[domain], ego)
        image = _render(rng, cv, domain, palettes[domain], config)
        counts[domain] += np.bincount(cv.label.ravel(), minlength=len(CLASSES) + 1)
        Image.fromarray(image, "RGB").save(image_path)
        Image.fromarray(_ID_LUT[cv.label], "L").save(label_path)
    return counts


#: Below this many images generation stays in the calling process (a worker pool costs ~1 s to start).
PARALLEL_FROM = 200


def generation_processes(images: int) -> int:
    """How many processes render ``images`` images: one per CPU this process may use, at most 8."""
    if images < PARALLEL_FROM:
        return 1
    return max(1, min(8, usable_cpus()))


def generate(out_dir: str | Path, config: MinicityConfig | None = None, variant: str | None = None,
             processes: int | None = None) -> dict:
    """Write both renderings into ``out_dir`` (module docstring) and return ``minicity.json``'s content.

    The images are rendered by ``processes`` worker processes (default :func:`generation_processes`; the
    files are the same for any count). ``minicity.json`` is written last, so its presence marks a complete
    dataset; ``variant`` (a name in :data:`VARIANTS`, for the record) is written into it when given.
    """
    config = config or MinicityConfig()
    out = Path(out_dir)
    jobs = _jobs(out, config)
    for folder in sorted({path.parent for job in jobs for path in job[3:]}):
        folder.mkdir(parents=True, exist_ok=True)
    processes = generation_processes(len(jobs)) if processes is None else processes
    if processes <= 1:
        parts = [_render_jobs(jobs, config)]
    else:
        # a fork server: workers start from a clean process (no inherited threads), this module imported once
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            parts = list(pool.map(_render_jobs, [jobs[k::processes] for k in range(processes)],
                                  [config] * processes))
    counts = {d: sum(part[d] for part in parts) for d in DOMAINS}
    meta = {
        "name": "minicity",
        "version": VERSION,
        "config": config.to_dict(),
        "classes": [{"name": name, "id": cid} for name, cid in CLASSES],
        "images": {"source": config.source_images, "target/train": config.target_train,
                   "target/val": config.target_val},
        "size": [config.height, config.width],
        "pixel_frequencies": {d: _frequencies(counts[d]) for d in DOMAINS},
        "unlabelled_fraction": {d: round(float(counts[d][VOID] / max(counts[d].sum(), 1)), 5) for d in DOMAINS},
    }
    if variant is not None:
        meta = {"name": meta.pop("name"), "variant": variant, **meta}
    (out / "minicity.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def class_frequencies(root: str | Path) -> dict[str, dict[str, float]]:
    """Per-domain fraction of labelled pixels of each class, read back from the label files under ``root``."""
    root = Path(root)
    lut = np.full(256, len(CLASSES), np.int64)
    lut[_ID_LUT[: len(CLASSES)]] = np.arange(len(CLASSES))
    globs = {"source": root.glob("source/labels/*.png"),
             "target": root.glob("target/gtFine/*/*/*_gtFine_labelIds.png")}
    result = {}
    for domain, paths in globs.items():
        counts = np.zeros(len(CLASSES) + 1, np.int64)
        for path in sorted(paths):
            counts += np.bincount(lut[np.asarray(Image.open(path))].ravel(), minlength=len(CLASSES) + 1)
        result[domain] = _frequencies(counts)
    return result


# ------------------------------------------------------------------------------------------------ the cache


def _is_complete(root: Path, config: MinicityConfig) -> bool:
    try:
        meta = json.loads((root / "minicity.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == VERSION and meta.get("config") == config.to_dict()


def ensure_minicity(root: str | Path | None = None, *, variant: str | None = None, **knobs) -> Path:
    """The minicity directory for these knobs (see :class:`MinicityConfig`), generated on first use.

    ``variant`` names one of :data:`VARIANTS`: its knobs (target only, no source images, the default image
    counts) come first and ``knobs`` override them. ``root`` defaults to
    ``$RAYUDA_CACHE/minicity-<config hash>``. Generation runs under an exclusive file lock (concurrent
    callers wait and then reuse the result) into a temporary directory that is renamed into place, so a
    reader never sees a half-written dataset. An existing ``root`` holding something else raises
    ``ValueError``.
    """
    names = {f.name for f in fields(MinicityConfig)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        valid = ", ".join(sorted(names))
        raise ValueError(f"unknown minicity knob(s) {', '.join(unknown)}; valid knobs: {valid}")
    config = variant_config(variant, **knobs) if variant is not None else MinicityConfig(**knobs)
    root = Path(root).expanduser() if root is not None else cache_root() / f"minicity-{config.key()}"
    if _is_complete(root, config):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(root, config):
            return root
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ValueError(f"{root}: exists but does not hold minicity for this config; "
                             "remove it or choose another directory")
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            what = "minicity" if variant is None else f"minicity variant {variant}"
            print(f"generating {what} ({config.total_images} images) into {root}", file=sys.stderr, flush=True)
            generate(tmp, config, variant)
            if root.exists():
                root.rmdir()
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return root


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayuda.data.minicity",
                                     description="Generate the minicity benchmark into a directory.")
    parser.add_argument("--out", required=True, help="output directory (files in it are overwritten)")
    parser.add_argument("--variant", choices=list(VARIANTS),
                        help="a named target city (target only; the knobs below override its own)")
    parser.add_argument("--processes", type=int, default=None,
                        help="worker processes rendering the images (default: one per CPU, at most 8)")
    defaults = MinicityConfig()
    for f in fields(MinicityConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                            default=argparse.SUPPRESS, help=f"(default {getattr(defaults, f.name)})")
    args = vars(parser.parse_args(argv))
    out, variant, processes = Path(args.pop("out")), args.pop("variant"), args.pop("processes")
    try:
        config = variant_config(variant, **args) if variant else MinicityConfig(**args)
    except ValueError as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    meta = generate(out, config, variant, processes)
    seconds = time.perf_counter() - start
    what = f"minicity v{VERSION}" + (f" variant {variant}" if variant else "")
    print(f"{what} in {out} ({seconds:.1f} s): {config.source_images} source images, "
          f"{config.target_train} target train + {config.target_val} target val, "
          f"{config.width}x{config.height} pixels")
    freqs = meta["pixel_frequencies"]
    domains = [d for d in DOMAINS if d == "target" or config.source_images]
    print(f"{'class (id)':<20}" + "".join(f"{d:>9}" for d in domains))
    for name, cid in CLASSES:
        print(f"{f'{name} ({cid})':<20}" + "".join(f"{freqs[d][name]:>9.2%}" for d in domains))
    return 0


if __name__ == "__main__":
    sys.exit(main())
