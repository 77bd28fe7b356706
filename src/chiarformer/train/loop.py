"""The training loop: AdamW, warm-up + cosine, accumulation, clipping, mixed precision, DDP/FSDP2,
periodic validation with best-checkpoint selection, atomic resumable checkpoints, test once.

Entry point: `train(cfg, run_dir, resume=...)`. One optimizer step consumes `train.batch_size`
sequences in total: each of the `world` processes takes its strided share of the global batch
and splits it into micro-batches of `train.micro_batch_size` (gradient accumulation).

Exact resume: the data order is a pure function of (seed, epoch), the learning rate a pure
function of the step, and the dropout RNG is re-seeded from (seed, step, rank) at every step, so
a run restarted from its `last` checkpoint replays the same computation as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import ChiarConfig, ChiarForCausalLM, ChiarForSequenceClassification
from ..errors import UserError
from ..operators import ATTN, N_OPS
from . import checkpoint as C
from . import dist as D
from .config import RunConfig
from .datasets import BatchSampler, TaskData, shard
from .evaluate import eval_protocol, evaluate, op_counts, shares

# A test hook: seconds to sleep after every optimizer step (lets a test kill a run mid-training).
STEP_DELAY_ENV = "CHIAR_DEBUG_STEP_DELAY"
PROGRESS_S = 10.0  # seconds between plain progress lines when there is no progress bar


class TrainingDiverged(UserError):
    """The loss or the gradient became NaN/inf; the run stopped without saving the bad state."""


# ---------------------------------------------------------------------------- building blocks
def build_model(model_cfg: ChiarConfig, kind: str) -> nn.Module:
    return ChiarForCausalLM(model_cfg) if kind == "lm" else ChiarForSequenceClassification(model_cfg)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: none on norms, biases, embeddings or other 1-D parameters."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm)) or "Norm" in type(module).__name__:
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, peak: float, floor: float, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` to `floor` at `total`."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def pick_device(name: str, info: D.DistInfo) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is available; use train.device=cpu")
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_for(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return precision, contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs CUDA; use fp32 or bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, lambda: torch.autocast(device.type, dtype=dtype)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + 12_345) % (2**63 - 1)


def _fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}g}"


# ---------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, data: TaskData, *, resume: bool = False,
                 dist_info: D.DistInfo | None = None, quiet: bool = False, device: torch.device | None = None):
        self.cfg, self.run_dir, self.data, self.resume = cfg, Path(run_dir), data, resume
        self.info = dist_info or D.DistInfo()
        self.quiet = quiet
        self.kind = data.kind
        t = cfg.train
        self.device = device or pick_device(t.device, self.info)
        self.precision, self.autocast = autocast_for(t.precision, self.device)
        self.ckpt_root = self.run_dir / "checkpoints"

        if t.batch_size % self.info.world:
            raise UserError(f"train.batch_size={t.batch_size} is not divisible by the {self.info.world} processes")
        self.local_batch = t.batch_size // self.info.world
        self.micro = t.micro_batch_size or self.local_batch
        if self.local_batch % self.micro:
            raise UserError(f"per-process batch {self.local_batch} is not divisible by train.micro_batch_size={self.micro}")
        self.accum = self.local_batch // self.micro
        self.eval_bs = t.eval_batch_size or self.micro
        n_train = len(data.train)
        if n_train == 0:
            raise UserError(f"task {cfg.task} has no training examples with these settings (data.seq_len={cfg.data.seq_len})")
        if len(data.val) == 0:
            raise UserError(f"task {cfg.task} has an empty validation split with these settings")
        self.max_steps = t.max_steps or max(1, math.ceil(t.epochs * n_train / t.batch_size))
        self.warmup = min(t.warmup_steps, max(1, self.max_steps // 10))
        self.eval_every = t.eval_every or max(1, math.ceil(self.max_steps / 10))
        self.ckpt_every = t.ckpt_every or self.eval_every
        self.select = t.select_metric if t.select_metric != "auto" else ("loss" if self.kind == "lm" else "accuracy")

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.model, self.kind).to(self.device)
        self.params = self.model.num_parameters()
        self.n_layers = cfg.model.n_layers
        self.routed = cfg.model.routed_layers
        self.train_model = self._wrap(self.model)
        fused = {"fused": True} if self.device.type == "cuda" and not t.fsdp else {}
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                           eps=t.eps, **fused)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        lengths = data.train.lengths() if (t.bucket_batches > 1 and hasattr(data.train, "lengths")) else None
        self.sampler = BatchSampler(n_train, t.batch_size, seed=t.seed, lengths=lengths, bucket=t.bucket_batches)
        self.step = 0
        self.tokens_seen = 0
        self.train_time = 0.0
        self.best: dict | None = None  # {"step", "metrics"}
        self.last_val: dict | None = None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.bar = None

    # ------------------------------------------------------------------ setup helpers
    def _wrap(self, model: nn.Module) -> nn.Module:
        t = self.cfg.train
        wrapped = model
        if self.info.enabled:
            if t.fsdp:
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                    if self.precision == "bf16" and self.device.type == "cuda" else MixedPrecisionPolicy()
                for layer in model.model.layers:
                    fully_shard(layer, mp_policy=mp)
                fully_shard(model, mp_policy=mp)
                wrapped = model
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP

                # Sparse routing may leave an operator of a layer without tokens in a batch.
                unused = bool(self.cfg.model.routed_layers) or self.cfg.model.meta_router != "none"
                wrapped = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                              find_unused_parameters=unused)
        elif t.fsdp:
            raise UserError("train.fsdp=true needs several processes: launch with torchrun --nproc_per_node=N")
        if t.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    @property
    def fsdp(self) -> bool:
        return self.cfg.train.fsdp and self.info.enabled

    # ------------------------------------------------------------------ state dicts
    def _model_state(self) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def _optim_state(self) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _load_model_state(self, state: dict, where: Path) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        else:
            C.load_into_model(self.model, state, where)

    def _load_optim_state(self, state: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, which: str) -> None:
        model_state = self._model_state()  # collective under FSDP: every rank calls it
        optim_state = self._optim_state() if which == "last" else None
        if self.info.is_main:
            self._write_checkpoint(which, model_state, optim_state)
        D.barrier(self.info)  # nobody reads a checkpoint before it is complete

    def _write_checkpoint(self, which: str, model_state: dict, optim_state: dict | None) -> None:
        meta = {"step": self.step, "kind": which, "task": self.cfg.task, "tokens_seen": self.tokens_seen,
                "metrics": self.best["metrics"] if which == "best" and self.best else None}
        with C.AtomicDir(self.ckpt_root / which) as tmp:
            C.save_model_file(tmp / "model.safetensors", model_state, self.cfg.model.to_dict(), {"step": self.step})
            if optim_state is not None:
                tensors, rest = C.flatten_optimizer(optim_state)
                C.save_tensors(tmp / "optimizer.safetensors", tensors, {"format": "chiarformer-optimizer"})
                rng_tensors, rng_rest = C.rng_state(self.device)
                C.save_tensors(tmp / "rng.safetensors", rng_tensors)
                state = {
                    "format_version": C.FORMAT_VERSION,
                    "step": self.step,
                    "max_steps": self.max_steps,
                    "schedule": {"kind": "warmup_cosine", "step": self.step, "warmup": self.warmup,
                                 "total": self.max_steps, "peak_lr": self.cfg.train.lr, "min_lr": self.cfg.train.min_lr},
                    "data": self.sampler.state(),
                    "tokens_seen": self.tokens_seen,
                    "train_time_s": self.train_time,
                    "best": self.best,
                    "last_val": self.last_val,
                    "optimizer": rest,
                    "rng": rng_rest,
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "world_size": self.info.world,
                }
                (tmp / "state.json").write_text(json.dumps(state, indent=1))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    def load_last(self) -> None:
        if self.info.is_main:  # recover() renames inside the shared folder: one process does it
            C.recover(self.ckpt_root)
        D.barrier(self.info)
        last = self.ckpt_root / "last"
        if not (last / "state.json").is_file():
            raise UserError(f"{self.run_dir} has no complete checkpoint to resume from ({last} is missing)")
        state_dict, meta = C.load_model_file(last / "model.safetensors")
        saved_cfg = meta.get("model_config")
        if saved_cfg is not None and saved_cfg != self.cfg.model.to_dict():
            changed = sorted(k for k in saved_cfg if saved_cfg.get(k) != self.cfg.model.to_dict().get(k))
            raise UserError(f"checkpoint {last} does not fit the config: model field(s) differ: {', '.join(changed)}")
        self._load_model_state(state_dict, last)
        try:
            state = json.loads((last / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read {last / 'state.json'}: {exc}") from None
        optim = C.unflatten_optimizer(C.load_tensors(last / "optimizer.safetensors"), state["optimizer"])
        try:
            self._load_optim_state(optim)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"optimizer state in {last} does not fit the model: {str(exc).splitlines()[0]}") from None
        C.set_rng_state(C.load_tensors(last / "rng.safetensors"), state.get("rng", {}), self.device)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state(state["data"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.train_time = float(state.get("train_time_s", 0.0))
        self.best = state.get("best")
        self.last_val = state.get("last_val")
        if self.info.is_main:
            self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint (they will be recomputed)."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("step", 0) <= step and not (rec.get("kind") == "eval" and rec.get("split") == "test"):
                keep.append(line)
        C.atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

    # ------------------------------------------------------------------ logging
    def log(self, record: dict) -> None:
        if not self.info.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        if self.info.is_main and not self.quiet:
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict:
        t = self.cfg.train
        torch.manual_seed(step_seed(t.seed, self.step, self.info.rank))
        lr = lr_at(self.step, t.lr, t.min_lr, self.warmup, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        global_idx = self.sampler.next_batch()
        local_idx = shard(global_idx, self.info.rank, self.info.world)
        # loss * n, n, correct, tokens, then per-layer operator counts
        stats = torch.zeros(4 + self.n_layers * N_OPS, dtype=torch.float64, device=self.device)
        self.model.train()
        out = None
        for m in range(self.accum):
            idx = local_idx[m * self.micro : (m + 1) * self.micro]
            batch = self.data.train.batch(idx)
            stats[3] += self.data.train.n_tokens(batch)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            sync = m == self.accum - 1
            if self.fsdp:  # FSDP2: reduce-scatter gradients on the last micro-batch only
                self.model.set_requires_gradient_sync(sync)
            no_sync = None if self.fsdp else getattr(self.train_model, "no_sync", None)
            ctx = no_sync() if (not sync and no_sync is not None) else contextlib.nullcontext()
            with ctx:
                with self.autocast():
                    out = self.train_model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                           labels=batch["labels"])
                    loss = out.loss
                    scaled = (loss + out.aux_loss) * (len(idx) / len(local_idx))
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            stats[0] += loss.detach().double() * len(idx)
            stats[1] += len(idx)
            if self.kind == "cls":
                stats[2] += (out.logits.detach().argmax(-1) == batch["labels"]).sum()
            if out.routing:
                stats[4:] += op_counts(out.routing, batch.get("attention_mask")).flatten().double()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if t.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                grad_norm = grad_norm.full_tensor()
        # Every rank needs the same verdict on divergence: reduce loss, grad norm and tokens together.
        check = torch.stack([stats[0], grad_norm.double() if grad_norm is not None else stats.new_zeros(()),
                             stats[3]])
        D.all_reduce_sum(check, self.info)
        loss_sum, norm_sum, tokens = (float(x) for x in check.cpu())
        # With fp16's GradScaler, overflowing gradients are routine: the scaler skips that step and
        # lowers its scale. Without one, a non-finite gradient norm means the run diverged.
        if not math.isfinite(loss_sum) or (not math.isfinite(norm_sum) and self.scaler is None):
            what, value = ("loss", loss_sum) if not math.isfinite(loss_sum) else ("gradient norm", norm_sum)
            raise TrainingDiverged(
                f"{what} became {value} at step {self.step + 1} (lr {lr:.3g}); the run stopped without saving "
                f"that state. {self._last_good()}"
            )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += int(tokens)
        # No further host syncs: the norm is the reduced one (every rank holds the same value) and
        # the gate is read only when a log line is written.
        meta_gate = out.meta_gate.detach().float().mean() if out.meta_gate is not None else None
        return {"stats": stats, "lr": lr, "grad_norm": norm_sum / self.info.world if grad_norm is not None else None,
                "meta_gate": meta_gate}

    def _last_good(self) -> str:
        last = self.ckpt_root / "last"
        if (last / "meta.json").is_file():
            step = json.loads((last / "meta.json").read_text()).get("step")
            return f"The last good checkpoint is {last} (step {step}); lower train.lr or set train.grad_clip and --resume."
        return "No checkpoint was saved yet; lower train.lr or set train.grad_clip and start again."

    # ------------------------------------------------------------------ evaluation
    def run_eval(self, split: str, *, full: bool) -> dict:
        dataset = self.data.val if split == "val" else self.data.test
        metrics = evaluate(
            self.model, dataset, batch_size=self.eval_bs, device=self.device, autocast=self.autocast,
            max_batches=0 if full else self.cfg.train.eval_batches, dist_info=self.info,
            token_bytes=self.data.token_bytes, lockstep=self.fsdp,
        )
        protocol = eval_protocol(self.data, self.cfg, split)
        record = {"kind": "eval", "split": split, "step": self.step, **metrics, "protocol": protocol, "time": self.train_time}
        self.log(record)
        return record

    def better(self, metrics: dict) -> bool:
        if self.best is None:
            return True
        old = self.best["metrics"]
        if self.select == "loss":
            return metrics["loss"] < old["loss"]
        return (metrics["accuracy"], -metrics["loss"]) > (old["accuracy"], -old["loss"])

    def validate_and_save(self, *, full: bool) -> dict:
        record = self.run_eval("val", full=full)
        metrics = {k: record[k] for k in ("loss", "ppl", "bpb", "accuracy", "op_share")}
        self.last_val = {"step": self.step, "metrics": metrics}
        if self.better(metrics):
            self.best = {"step": self.step, "metrics": metrics}
            self.save_checkpoint("best")
        return record

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict:
        t = self.cfg.train
        if self.resume:
            self.load_last()
        if self.step >= self.max_steps and (self.run_dir / "results.json").is_file():
            self.say(f"{self.run_dir}: run already complete ({self.step} steps)")
            return json.loads((self.run_dir / "results.json").read_text())
        show_bar = self.info.is_main and not self.quiet and t.progress and sys.stderr.isatty()
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=self.max_steps, initial=self.step, dynamic_ncols=True, unit="step",
                            desc=f"{self.cfg.task}/{self.cfg.model.layout}")
        delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
        window = torch.zeros(4 + self.n_layers * N_OPS, dtype=torch.float64, device=self.device)
        window_time, out = 0.0, None
        # Without a bar (output to a file or pipe) a plain progress line at least every PROGRESS_S seconds.
        last_line = time.monotonic() if self.bar is None and not self.quiet and t.progress else None
        try:
            while self.step < self.max_steps:
                start = time.perf_counter()
                out = self.train_step()
                window += out["stats"]
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - start
                window_time += elapsed
                self.train_time += elapsed
                if delay:
                    time.sleep(delay)
                ckpt_due = self.step % self.ckpt_every == 0 or self.step == self.max_steps
                if self.step % t.log_every == 0 or ckpt_due:
                    # Windows also close at checkpoints, so a resumed run logs the same lines.
                    self._log_train(window, window_time, out)
                    window.zero_()
                    window_time = 0.0
                if self.step % self.eval_every == 0 or self.step == self.max_steps:
                    self._show_eval(self.validate_and_save(full=self.step == self.max_steps))
                if ckpt_due:
                    self.save_checkpoint("last")
                if self.bar is not None:
                    self.bar.update(1)
                elif last_line is not None and time.monotonic() - last_line >= PROGRESS_S:
                    stats = out["stats"]
                    self.say(f"step {self.step}/{self.max_steps}: loss {float(stats[0] / stats[1]):.4f} (this step), "
                             f"{self.train_time:.0f} s of training")
                    last_line = time.monotonic()
            return self.finish()
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def _log_train(self, window: torch.Tensor, elapsed: float, out: dict) -> None:
        D.all_reduce_sum(window, self.info)  # fit() zeroes the window after this
        w = window.cpu()
        loss = float(w[0] / w[1]) if w[1] else float("nan")
        tokens = int(w[3])
        tok_s = tokens / elapsed if elapsed > 0 else None
        op_share = shares(w[4:].view(self.n_layers, N_OPS))
        rec = {"kind": "train", "step": self.step, "tokens": self.tokens_seen, "loss": loss, "lr": out["lr"],
               "tokens_per_s": tok_s, "grad_norm": out["grad_norm"], "op_share": op_share,
               "meta_gate": float(out["meta_gate"]) if out["meta_gate"] is not None else None,
               "time": round(self.train_time, 4)}
        if self.kind == "lm":
            rec["ppl"] = math.exp(min(loss, 700.0))
        else:
            rec["accuracy"] = float(w[2] / w[1]) if w[1] else None
        self.log(rec)
        if self.bar is not None:
            post = {"tok/s": f"{tok_s:,.0f}" if tok_s else "-", "loss": f"{loss:.4f}"}
            if self.kind == "lm":
                post["ppl"] = f"{rec['ppl']:.2f}"
            else:
                post["acc"] = f"{rec['accuracy']:.3f}"
            if self.routed:
                post["attn"] = "/".join(f"{op_share[i][ATTN]:.2f}" for i in self.routed)
            self.bar.set_postfix(post, refresh=False)

    def _show_eval(self, record: dict) -> None:
        if self.kind == "lm":
            text = f"step {record['step']}: val loss {record['loss']:.4f} ppl {record['ppl']:.2f} bpb {_fmt(record['bpb'])}"
        else:
            text = f"step {record['step']}: val loss {record['loss']:.4f} accuracy {record['accuracy']:.4f}"
        if self.routed:
            text += " attn " + "/".join(f"{record['op_share'][i][ATTN]:.2f}" for i in self.routed)
        self.say(text)

    # ------------------------------------------------------------------ end of training
    def finish(self) -> dict:
        if self.last_val is None or self.last_val["step"] != self.step:
            self.validate_and_save(full=True)
        best_dir = self.ckpt_root / "best"
        test_record = None
        if self.data.test is not None and len(self.data.test):
            # Every process reads the best weights (multi-node runs need the run folder on a shared filesystem).
            state, _ = C.load_model_file(best_dir / "model.safetensors")
            self._load_model_state(state, best_dir)
            test_record = self.run_eval("test", full=True)
            self.say(f"test (best checkpoint, step {self.best['step']}): loss {test_record['loss']:.4f} "
                     + (f"ppl {test_record['ppl']:.2f} bpb {_fmt(test_record['bpb'])}" if self.kind == "lm"
                        else f"accuracy {test_record['accuracy']:.4f}"))
        results = self.results(test_record)
        if self.info.is_main:
            C.atomic_write_json(self.run_dir / "results.json", results)
        D.barrier(self.info)
        return results

    def results(self, test_record: dict | None) -> dict:
        try:
            from importlib.metadata import version

            pkg_version = version("chiarformer")
        except Exception:  # noqa: BLE001 - metadata missing in odd installs
            pkg_version = None
        keep = ("loss", "ppl", "bpb", "accuracy", "op_share", "tokens", "bytes", "examples")
        test = {k: test_record[k] for k in keep if k in test_record} if test_record else None
        protocol = eval_protocol(self.data, self.cfg)
        return {
            "run": self.run_dir.name,
            "version": pkg_version,
            "task": self.cfg.task,
            "kind": self.kind,
            "layout": self.cfg.model.layout,
            "routing": self.cfg.model.routing if self.routed else None,
            "preset": self.cfg.preset,
            "params": self.params,
            "protocol": protocol,
            "selection": {"split": "val", "metric": self.select},
            "best": {"step": self.best["step"], "val": self.best["metrics"]} if self.best else None,
            "final_val": self.last_val,
            "test": test,
            "test_step": self.best["step"] if test else None,
            "steps": self.step,
            "warmup_steps": self.warmup,
            "tokens_seen": self.tokens_seen,
            "train_time_s": round(self.train_time, 3),
            "tokens_per_s": self.tokens_seen / self.train_time if self.train_time > 0 else None,
            "world_size": self.info.world,
            "device": str(self.device),
            "precision": self.precision,
            "torch": torch.__version__,
        }


# ---------------------------------------------------------------------------- entry point
def tune_cpu_allocator() -> bool:
    """Keep large CPU buffers in glibc's heap instead of fresh mmap()s.

    A CPU step allocates several (batch x context x vocab) float tensors (hundreds of MB with the
    GPT-2 vocabulary); above glibc's mmap threshold each is a new mapping whose pages are faulted
    in and zeroed again every step. Raising the threshold (and the trim threshold, so freed
    memory is kept for reuse) measured +45% training tokens/s for tiny with the GPT-2 vocabulary
    on 2 cores. Linux/glibc only; a no-op elsewhere. Returns whether it applied.
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def configure_runtime(cfg: RunConfig, info: D.DistInfo) -> torch.device:
    t = cfg.train
    device = pick_device(t.device, info)
    if device.type == "cpu":
        threads = t.num_threads or max(1, (os.cpu_count() or 1) // max(1, info.local_world))
        torch.set_num_threads(threads)
        tune_cpu_allocator()
    else:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if t.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    np.random.seed(t.seed % (2**32))
    import random

    random.seed(t.seed)
    torch.manual_seed(t.seed)
    return device


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"cannot resume: {run_dir} is not a run folder (no config.yaml)")
        return
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UserError(f"run folder {run_dir} already exists; pass --resume to continue it or choose another --out")


def _main_first(info: D.DistInfo, device: torch.device, fn):
    """Run fn on rank 0, then (if it succeeded) on the other ranks; a failure stops every rank."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn(True)
        except UserError as exc:
            error = exc
    ok = D.broadcast_flag(error is None, info, device) if info.enabled else error is None
    if error is not None:
        raise error
    if not ok:
        raise UserError("rank 0 failed while preparing the run (see its message)")
    if not info.is_main:
        result = fn(False)
    return result


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, data: TaskData | None = None,
          quiet: bool = False) -> dict:
    """Train (or resume) a run into run_dir; returns the results dict (also written to results.json)."""
    from .config import diff
    from .tasks import finalize_model_config, load_task

    run_dir = Path(run_dir)
    info = D.from_env()
    prepare_run_dir(run_dir, resume)  # every rank checks before the rendezvous below
    device = configure_runtime(cfg, info)
    D.init(info, device)
    try:
        def prepare(main: bool) -> TaskData:
            # Rank 0 prepares (and caches) the data first; the others then read the cache.
            task_data = data if data is not None else load_task(cfg, quiet=quiet or not main)
            finalize_model_config(cfg, task_data)
            if resume:
                changed = diff(RunConfig.load(run_dir / "config.yaml"), cfg)
                if changed:
                    raise UserError(f"the checkpoint in {run_dir} does not fit the config: {'; '.join(changed[:3])}")
            if main:
                run_dir.mkdir(parents=True, exist_ok=True)
                cfg.save(run_dir / "config.yaml")
            return task_data

        data = _main_first(info, device, prepare)
        trainer = Trainer(cfg, run_dir, data, resume=resume, dist_info=info, quiet=quiet, device=device)
        return trainer.fit()
    finally:
        D.shutdown(info)
