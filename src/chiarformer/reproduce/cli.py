"""The `reproduce` subcommand, added to `chiar` by `register(subparsers)` (the work is imported
only when the command runs).

    chiar reproduce [--scale smoke|cpu|paper] [--only E1,E3] [--seeds N] [--plan] --out runs/reproduce
    chiar reproduce --report [--scale cpu]      docs/claims.md and figures from the records
"""

from __future__ import annotations

from .matrix import DEFAULT_SEEDS, SCALES


def cmd_reproduce(args) -> int:
    if args.report:  # reads the records only
        from pathlib import Path

        from .report import write_report

        written = write_report(Path(args.results), args.scale, Path(args.claims), Path(args.figures))
        print(f"wrote {args.claims} ({len(written)} figure(s) in {args.figures})", flush=True)
        return 0
    from .run import main

    return main(args)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "reproduce", help="run the paper's experiment matrix (claims E1-E8) with seeds, or --report the verdicts",
        description="Print the plan (runs, estimated time each, total), then run what is not complete: runs "
                    "with a record are skipped (the record alone counts: run folders need not survive), "
                    "interrupted ones resume from their last checkpoint. Each finished run leaves a small record "
                    "in RESULTS/<scale>/<run>.json; --report aggregates the records into docs/claims.md and figures.")
    p.add_argument("--scale", default="cpu", choices=SCALES,
                   help="paper = the published protocol (GPU and data needed); cpu = the reduced protocol for 2 CPU "
                        "cores (default); smoke = every run for a few steps (a test)")
    p.add_argument("--only", default=None, metavar="E1,E3", help="only these experiments (E7 also runs the E1 runs it reads)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="seeds 0..N-1 per configuration (default: " + ", ".join(f"{k} {v}" for k, v in
                                                                             DEFAULT_SEEDS.items()) + ")")
    p.add_argument("--out", default="runs/reproduce", metavar="DIR", help="run folders go to DIR/<scale>/<run>")
    p.add_argument("--results", default="results/reproduce", metavar="DIR",
                   help="records of finished runs (committable, no checkpoints) go to DIR/<scale>/")
    p.add_argument("--plan", action="store_true", help="print the plan and stop")
    p.add_argument("--report", action="store_true", help="write --claims and figures from the records, train nothing")
    p.add_argument("--claims", default="docs/claims.md", metavar="FILE.md", help="where --report writes")
    p.add_argument("--figures", default="docs/figures/claims", metavar="DIR", help="where --report puts its PNGs")
    p.add_argument("--verbose", action="store_true", help="show each run's own training output")
    p.set_defaults(func=cmd_reproduce)
