"""`chiar generate`: sample text from a trained language-model run.

    chiar generate --run runs/NAME "The cat" --max-new-tokens 40 --top-p 0.9 --num-samples 3 --seed 0
    chiar generate --run runs/NAME --prompt-file prompt.txt --temperature 0 --show-routing

Samples stop at the tokenizer's end-of-text id. --show-routing prints, for every generated
token, the operator it took in each routed layer (D = DCT, A = attention, R = RBF, the letters
of layouts). Routing is causal, so these are the decisions the cached decoding made; they are
read from one forward pass over prompt + sample.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .errors import UserError
from .operators import ATTN, Op, layer_letters


def sample_run(run, prompt: str, *, max_new_tokens: int = 50, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, num_samples: int = 1, seed: int | None = None) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids and the generated ids (end-of-text excluded) of `num_samples` continuations."""
    tok = run.tokenizer
    if run.kind != "lm":
        raise UserError(f"{run.run_dir} is a classification run; chiar generate needs a language-model run")
    if tok is None:  # load_run keeps going without it; loading it again raises the reason (and the fix)
        from .train.task_data import tokenizer_for  # lazy: `chiar --help` loads this module, not the engine

        tok = run.tokenizer = tokenizer_for(run.run_config)
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")
    ids = tok.encode(prompt) or [tok.eot_id]  # an empty prompt starts from end-of-text, as GPT-2 does
    vocab = run.model.cfg.vocab_size
    if max(ids) >= vocab:
        raise UserError(f"the prompt encodes to token id {max(ids)} but the model has a vocabulary of {vocab}: "
                        f"the run's tokenizer ({run.run_config.data.tokenizer}) does not match its model")
    device = next(run.model.parameters()).device
    prompt_ids = torch.tensor([ids] * num_samples, device=device)
    out = run.model.generate(prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             eos_token_id=tok.eot_id, seed=seed)
    samples = []
    for row in out[:, len(ids) :].tolist():
        samples.append(row[: row.index(tok.eot_id)] if tok.eot_id in row else row)
    return ids, samples


def routing_table(run, prompt_ids: list[int], generated: list[int]) -> str:
    """One line per generated token: its text and the operator letter it took in each routed layer."""
    model, tok = run.model, run.tokenizer
    routed = model.cfg.routed_layers
    if not routed or not generated:
        return "(no routed layer: every token takes its layer's only operator)" if not routed else "(nothing generated)"
    ids = torch.tensor([prompt_ids + generated], device=next(model.parameters()).device)
    with torch.no_grad():
        routing = model(ids, return_routing=True).routing
    start = len(prompt_ids)
    cells = [f"L{i + 1}:{layer_letters(model.cfg.layer_ops[i])}" for i in routed]  # e.g. L2:DA
    lines = [f"{'#':>4}  {'token':<18}  " + "  ".join(cells)]
    ops = [[int(routing[i].ops[0, start + j]) for i in routed] for j in range(len(generated))]
    for j, (token, row) in enumerate(zip(generated, ops, strict=True)):
        letters = "  ".join(f"{Op(op).letter:<{len(cell)}}" for op, cell in zip(row, cells, strict=True))
        lines.append(f"{j + 1:>4}  {tok.decode([token])!r:<18}  {letters}")
    shares = [sum(row[k] == ATTN for row in ops) / len(ops) for k in range(len(routed))]
    lines.append("generated tokens to attention: " + ", ".join(f"L{i + 1} {s:.0%}" for i, s in zip(routed, shares, strict=True)))
    return "\n".join(lines)


def cmd_generate(args) -> int:
    from .train.runs import load_run  # lazy: `chiar --help` loads this module, not the engine

    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file {path} not found")
        if args.prompt is not None:
            raise UserError("give the prompt as text or with --prompt-file, not both")
        prompt = path.read_text(encoding="utf-8")
    else:
        prompt = args.prompt if args.prompt is not None else ""
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    run = load_run(args.run, args.which, device=device)
    prompt_ids, samples = sample_run(run, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, num_samples=args.num_samples, seed=args.seed)
    for i, ids in enumerate(samples):
        if len(samples) > 1:
            print(f"--- sample {i + 1} ---")
        print(prompt + run.tokenizer.decode(ids))
        if args.show_routing:
            print(routing_table(run, prompt_ids, ids))
    sys.stdout.flush()
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a language-model run")
    p.add_argument("--run", required=True, metavar="runs/NAME")
    p.add_argument("prompt", nargs="?", default=None, help="the text to continue (default: start from end-of-text)")
    p.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens that reach probability p")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None, help="same seed, same samples")
    p.add_argument("--show-routing", action="store_true",
                   help="print the operator (D/A/R) each generated token took in each routed layer")
    p.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint (default: best on validation)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_generate)
