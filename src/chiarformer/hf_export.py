"""`chiar export`: a run folder as a Hugging Face folder (model, config, code, tokenizer).

    export_run("runs/NAME", "exported/")   # then, in any process:
    AutoTokenizer.from_pretrained("exported/")
    AutoModelForCausalLM.from_pretrained("exported/", trust_remote_code=True)   # or after `import chiarformer`

The tokenizer is rebuilt for the `tokenizers` library from the run's own: GPT-2 BPE from the
same local files (encoder.json + vocab.bpe), or UTF-8 bytes (ids 0-255, 256 = end of text).
Both give the ids chiarformer's tokenizers give (tested).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .data.tokenizer import EOT
from .errors import UserError


def _require_transformers():
    try:
        from . import hf
    except ImportError as exc:
        raise UserError(f'exporting needs the hf extra ({exc.name} is missing): pip install -e ".[hf]"') from None
    return hf


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what byte-level BPE vocabularies use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable, strict=True))
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra  # bytes without a printable character are moved past 255
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


def hf_tokenizer(tokenizer):
    """A transformers PreTrainedTokenizerFast that gives the same ids as `tokenizer` (GPT-2 or bytes)."""
    # heavy optional dependencies (the hf extra): imported only when exporting
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast


    if tokenizer.name == "gpt2":
        if tokenizer.files is None:
            raise UserError("the GPT-2 tokenizer came from a download without files on disk; set CHIAR_GPT2_DIR "
                            "to a folder with encoder.json + vocab.bpe")
        encoder, merges = tokenizer.files
        bpe = models.BPE.from_file(str(encoder), str(merges))
        backend = Tokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif tokenizer.name == "bytes":
        vocab = {char: b for b, char in bytes_to_unicode().items()}
        vocab[EOT] = tokenizer.eot_id
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    else:
        raise UserError(f"tokenizer {tokenizer.name!r} has no Hugging Face form; export the model without it")
    backend.decoder = decoders.ByteLevel()
    # pad = end of text, as in chiarformer (padding is always masked); GPT-2 itself has no pad token.
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
                                   clean_up_tokenization_spaces=False)


def export_run(run_dir: str | Path, out: str | Path, which: str = "best") -> list[str]:
    """Write the run's model (and tokenizer, when it has a Hugging Face form) into `out`; returns what was written."""
    hf = _require_transformers()
    from .train.runs import load_run  # lazy: `chiar --help` loads this module, not the engine

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new folder")
    run = load_run(run_dir, which)
    model = hf.wrap(run.model)
    written = []
    name = getattr(run.tokenizer, "name", None)
    if name in ("gpt2", "bytes"):
        tok = hf_tokenizer(run.tokenizer)
        model.config.eos_token_id = model.config.bos_token_id = model.config.pad_token_id = run.tokenizer.eot_id
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = run.tokenizer.eot_id
        tok.model_max_length = run.model.cfg.max_seq_len
        tok.save_pretrained(out)
        written.append(f"tokenizer ({run.tokenizer.name})")
    elif run.tokenizer is None:
        print("note: the run's tokenizer could not be loaded here (GPT-2 files not found?); exported the model only",
              file=sys.stderr)
    else:
        print(f"note: the run's tokenizer ({name or type(run.tokenizer).__name__}) has no Hugging Face form; "
              "exported the model only", file=sys.stderr)
    model.save_pretrained(out)
    written.insert(0, f"{type(model).__name__} ({run.which} checkpoint, step {run.step})")
    return written


def cmd_export(args) -> int:
    for line in export_run(args.run, args.out, args.which):
        print(f"wrote {line}")
    print(f"to {args.out}: load with AutoModelForCausalLM.from_pretrained({str(args.out)!r}, trust_remote_code=True) "
          "(or after `import chiarformer`) and AutoTokenizer.from_pretrained")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="write a run as a Hugging Face folder (model, config, code, tokenizer)")
    p.add_argument("--run", required=True, metavar="runs/NAME")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty folder")
    p.add_argument("--which", default="best", choices=("best", "last"), help="checkpoint (default: best on validation)")
    p.set_defaults(func=cmd_export)
