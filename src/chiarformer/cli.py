"""`chiar`: the command line.

    chiar quickstart                      baseline vs CHIAR-Former on generated ListOps, CPU, about 2 min
    chiar train --task T --model LAYOUT [--preset P] [--config F.yaml] [--set k=v ...] --out runs/NAME [--resume]
    chiar eval --run runs/NAME [--split val|test] [--which best|last]
    chiar config [--task T] [...]         print the resolved, commented configuration (a starting YAML)
    chiar tasks                           list the tasks and where their data comes from
    chiar import-reference FILE.pt --out runs/NAME [--tau T] [--task T]   a published checkpoint as a run
    chiar generate --run runs/NAME "prompt" [--max-new-tokens N --temperature T --top-k K --top-p P ...]
    chiar export --run runs/NAME --out DIR  a Hugging Face folder (needs the hf extra)
    chiar download NAME [--to DIR]        fetch wikitext2, wikitext103, imdb or gpt2-tokenizer (data/download.py)
    chiar reproduce [--scale smoke|cpu|paper] [--only E1,E3] [--seeds N] --out runs/reproduce   the paper's claims
    chiar --version;  python -m chiarformer ...  (the same as chiar)

Analysis subcommands (calibrate, route, flops, report) are added by chiarformer.analysis.cli, generate by
chiarformer.textgen, export by chiarformer.hf_export, reproduce by chiarformer.reproduce.cli.
Multi-GPU: `torchrun --nproc_per_node=8 -m chiarformer.cli train ...` (see docs/training.md).

User mistakes raise `UserError`: one line `error: ...` on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import hf_export, textgen
from .analysis import cli as analysis_cli
from .config import LAYOUTS, PRESETS
from .data import download
from .data.files import ENV_DATA_DIR, data_dir
from .data.tasks import TASKS
from .errors import UserError
from .reproduce import cli as reproduce_cli

EXIT_USER_ERROR = 2
# The subcommands import the training engine (chiarformer.train) when they run, not at start-up:
# it is the heaviest part of the package and `chiar --help` needs none of it.


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one `error: ...` line and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{self.prog}: {message}")


# ---------------------------------------------------------------------------- train
def _add_config_args(p: argparse.ArgumentParser, *, task_required: bool = False) -> None:
    p.add_argument("--task", required=task_required, metavar="TASK", help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--model", metavar="LAYOUT",
                   help=f"model layout: {', '.join(LAYOUTS)} or a per-layer string like D,DA,A (sets model.layout)")
    p.add_argument("--preset", metavar="P", help=f"model preset: {', '.join(PRESETS)} (default: the task's)")
    p.add_argument("--config", metavar="FILE", help="YAML file with task/preset/model/train/data sections (configs/*.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set train.lr=3e-4 --set model.routing=topk (repeatable)")


def cmd_train(args) -> int:
    from .train.loop import prepare_run_dir, train  # lazy: see the note at the top
    from .train.run_config import RunConfig, apply_sets, resolve, validate
    from .train.runtime import tune_cpu_allocator

    out = Path(args.out) if args.out else None
    if args.resume:
        if out is None:
            raise UserError("--resume needs --out runs/NAME (the run folder to continue)")
        prepare_run_dir(out, resume=True)
        cfg = RunConfig.load(out / "config.yaml")
        if args.config or args.task or args.model or args.preset:
            # What the user gave replaces the saved task, preset, model and data (train() checks,
            # once, that they still fit the checkpoint); the saved train section is kept.
            fresh = resolve(args.task or cfg.task, args.preset or cfg.preset, args.model, args.config, [])
            cfg.task, cfg.preset, cfg.model, cfg.data = fresh.task, fresh.preset, fresh.model, fresh.data
        apply_sets(cfg, args.sets)
        validate(cfg)
    else:
        cfg = resolve(args.task, args.preset, args.model, args.config, args.sets)
        if out is None:
            out = Path("runs") / f"{cfg.task}-{cfg.model.layout.replace(',', '')}-{cfg.preset}"
    tune_cpu_allocator(cfg.train.device)
    results = train(cfg, out, resume=args.resume, quiet=args.quiet)
    if not args.quiet:
        _print_results(results, out)
    return 0


def _print_results(results: dict, out: Path) -> None:
    from .train.dist import from_env  # lazy: see the note at the top
    from .train.metrics import format_metrics

    if not from_env().is_main:
        return
    best = results.get("best") or {}
    print(f"run: {out}")
    if best:
        print(f"best val (step {best.get('step')}): {format_metrics(best.get('val') or {}, results.get('kind'))}")
    if results.get("test"):
        print(f"test (once, on the best checkpoint): {format_metrics(results['test'], results.get('kind'))}")
    if results.get("tokens_per_s"):
        print(f"training throughput: {results['tokens_per_s']:,.0f} tokens/s")


# ---------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from .train.metrics import format_metrics  # lazy: see the note at the top
    from .train.runs import evaluate_run

    record = evaluate_run(args.run, split=args.split, which=args.which, batch_size=args.batch_size,
                          device=args.device, max_batches=args.max_batches)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        scope = "" if record["complete"] else (f" (partial: {args.max_batches} batch(es) of evenly spaced examples, "
                                                  "not the whole split)")
        print(f"{args.run} [{args.which} checkpoint, step {record['step']}] {args.split}{scope}: "
              f"{format_metrics(record, record['task_kind'])}")
        proto = record.get("protocol") or {}
        if proto:
            print("protocol: " + ", ".join(f"{k}={v}" for k, v in proto.items() if not isinstance(v, (dict, list))))
    return 0


# ---------------------------------------------------------------------------- import-reference
def cmd_import_reference(args) -> int:
    from .reference import import_reference  # lazy: it writes a run folder through the training engine

    imported = import_reference(args.checkpoint, args.out, tau=args.tau, task=args.task, routing=args.routing)
    cfg = imported.config
    print(f"imported {args.checkpoint} -> {args.out} ({'language model' if imported.kind == 'lm' else 'classifier'}, "
          f"step {imported.step}, recorded {imported.metrics or 'no metrics'})")
    print(f"model: layout {cfg.layout}, d={cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff={cfg.d_ff}, "
          f"vocab {cfg.vocab_size}, context {cfg.max_seq_len}, routing {cfg.routing}"
          + (f" tau={cfg.tau:.4f}" if cfg.routing == "threshold" and cfg.tau is not None else "")
          + f", MetaRouter {cfg.meta_router}; every published option (docs/model.md)")
    for note in imported.notes:
        print(f"note: {note}")
    if cfg.noncausal_options():
        print("note: NON-CAUSAL as published: " + "; ".join(cfg.noncausal_options()))
    if imported.extra:
        print(f"kept out of the model (no counterpart), saved in {Path(args.out) / 'reference_extra.safetensors'}: "
              + ", ".join(f"{k} {tuple(v.shape)}" for k, v in imported.extra.items()))
    return 0


# ---------------------------------------------------------------------------- config / tasks
CONFIG_DEFAULT_TASK = "wikitext103"  # what `chiar config` shows without --task


def cmd_config(args) -> int:
    from .train.run_config import dump_yaml, resolve  # lazy: see the note at the top

    task = args.task
    default_note = ""
    if not (task or args.config or any(s.startswith("task=") for s in args.sets)):
        task = CONFIG_DEFAULT_TASK
        default_note = (f"No --task given: this is task {task} (the paper's main experiment); "
                        "`chiar tasks` lists the others.\n")
    cfg = resolve(task, args.preset, args.model, args.config, args.sets)
    text = dump_yaml(cfg, header=(
        default_note
        + f"chiarformer configuration for task {cfg.task}, preset {cfg.preset}, layout {cfg.model.layout}.\n"
        "Use with: chiar train --config THIS_FILE --out runs/NAME   (override with --set section.field=value)\n"
        "model.vocab_size, model.n_classes and model.max_seq_len are filled in from the task at training time."))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_tasks(args) -> int:
    print(f"DATA_DIR = {data_dir()} (${ENV_DATA_DIR}; `chiar download NAME` fills it)")
    width = max(len(n) for n in TASKS)
    for name, spec in TASKS.items():
        print(f"{name:<{width}}  {spec.kind:<3}  {spec.description}")
        print(f"{'':<{width}}       data: {spec.source}")
    return 0


# ---------------------------------------------------------------------------- quickstart
def cmd_quickstart(args) -> int:
    from .quickstart import run_quickstart  # lazy: it trains through the training engine
    from .train.runtime import tune_cpu_allocator

    tune_cpu_allocator("cpu")  # the quickstart trains on CPU

    run_quickstart(steps=args.steps, seed=args.seed, out=args.out, threads=args.threads, quiet=args.quiet,
                   n_train=args.examples, n_eval=args.n_eval, lengths=tuple(args.lengths) if args.lengths else None,
                   depth=args.max_depth)
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chiar", description="CHIAR-Former: train, evaluate and analyse spectral-entropy routing.")
    parser.add_argument("--version", action="version", version=f"chiar {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("quickstart", help="train baseline and CHIAR-Former on generated ListOps (CPU, no downloads, "
                                          "about 2 min on 2 cores)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per model (default 1000: about 2 min for both models on 2 cores)")
    p.add_argument("--examples", type=int, default=None, help="generated training expressions (default 16000)")
    p.add_argument("--n-eval", type=int, default=None, help="generated validation and test expressions, each (default 500)")
    p.add_argument("--lengths", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="ListOps lengths, exclusive bounds (default 30 150; LRA: 500 2000)")
    p.add_argument("--max-depth", type=int, default=None, help="ListOps maximum depth (default 4; LRA: 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--out", default=None, help="keep the two run folders here (default: a temporary folder)")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("train", help="train a model on a task (or --resume a run)")
    _add_config_args(p)
    p.add_argument("--out", metavar="runs/NAME", help="run folder (must not exist unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint on a split")
    p.add_argument("--run", required=True, metavar="runs/NAME")
    p.add_argument("--split", default="val", choices=("val", "test", "train"))
    p.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint (default: best on validation)")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per forward pass (default: the run's)")
    p.add_argument("--max-batches", type=int, default=0, help="evaluate only this many batches (0 = whole split)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print the full record as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("config", help="print the resolved configuration as commented YAML")
    _add_config_args(p, task_required=False)
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("import-reference", help="convert a checkpoint of the published code into a run folder")
    p.add_argument("checkpoint", metavar="CHECKPOINT.pt", help="a .pt file of github hackie123/CHIAR-former (loaded "
                   "with weights_only=True: no pickled code runs)")
    p.add_argument("--out", required=True, metavar="runs/NAME", help="run folder to create")
    p.add_argument("--tau", type=float, default=None,
                   help="threshold of a threshold-routed run (the 400M file's 0.8954 is known; the 17M runs' is not)")
    p.add_argument("--task", default=None, help="task of the run folder (default: wikitext103, or imdb for 2 classes)")
    p.add_argument("--routing", choices=("soft", "hard"), default=None,
                   help="for files without cfg (LRA, mixed) whose routers are learned")
    p.set_defaults(func=cmd_import_reference)

    p = sub.add_parser("tasks", help="list tasks and where their data comes from")
    p.set_defaults(func=cmd_tasks)

    _register_plugins(sub)
    return parser


def _register_plugins(sub) -> None:
    analysis_cli.register(sub)
    textgen.register(sub)
    hf_export.register(sub)
    download.register(sub)
    reproduce_cli.register(sub)


def _version() -> str:
    try:
        return version("chiarformer")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USER_ERROR
        return int(args.func(args) or 0)
    except UserError as exc:
        message = " ".join(str(exc).split())  # one line
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
