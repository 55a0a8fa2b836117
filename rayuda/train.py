"""``python -m rayuda.train METHOD``: one run of one method, no Ray — the same function a Tune trial calls.

Examples::

    python -m rayuda.train advent --out runs/advent
    python -m rayuda.train cram --target folder:/data/mycity --set params.w_adv=0.002 --iters 2000
    python -m rayuda.train advent --config best.yaml        # a search's best config
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rayuda.config import ConfigError, parse_assignments, set_key
from rayuda.data import DatasetError
from rayuda.engine import run_pipeline
from rayuda.engine.loop import NonFiniteLoss
from rayuda.engine.plan import final_stage
from rayuda.methods import METHODS, resolve_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rayuda.train", description=__doc__.split("\n")[0])
    parser.add_argument("method", help=f"one of: {', '.join(sorted(METHODS))}")
    parser.add_argument("--source", help="source dataset SPEC (minicity, gta5:PATH, synthia:PATH, ...)")
    parser.add_argument("--target", help="target dataset SPEC (minicity, cityscapes:PATH, folder:PATH, ...)")
    parser.add_argument("--config", help="YAML config file (e.g. a search's best.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set params.w_adv=0.002 (repeatable)")
    parser.add_argument("--iters", type=int,
                        help="iterations of the method's last reported stage (stages.<name>.iters)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--deterministic", action="store_true", help="torch deterministic algorithms")
    parser.add_argument("--out", default=None, help="output directory (default runs/METHOD-seedS)")
    parser.add_argument("--cache-dir", default=None, help="stage cache (default $RAYUDA_CACHE/stages)")
    parser.add_argument("--force-new", action="store_true",
                        help="--out holds a run of another config: move it aside to OUT.old-N and start anew")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = None
    try:
        if args.method not in METHODS:
            raise ConfigError(f"unknown method {args.method!r}; valid methods: {', '.join(sorted(METHODS))}")
        overrides = parse_assignments(args.set)
        for key, value in (("source", args.source), ("target", args.target), ("seed", args.seed),
                           ("train.deterministic", args.deterministic or None)):
            if value is not None:
                overrides[key] = value
        cfg = resolve_config(args.method, overrides, args.config)
        if args.iters is not None:
            if args.iters < 1:
                raise ConfigError(f"--iters must be ≥ 1, got {args.iters}")
            set_key(cfg, f"stages.{final_stage(cfg)}.iters", args.iters, source="--iters")
        out = Path(args.out or f"runs/{args.method}-seed{cfg['seed']}")
        summary = run_pipeline(cfg, out, cache_dir=args.cache_dir, force_new=args.force_new)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a != "--force-new")
        if args.out is None and out is not None:
            again += f" --out {shlex.quote(str(out))}"
        print(f"\ninterrupted; every finished stage and the last checkpoint are kept. Resume with:\n"
              f"  python -m rayuda.train {again}", file=sys.stderr)
        return 130
    test = (summary.get("test") or {}).get("final")
    result = (f"test mIoU {100 * test['miou']:.2f} on {summary['test']['images']} test images" if test
              else f"mIoU {100 * summary['miou']:.2f} on the selection images (no test images)")
    print(f"{summary['method']}: {result}; {summary['selection_metric']} score {summary['score']:.4f} on the "
          f"selection images; {summary['seconds']:.0f} s → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
