"""``check_inputs`` at the size of the stock GTA5 (24,966 pairs): a GTA5-layout folder of N small image/label pairs
(minicity's source rendering, copied in rotation: real PNGs, 64×128) with two bad pairs (labels one row short),
checked as a run checks it — source train, target train and target val (the folder is both) — in fresh
processes, so each phase's peak memory (``resource.getrusage``) is its own:

- ``cold``: nothing verified yet (every pair decoded), ``data.bad_pairs=skip``;
- ``warm``: the same again (every pair remembered in ``verified.json``: one ``stat`` per file);
- ``refuse``: the default policy, remembered pairs: the time to the one error line.

Each phase also times :func:`rayuda.engine.pipeline.input_digests` (what every run adds to its stage keys).

    python bench/check_inputs_scale.py                   # 25,000 pairs; ≈ 3 min on 2 cores; a markdown table
    python bench/check_inputs_scale.py --pairs 2000      # a quick look

The table goes into docs/BENCHMARKS.md (§17).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BAD = (15188, 17705)  # the stock GTA5's commonly cited pairs (kept at those indices when N allows)


def make_folder(root: Path, pairs: int) -> list[int]:
    """``root/images`` and ``root/labels`` with ``pairs`` pairs copied from minicity's source; returns the bad
    indices (labels rewritten one row short)."""
    import numpy as np
    from PIL import Image

    from rayuda.data.minicity import ensure_minicity

    source = ensure_minicity() / "source"
    images, labels = sorted((source / "images").glob("*.png")), sorted((source / "labels").glob("*.png"))
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(pairs):
        shutil.copyfile(images[i % len(images)], root / "images" / f"{i:05d}.png")
        shutil.copyfile(labels[i % len(labels)], root / "labels" / f"{i:05d}.png")
    bad = [i if i < pairs else pairs - 1 - n for n, i in enumerate(BAD)]
    for i in bad:
        path = root / "labels" / f"{i:05d}.png"
        with Image.open(path) as im:
            ids = np.array(im)
        Image.fromarray(ids[:-1]).save(path)
    return bad


def _status_kb(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process, in kB (Linux)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def phase(root: Path, policy: str) -> dict:
    """One check_inputs in this process: seconds; the process's peak RSS (``resource.getrusage``) before (imports,
    G built once) and after; the peak above the RSS it started from (``VmHWM`` reset through
    ``/proc/self/clear_refs``: what checking the data itself holds); the dropped pairs or the error."""
    from rayuda.config import ConfigError
    from rayuda.data import DatasetError, class_names, open_dataset
    from rayuda.engine.pipeline import check_inputs, input_digests
    from rayuda.methods import resolve_config
    from rayuda.models import build_segmenter

    spec = f"gta5:{root}"
    cfg = resolve_config("source_only", {"source": spec, "target": spec, "data.bad_pairs": policy})
    tic = time.perf_counter()
    build_segmenter(cfg["model"], 19)  # what check_inputs builds first (again): the memory baseline
    build_seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    open_dataset(spec, "train", role="source")  # the file listing alone, as every open of the dataset pays it
    listing_seconds = time.perf_counter() - tic
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start_kb = _status_kb("VmRSS")
    tic = time.perf_counter()
    try:
        dropped, error = len(check_inputs(cfg, class_names(19))), None
    except (ConfigError, DatasetError) as err:
        dropped, error = None, str(err)
    seconds = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tic = time.perf_counter()
    input_digests(cfg)  # what every run adds to its stage keys: source and target, both splits, one stat a file
    digest_seconds = time.perf_counter() - tic
    return {"seconds": seconds, "build_seconds": build_seconds, "listing_seconds": listing_seconds,
            "digest_seconds": digest_seconds,
            "rss_before_mb": before / 1024, "rss_peak_mb": after / 1024,
            "extra_peak_mb": (_status_kb("VmHWM") - start_kb) / 1024, "dropped": dropped, "error": error}


def run_phase(root: Path, cache: Path, policy: str) -> dict:
    """:func:`phase` in a fresh process (its own peak RSS); its stderr's progress lines counted."""
    env = {**os.environ, "RAYUDA_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--phase", policy, "--root", str(root)], capture_output=True,
                          text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("verifying")]
    result.update(progress_lines=len(lines), first_line=lines[0] if lines else "", last_line=lines[-1] if lines else "")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=25_000)
    parser.add_argument("--phase", choices=("skip", "refuse"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(Path(args.root), args.phase)))
        return
    with tempfile.TemporaryDirectory(prefix="rayuda-check-inputs-") as tmp:
        root, cache = Path(tmp) / "gta5", Path(tmp) / "cache"
        tic = time.perf_counter()
        bad = make_folder(root, args.pairs)
        made = time.perf_counter() - tic
        size = sum(p.stat().st_size for p in root.rglob("*.png")) / 2**20
        rows = [("cold (decode all)", run_phase(root, cache, "skip")),
                ("warm (remembered)", run_phase(root, cache, "skip")),
                ("refuse (remembered)", run_phase(root, cache, "refuse"))]
        verified = (cache / "verified.json").stat().st_size / 2**20
    print(f"{args.pairs} pairs ({size:.0f} MiB of PNGs, written in {made:.0f} s), bad pairs at {bad}, "
          f"{os.cpu_count()} CPUs; verified.json {verified:.1f} MiB\n")
    print("| phase | seconds | pairs/s | peak RSS before → after (MiB, getrusage) | peak above start (MiB) "
          "| progress lines | outcome |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        outcome = f"{r['dropped']} pairs dropped" if r["error"] is None else f"error ({len(r['error'])} chars)"
        rate = f"{args.pairs / r['seconds']:.0f}" if name.startswith("cold") else "—"
        print(f"| {name} | {r['seconds']:.1f} | {rate} | {r['rss_before_mb']:.0f} → {r['rss_peak_mb']:.0f} | "
              f"{r['extra_peak_mb']:.0f} | {r['progress_lines']} | {outcome} |")
    print(f"\nG built in {rows[1][1]['build_seconds']:.1f} s, the folder listed (open_dataset) in "
          f"{rows[1][1]['listing_seconds']:.2f} s (warm phase); check_inputs builds G once and lists it 3 times; "
          f"the stage keys' file digests (input_digests: 4 listings, a stat per file) took "
          f"{rows[1][1]['digest_seconds']:.2f} s")
    print(f"\nfirst progress line: {rows[0][1]['first_line']}\nlast progress line:  {rows[0][1]['last_line']}")
    print(f"refuse: error: {rows[2][1]['error']}")


if __name__ == "__main__":
    main()
