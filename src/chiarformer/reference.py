"""Import checkpoints of the published code (github hackie123/CHIAR-former @ 9602c6e) as run folders.

    chiar import-reference chiar_dct_attn_400M_best.pt --out runs/chiar-400m
    chiar eval --run runs/chiar-400m --split test

A checkpoint adapter, kept apart from the model: it maps the published state dict onto a model
built with the published options (config.REFERENCE_OPTIONS; SPEC §7) and writes a run folder
(config.yaml + checkpoints/best/model.safetensors) that load_run and every `chiar` command read.

Published files (torch.save of a dict; loaded here with weights_only=True, never unpickling code):
- LM runs: {"step", "model", "val_ppl", "cfg"}; cfg = vars(cfg) holds only what main() set:
  vocab_size, routing_mode, use_collapse_reg, layer_variant (the baseline: vocab_size). No sizes,
  no tau: sizes come from the tensors, tau from --tau (0.8954 for the 400M file).
- the mixed-training file: no cfg, extra `_cls_head_imdb.*` / `_cls_head_listops.*` heads;
- LRA classifiers: {"step", "model", "test_acc"}, the backbone under `backbone.` (CHIAR) or at the
  top (baseline), the head at `classifier.0` / `classifier.3`.
Keys with no counterpart are reported and kept, unchanged, in reference_extra.safetensors.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_write_json
from .config import PRESETS, REFERENCE_OPTIONS, ChiarConfig, parse_layout
from .data.tasks import task_spec
from .errors import UserError
from .layers import rope_inv_freq
from .model import build_model
from .operators import layer_letters
from .train import checkpoint as C
from .train.run_config import resolve

# tau of the published 400M run: the midpoint of its config.py's tau_low / tau_high.
TAU_400M = (0.8935 + 0.8973) / 2
PUBLISHED_LAMBDA = 0.01  # config.py lambda_reg, used when the run set use_collapse_reg
PUBLISHED_DROPOUT = 0.1  # config.py dropout (not recorded in the files)

# Reference sub-module name -> ours, inside one layer (after the baseline's names are folded in).
LAYER_MODULES = {
    "dct_mix.norm": "op_norms.dct",
    "attn.out_proj": "mixer.out",
    "attn.norm": "op_norms.attention",
    "rbf_mix.out_proj": "rbf_ref.proj",
    "rbf_mix.ffn.0": "rbf_ref.ffn.up",
    "rbf_mix.ffn.3": "rbf_ref.ffn.down",
    "rbf_mix.norm": "op_norms.rbf",
    "ffn.0": "ffn.up",
    "ffn.3": "ffn.down",
    "ffn_norm": "norm_ffn",
    "router.gate_proj": "router.logits",
}
TOP_MODULES = {"norm": "model.norm_out", "meta_router.gate_proj": "model.meta_router.gate",
               "classifier.0": "head.0", "classifier.3": "head.2"}


@dataclass
class Imported:
    config: ChiarConfig
    kind: str  # "lm" or "cls"
    state: dict[str, torch.Tensor]  # our keys
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # reference keys without a counterpart
    step: int | None = None
    metrics: dict = field(default_factory=dict)  # what the file recorded (val_ppl / test_acc)
    notes: list[str] = field(default_factory=list)


def load_reference_file(path: str | Path) -> dict:
    """The checkpoint dict, loaded with weights_only=True (mmap when the file allows it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UserError(f"refusing {path}: it holds pickled objects beyond tensors and plain values, which "
                        f"would run code to load (weights_only=True refused it: {first[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: truncated or not a torch checkpoint ({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise UserError(f"{path} is not a checkpoint of the published code (expected a dict with a 'model' state dict)")
    return obj


def convert(ckpt: dict, tau: float | None = None, routing: str | None = None) -> Imported:
    """Our model config and state dict for a published checkpoint dict (see the module docstring)."""
    bad = [k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"the state dict holds non-tensor entries, e.g. {bad[0]!r}")
    source = {_plain(k): v for k, v in ckpt["model"].items()}
    run_cfg = ckpt.get("cfg") if isinstance(ckpt.get("cfg"), dict) else {}
    taken: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in source:
            raise UserError(f"the checkpoint lacks {key!r}: not a model of the published code")
        taken.add(key)
        return source[key]

    # ---------------------------------------------------------------- sizes, from the tensors
    embed = take("token_emb.weight")
    vocab, d = embed.shape
    n_layers = 1 + max((int(m.group(1)) for k in source if (m := re.match(r"layers\.(\d+)\.", k))), default=-1)
    if n_layers == 0:
        raise UserError("the checkpoint has no layers")
    letters = []
    for i in range(n_layers):
        ops = "".join(c for c, key in (("D", "dct_mix.w"), ("R", "rbf_mix.omega"), ("A", "attn.qkv.weight"))
                      if f"layers.{i}.{key}" in source)
        if not ops:
            raise UserError(f"layer {i} has no operator (dct_mix, rbf_mix or attn)")
        letters.append(ops)
    d_ff = take("layers.0.ffn.0.weight").shape[0]
    rope_layer = next((i for i, ops in enumerate(letters) if "A" in ops), None)
    n_heads, max_seq_len, rope_base = 1, 256, 10000.0
    if rope_layer is not None:
        inv_freq = take(f"layers.{rope_layer}.attn.rope.inv_freq").float()
        head_dim = 2 * inv_freq.numel()
        n_heads = d // head_dim
        max_seq_len = take(f"layers.{rope_layer}.attn.rope.cos_cache").shape[0]
        if head_dim > 2:  # inv_freq[i] = base^(-2i / head_dim)
            rope_base = float(inv_freq[1]) ** (-head_dim / 2)
            rope_base = 10000.0 if math.isclose(rope_base, 10000.0, rel_tol=1e-3) else rope_base
    layout = ",".join(letters)
    named = ("baseline", "dct_attn") if n_layers >= 3 else ("baseline",)  # dct_attn needs 3 layers
    standard = {name: [layer_letters(ops) for ops in parse_layout(name, n_layers)] for name in named}
    layout = next((name for name, value in standard.items() if value == letters), layout)
    routed = [i for i, ops in enumerate(letters) if len(ops) > 1]
    learned = f"layers.{routed[0]}.router.gate_proj.weight" in source if routed else False
    mode = run_cfg.get("routing_mode") if routed else None
    if routed and learned and mode not in ("soft", "hard"):
        mode = routing
        if mode not in ("soft", "hard"):
            raise UserError("the routers are learned but the file does not say soft or hard: pass --routing soft|hard")
    elif routed and not learned:
        if mode not in (None, "threshold"):
            raise UserError(f"the file says routing_mode={mode!r} but has no router weights")
        mode = "threshold"
    notes = []
    if mode == "threshold":
        if tau is None and (d, n_layers) == (1024, 28):
            tau = TAU_400M
            notes.append(f"tau = {TAU_400M:.4f}, the published 400M run's (midpoint of config.py's 0.8935 / 0.8973)")
        if tau is None:
            raise UserError("this threshold-routed file does not record its tau (the 17M runs' is unknown): "
                            "pass --tau T, e.g. the published config.py midpoint 0.8954")
    kind = "cls" if "classifier.3.weight" in source else "lm"
    meta = "meta_router.gate_proj.weight" in source
    cfg = ChiarConfig.from_dict({
        **REFERENCE_OPTIONS,
        "vocab_size": vocab, "d_model": d, "n_heads": n_heads, "n_layers": n_layers, "d_ff": d_ff,
        "max_seq_len": max_seq_len, "dropout": PUBLISHED_DROPOUT, "rope_base": rope_base, "layout": layout,
        "routing": mode or "threshold", "tau": float(tau) if mode == "threshold" else None,
        "meta_router": "batch_mean" if meta else "none", "allow_noncausal": meta or "R" in layout,
        "collapse_reg": PUBLISHED_LAMBDA if run_cfg.get("use_collapse_reg") else 0.0,
        "rbf_features": next((source[f"layers.{i}.rbf_mix.omega"].shape[1] for i, o in enumerate(letters) if "R" in o), 64),
        "n_classes": source["classifier.3.weight"].shape[0] if kind == "cls" else 2,
    })

    # ---------------------------------------------------------------- tensors
    state: dict[str, torch.Tensor] = {"model.embed.weight": embed}
    if "lm_head.weight" in source:
        head = take("lm_head.weight")
        tied = head.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr() or torch.equal(head, embed)
        if not tied:
            raise UserError("lm_head.weight differs from token_emb.weight: the published models tie them")
    for key in list(source):
        m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        name = None
        if m and m.group(2) in LAYER_MODULES:
            name = f"model.layers.{m.group(1)}.{LAYER_MODULES[m.group(2)]}.{m.group(3)}"
        elif (top := re.match(r"(.+)\.(weight|bias)$", key)) and top.group(1) in TOP_MODULES:
            name = f"{TOP_MODULES[top.group(1)]}.{top.group(2)}"
        if name is not None:
            state[name] = take(key)
    for i, ops in enumerate(letters):
        prefix = f"model.layers.{i}."
        if "D" in ops:
            state[prefix + "dct.filter"] = take(f"layers.{i}.dct_mix.w")
        if "R" in ops:
            state[prefix + "rbf_ref.omega"] = take(f"layers.{i}.rbf_mix.omega")
        if "A" in ops:  # one Linear d -> 3d, rows Q | K | V; ours: q (d -> d) and kv (d -> 2d, K then V)
            for part in ("weight", "bias"):
                qkv = take(f"layers.{i}.attn.qkv.{part}")
                state[prefix + f"mixer.q.{part}"], state[prefix + f"mixer.kv.{part}"] = qkv[:d], qkv[d:]
            check_rope(take, i, d // n_heads, rope_base)
    extra = {k: v for k, v in ckpt["model"].items() if _plain(k) not in taken}
    step = ckpt.get("step")
    metrics = {k: ckpt[k] for k in ("val_ppl", "test_acc") if isinstance(ckpt.get(k), (int, float))}
    return Imported(cfg, kind, state, extra, int(step) if isinstance(step, (int, float)) else None, metrics, notes)


def _plain(key: str) -> str:
    """A file key under the names `convert` uses: the classifier's backbone prefix dropped, the
    baseline's attns.i / ffns.i / ffn_norms.i as layer i's attn / ffn / ffn_norm."""
    key = key.removeprefix("backbone.")
    key = re.sub(r"^attns\.(\d+)\.", r"layers.\1.attn.", key)
    key = re.sub(r"^ffns\.(\d+)\.", r"layers.\1.ffn.", key)
    return re.sub(r"^ffn_norms\.(\d+)\.", r"layers.\1.ffn_norm.", key)


def check_rope(take, layer: int, head_dim: int, base: float) -> None:
    """The RoPE buffers must be the ones our attention computes (base, rotate-half pairs)."""
    inv_freq = take(f"layers.{layer}.attn.rope.inv_freq").float()
    cos, sin = take(f"layers.{layer}.attn.rope.cos_cache"), take(f"layers.{layer}.attn.rope.sin_cache")
    ours = rope_inv_freq(head_dim // 2, base, dtype=torch.float64)
    angles = torch.arange(cos.shape[0], dtype=torch.float64)[:, None] * ours
    angles = torch.cat([angles, angles], dim=-1)
    if not (torch.allclose(inv_freq.double(), ours, rtol=1e-5, atol=0)
            and torch.allclose(cos.double(), angles.cos(), atol=1e-4) and torch.allclose(sin.double(), angles.sin(), atol=1e-4)):
        raise UserError(f"layer {layer}'s RoPE buffers are not rotate-half RoPE with base {base:g}")


def model_state(imported: Imported) -> dict[str, torch.Tensor]:
    """The full state dict of our model (thresholds added), checked against a model built on the
    meta device: every key present, every shape equal."""

    cfg = imported.config
    with torch.device("meta"):
        own = build_model(cfg, imported.kind).state_dict()
    state = dict(imported.state)
    for key in own:  # buffers the file does not carry: the thresholds
        if key.endswith("router.tau") and key not in state:
            state[key] = torch.tensor(cfg.layer_taus(int(key.split(".")[2])), dtype=torch.float32)
    wrong = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
    unused = [k for k in state if k not in own]
    if wrong or unused:
        raise UserError(f"internal: the imported tensors do not fit the model ({(wrong + unused)[:3]})")
    return state


def write_run(imported: Imported, out: str | Path, task: str | None, source: Path) -> Path:
    """A run folder holding the imported model as its best checkpoint."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new --out folder")
    cfg = imported.config
    if task is None:
        task = "wikitext103" if imported.kind == "lm" else "imdb" if cfg.n_classes == 2 else None
        if task is None:
            raise UserError(f"a classifier with {cfg.n_classes} classes: pass --task (e.g. listops-flat)")
    kind = task_spec(task).kind  # an unknown task is a UserError
    if kind != imported.kind:
        raise UserError(f"task {task} is a {kind} task but the checkpoint is a "
                        f"{'language model' if imported.kind == 'lm' else 'classifier'}")
    preset = "reference-400m" if cfg.d_model == PRESETS["reference-400m"]["d_model"] else "reference-17m"
    run = resolve(task, preset, sets=[f"data.seq_len={cfg.max_seq_len}", "data.eval_stride=0"])
    run.model = cfg
    state = model_state(imported)
    out.mkdir(parents=True, exist_ok=True)
    run.save(out / "config.yaml")
    with C.AtomicDir(out / "checkpoints" / "best") as tmp:
        C.save_model_file(tmp / "model.safetensors", state, cfg.to_dict(), {"step": imported.step})
        atomic_write_json(tmp / "meta.json", {
            "step": imported.step, "kind": "best", "task": task, "metrics": None,
            "imported_from": {"file": str(source), "code": "github hackie123/CHIAR-former @ 9602c6e",
                              "recorded": imported.metrics, "notes": imported.notes,
                              "extra_keys": sorted(imported.extra)}})
    if imported.extra:
        C.save_tensors(out / "reference_extra.safetensors", dict(imported.extra), {"format": "chiarformer-reference-extra"})
    return out


def import_reference(path: str | Path, out: str | Path, tau: float | None = None, task: str | None = None,
                     routing: str | None = None) -> Imported:
    """Convert the published checkpoint at `path` into the run folder `out`; returns what was imported."""
    imported = convert(load_reference_file(path), tau=tau, routing=routing)
    write_run(imported, out, task, Path(path))
    return imported
