"""Subcommands calibrate, route, flops and report, added to `chiar` by `register(subparsers)`.

    chiar calibrate --run R [--target-attn 0.25] [--method hidden|paper] [--baseline-run B]
    chiar route --run R "some text" [--html out.html] [--png out.png]
    chiar flops --preset P [--model LAYOUT] [--attn-fraction f] [--seq-len T] [--json]
    chiar report RUN... [--out docs/x.md]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import UserError


def _device(name: str) -> str:
    if name != "auto":
        if name == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UserError("--device cuda: no CUDA device is available")
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise UserError(f"expected a number in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise UserError(f"expected a positive integer, got {text}")
    return value


# --------------------------------------------------------------------------- calibrate
def cmd_calibrate(args) -> int:
    from .calibrate import calibrate_run

    result = calibrate_run(
        args.run,
        method=args.method,
        target_attn=args.target_attn,
        target_rbf=args.target_rbf,
        baseline_run=args.baseline_run,
        which=args.which,
        split=args.split,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        text_file=args.text_file,
        save=not args.dry_run,
        device=_device(args.device),
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.format())
        if args.dry_run:
            print("dry run: nothing stored")
        else:
            print(f"rewrote the run {args.run} in place: taus {result.taus} are now in its config.yaml, its best and "
                  "last checkpoints and calibration.json (to keep the old run, copy the folder first; --dry-run "
                  "changes nothing)")
    return 0


# --------------------------------------------------------------------------- route
def cmd_route(args) -> int:
    from ..train.runs import load_run
    from .route import render_ansi, render_html, render_png, route_text

    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"--file {path} not found")
        text = path.read_text(encoding="utf-8", errors="replace")
    elif args.text is not None:
        text = args.text
    else:
        raise UserError('give the text to route, e.g. chiar route --run runs/NAME "some text" (or --file F)')
    run = load_run(args.run, args.which, device=_device(args.device))
    view = route_text(run.model, run.tokenizer, text)
    if args.json:
        print(json.dumps(view.to_dict(), indent=2))
    else:
        if args.color == "auto":
            color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        else:
            color = args.color == "always"
        print(render_ansi(view, color=color, all_layers=args.all_layers))
    title = f"CHIAR-Former routing: {Path(args.run).name}"
    if args.html:
        out = Path(args.html)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_html(view, title=title, all_layers=args.all_layers), encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    if args.png:
        render_png(view, args.png, all_layers=args.all_layers, title=title)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- flops
def cmd_flops(args) -> int:
    from ..config import ChiarConfig
    from ..flops import compare, format_comparison

    attn_fraction = args.attn_fraction
    preset = args.preset
    if args.run:
        from .common import model_config_of, read_run_config
        from .report import attention_shares, summarize_run

        config = read_run_config(Path(args.run))
        cfg = model_config_of(config)
        if cfg is None:
            raise UserError(f"{args.run}/config.yaml has no valid model section")
        preset = f"run {args.run}"
        if attn_fraction is None and cfg.routed_layers and cfg.routing != "topk":
            shares, where = attention_shares(summarize_run(args.run))
            if shares is not None:
                attn_fraction = [shares[i] for i in cfg.routed_layers]
                preset += f", attention shares measured ({where})"
    else:
        cfg = ChiarConfig.from_preset(preset or "paper-17m")
        preset = preset or "paper-17m"
    changes = {}
    if args.model:
        changes["layout"] = args.model
    for name in ("routing", "execution", "meta_router"):
        if getattr(args, name):
            changes[name] = getattr(args, name)
    if args.seq_len and args.seq_len > cfg.max_seq_len:
        changes["max_seq_len"] = args.seq_len
    if args.attn_fraction is not None:
        changes["attn_fraction"] = args.attn_fraction
    if changes:
        cfg = cfg.replace(tau=None, **changes) if "layout" in changes else cfg.replace(**changes)
    if attn_fraction is None:
        attn_fraction = 0.25 if not args.run else cfg.attn_fraction
    cmp = compare(cfg, args.seq_len or cfg.max_seq_len, attn_fraction=attn_fraction, rbf_fraction=args.rbf_fraction,
                  scores=args.scores, dct_cost=args.dct_cost, batch_size=args.batch)
    if args.json:
        data = {"preset": preset, **cmp.to_dict()}
        print(json.dumps(data, indent=2))
    else:
        print(format_comparison(cmp, preset, per_layer=args.per_layer))
        per_call = cmp.chiar.per_call
        if per_call and args.batch is None:
            print(f"\nnot in the per-token numbers: building the fused DCT operator costs d^3 = "
                  f"{cfg.d_model ** 3:,} MACs per DCT layer per forward call ({per_call:,.0f} in all); "
                  "pass --batch B (sequences per call) to spread it over the batch's tokens")
    return 0


# --------------------------------------------------------------------------- report
def cmd_report(args) -> int:
    from .report import build_report

    text = build_report(
        args.runs,
        out=args.out,
        figures_dir=args.figures,
        entropy=not args.no_entropy,
        max_batches=args.max_batches,
        threshold=args.collapse_threshold,
        window=args.collapse_window,
        device=_device(args.device),
    )
    if args.out:
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


# --------------------------------------------------------------------------- registration
def register(subparsers) -> None:
    from ..config import LAYOUTS, META_ROUTERS, PRESETS, ROUTINGS
    from ..flops import DCT_COSTS, SCORE_CONVENTIONS

    p = subparsers.add_parser(
        "calibrate", help="set routing thresholds (tau) from data so attention gets a target share of tokens "
                          "(rewrites the run in place)",
        description="Calibrate the entropy thresholds of a run's routed layers and REWRITE THE RUN IN PLACE with "
                    "them (config.yaml, best and last checkpoints, calibration.json); copy the run folder first to "
                    "keep the old taus, or pass --dry-run to only print them. hidden: per layer, the (1 - target) quantile of "
                    "the entropies that layer's router sees on validation data. paper: the published procedure "
                    "(33rd/67th percentiles of the token embeddings' entropy of a trained baseline; midpoint).")
    p.add_argument("--run", required=True, metavar="runs/NAME")
    p.add_argument("--method", default="hidden", choices=("hidden", "paper"))
    p.add_argument("--target-attn", type=_fraction, default=None, metavar="F",
                   help="share of tokens sent to attention per routed layer (default 0.25; 1/3 in three-operator layers)")
    p.add_argument("--target-rbf", type=_fraction, default=None, metavar="F",
                   help="three-operator layers: share sent to RBF (default: equal split of the rest with the DCT)")
    p.add_argument("--baseline-run", default=None, metavar="runs/BASE",
                   help="paper method: the trained baseline whose token embeddings set tau (default: the run itself)")
    p.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint measured (both are updated)")
    p.add_argument("--split", default="val", choices=("val", "train"), help="data to calibrate on (never test)")
    p.add_argument("--text-file", default=None, metavar="FILE", help="calibrate on this UTF-8 text instead")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-batches", type=int, default=16, help="batches of evenly spaced examples (0 = whole split)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dry-run", action="store_true", help="print the taus, leave the run unchanged")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = subparsers.add_parser(
        "route", help="show, per token, the spectral entropy and the operator chosen at each routed layer",
        description="Run a trained model once on a text and show its own routing decisions: coloured terminal "
                    "output, a self-contained HTML page (--html), a PNG figure (--png).")
    p.add_argument("--run", required=True, metavar="runs/NAME")
    p.add_argument("text", nargs="?", default=None, help="the text to route")
    p.add_argument("--file", default=None, metavar="FILE", help="read the text from a UTF-8 file")
    p.add_argument("--which", default="best", choices=("best", "last"))
    p.add_argument("--html", default=None, metavar="OUT.html")
    p.add_argument("--png", default=None, metavar="OUT.png")
    p.add_argument("--all-layers", action="store_true", help="also show the single-operator layers")
    p.add_argument("--color", default="auto", choices=("auto", "always", "never"))
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print tokens, H and operators as JSON")
    p.set_defaults(func=cmd_route)

    p = subparsers.add_parser(
        "flops", help="analytic multiply-adds per component: CHIAR vs the full-attention baseline",
        description="Forward multiply-adds (MACs) per token, per component and layer, for a CHIAR layout and the "
                    "baseline of the same size, with two reductions: the attention (token-mixing) sub-layer alone, "
                    "and the whole forward pass (FFN and LM head included). A training step is ~3x the forward.")
    p.add_argument("--preset", default=None, choices=tuple(PRESETS), help="model size (default paper-17m)")
    p.add_argument("--run", default=None, metavar="runs/NAME",
                   help="take the model from a run instead, with its measured attention shares")
    p.add_argument("--model", default=None, metavar="LAYOUT",
                   help=f"CHIAR layout: {', '.join(LAYOUTS)} or a per-layer string like D,DA,A (default dct_attn)")
    p.add_argument("--attn-fraction", type=_fraction, default=None, metavar="F",
                   help="share of each routed layer's tokens sent to attention (default 0.25)")
    p.add_argument("--rbf-fraction", type=_fraction, default=None, metavar="F",
                   help="three-operator layers: share sent to RBF (default (1 - F) / 2)")
    p.add_argument("--seq-len", type=_positive_int, default=None, metavar="T", help="context length (default: the preset's)")
    p.add_argument("--routing", default=None, choices=ROUTINGS)
    p.add_argument("--execution", default=None, choices=("sparse", "dense"),
                   help="dense = the published behaviour: every operator on every token")
    p.add_argument("--meta-router", default=None, choices=META_ROUTERS)
    p.add_argument("--scores", default="causal", choices=SCORE_CONVENTIONS,
                   help="keys per query: causal = t+1 at position t (default); kernel = the shapes handed to the "
                        "kernels (what FlopCounterMode counts); full = all T (the SPEC/paper convention)")
    p.add_argument("--dct-cost", default="matmul", choices=DCT_COSTS,
                   help="matmul = as executed (d^2 per transform, default); fft = nominal d log2 d")
    p.add_argument("--batch", type=_positive_int, default=None, metavar="B",
                   help="sequences per forward call: spreads the per-call DCT operator build over the tokens")
    p.add_argument("--per-layer", action="store_true", help="also print the per-layer breakdown")
    p.add_argument("--json", action="store_true",
                   help="JSON with attention_reduction, total_reduction (fractions) and the breakdown")
    p.set_defaults(func=cmd_flops)

    p = subparsers.add_parser(
        "report", help="markdown table and figures for one or more runs, with routing-collapse flags",
        description="A markdown table of runs (task, model, parameters, protocol, validation and test metrics, "
                    "tokens, throughput, attention share per layer), routing-collapse flags, and PNG figures: "
                    "training curves, operator usage per layer over training, entropy histograms with tau, "
                    "MetaRouter gate.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    p.add_argument("--out", default=None, metavar="FILE.md", help="write the report here (figures next to it)")
    p.add_argument("--figures", default=None, metavar="DIR", help="folder for the PNG figures (default: FILE_figures)")
    p.add_argument("--no-entropy", action="store_true",
                   help="skip the entropy histograms (they load each model and its validation data)")
    p.add_argument("--max-batches", type=int, default=4, help="validation batches for the entropy histograms")
    p.add_argument("--collapse-threshold", type=_fraction, default=0.01, metavar="F",
                   help="flag an operator whose share stays under F (default 0.01)")
    p.add_argument("--collapse-window", type=_fraction, default=0.2, metavar="F",
                   help="... over the last F of training (default 0.2)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_report)
