"""Which classes a pseudo-label pass gets wrong: per class, the pixels it labelled as the class over the pixels that
are the class ("× true") and the precision of those labels, from each pass's ``pseudo_labels.json``.

    python bench/pseudo_classes.py runs/sweep/cada-suburb-s0/stage-cache/thresholds1-* --classes bus person pole

Each argument is a pass's folder in the stage cache (or its ``pseudo_labels.json``). The counts are the ``truth``
record every pass writes when the target-train images have labels (``rayuda.pseudo``); a pass without it is named
and skipped. A class labelled on many times its true pixels at low precision is a prior the labels carry, which a
confidence threshold does not remove (docs/BENCHMARKS.md §35). Diagnostic only: nothing here is used for selection.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def class_rows(record: dict, classes: list[str] | None) -> list[tuple[str, float | None, float | None]]:
    """(class, labelled pixels / true pixels, precision) for ``classes`` (default: every class with true pixels)."""
    per_class = record["truth"]["per_class"]
    names = classes or [c for c, x in per_class.items() if x["true_pixels"]]
    unknown = [c for c in names if c not in per_class]
    if unknown:
        raise SystemExit(f"error: no class {', '.join(map(repr, unknown))} in the pass (it has {', '.join(per_class)})")
    rows = []
    for name in names:
        x = per_class[name]
        ratio = x["kept_pixels"] / x["true_pixels"] if x["true_pixels"] else None
        rows.append((name, ratio, x["precision"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("passes", nargs="+", type=Path, help="pass folders (or their pseudo_labels.json)")
    parser.add_argument("--classes", nargs="+", default=None, help="class names (default: every class present)")
    args = parser.parse_args(argv)
    for path in args.passes:
        file = path / "pseudo_labels.json" if path.is_dir() else path
        if not file.is_file():
            print(f"{path}: no pseudo_labels.json, skipped", file=sys.stderr)
            continue
        record = json.loads(file.read_text())
        if not record.get("truth"):
            print(f"{file}: no truth record (the target-train images have no labels), skipped", file=sys.stderr)
            continue
        rows = class_rows(record, args.classes)
        print(f"\n{file} (kept {100 * record['labelled_pixel_share']:.1f} % of the pixels)\n")
        print("| class | × true | precision |\n|---|---|---|")
        for name, ratio, precision in rows:
            shown = "–" if ratio is None else f"{ratio:.2f}×"
            print(f"| {name} | {shown} | {'–' if precision is None else f'{100 * precision:.1f} %'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
