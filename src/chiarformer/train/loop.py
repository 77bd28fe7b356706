"""The training loop: AdamW, warm-up + cosine, accumulation, clipping, mixed precision, DDP/FSDP2,
periodic validation with best-checkpoint selection, resumable checkpoints, test once.

Entry point: `train(cfg, run_dir, resume=...)`. One optimizer step consumes `train.batch_size`
sequences in total: each of the `world` processes takes its strided share of the global batch
and splits it into micro-batches of `train.micro_batch_size` (gradient accumulation).

Exact resume: the data order is a pure function of (seed, epoch), the learning rate a pure
function of the step, and the dropout RNG is re-seeded from (seed, step, rank) at every step, so
a run restarted from its `last` checkpoint replays the same computation as an uninterrupted one.

Around the loop: state.py (checkpoints on disk, FSDP-aware), display.py (progress and
metrics.jsonl), evaluate.py (metrics and selection), results.py (results.json), runtime.py
(device, precision, process-wide settings).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write_json
from ..errors import UserError
from ..model import build_model
from ..operators import N_OPS
from . import dist as D
from .datasets import BatchSampler, TaskData, shard
from .display import Display, MetricsLog
from .evaluate import eval_protocol, evaluate, improves, op_counts, selection_metric, shares
from .mixture import Mixture, load_aux_data
from .results import results_record
from .run_config import RunConfig, diff
from .runtime import autocast_for, pick_device, run_settings
from .state import Checkpointer, Progress
from .task_data import TASK_FILLED_FIELDS, finalize_model_config, load_task_data


class TrainingDiverged(UserError):
    """The loss or the gradient became NaN/inf; the run stopped without saving the bad state."""


# ---------------------------------------------------------------------------- building blocks
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


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + 12_345) % (2**63 - 1)



# ---------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, data: TaskData, *, resume: bool = False,
                 dist_info: D.DistInfo | None = None, quiet: bool = False, device: torch.device | None = None,
                 aux_data: dict[str, TaskData] | None = None):
        self.cfg, self.run_dir, self.data, self.resume = cfg, Path(run_dir), data, resume
        self.info = dist_info or D.DistInfo()
        self.kind = data.kind
        t = cfg.train
        self.device = device or pick_device(t.device, self.info)
        self.precision, self.autocast = autocast_for(t.precision, self.device)

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
        self.select = selection_metric(t.select_metric, self.kind)

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.model = build_model(cfg.model, self.kind).to(self.device)
        self.params = self.model.num_parameters()
        self.n_layers = cfg.model.n_layers
        # Mixed-dataset training (train/mixture.py): its heads join the model before the optimizer.
        self.mixture = Mixture(cfg, aux_data, self.model, self.info.world) if aux_data else None
        self.train_model = self._wrap(self.model)
        fused = {"fused": True} if self.device.type == "cuda" and not t.fsdp else {}
        self.optimizer = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                           eps=t.eps, **fused)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        lengths = data.train.lengths() if (t.bucket_batches > 1 and hasattr(data.train, "lengths")) else None
        self.sampler = BatchSampler(n_train, t.batch_size, seed=t.seed, lengths=lengths, bucket=t.bucket_batches)
        self.progress = Progress()
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", model=self.model, optimizer=self.optimizer,
                                 scaler=self.scaler, sampler=self.sampler, model_config=cfg.model.to_dict(),
                                 task=cfg.task, device=self.device, info=self.info, fsdp=self.fsdp,
                                 mixture=self.mixture)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.info.is_main)
        self.display = Display(show=self.info.is_main and not quiet, progress=t.progress, kind=self.kind,
                               routed=cfg.model.routed_layers)

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

    def save_checkpoint(self, which: str) -> None:
        t = self.cfg.train
        self.ckpt.save(which, self.progress, {"warmup": self.warmup, "total": self.max_steps, "peak_lr": t.lr,
                                              "min_lr": t.min_lr})

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict:
        t = self.cfg.train
        torch.manual_seed(step_seed(t.seed, self.progress.step, self.info.rank))
        lr = lr_at(self.progress.step, t.lr, t.min_lr, self.warmup, self.max_steps)
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
        if self.mixture is not None:  # the extra batch's gradients add to the main batch's
            self.mixture.train_extra(self.progress.step, self.model, micro=self.micro, device=self.device,
                                     autocast=self.autocast, scaler=self.scaler)
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
                f"{what} became {value} at step {self.progress.step + 1} (lr {lr:.3g}); the run stopped without saving "
                f"that state. {self.ckpt.last_good()}"
            )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        self.progress.tokens_seen += int(tokens)
        # No further host syncs: the norm is the reduced one (every rank holds the same value) and
        # the gate is read only when a log line is written.
        meta_gate = out.meta_gate.detach().float().mean() if out.meta_gate is not None else None
        return {"stats": stats, "lr": lr, "grad_norm": norm_sum / self.info.world if grad_norm is not None else None,
                "meta_gate": meta_gate}

    # ------------------------------------------------------------------ evaluation
    def run_eval(self, split: str, *, full: bool) -> dict:
        dataset = self.data.val if split == "val" else self.data.test
        metrics = evaluate(
            self.model, dataset, batch_size=self.eval_bs, device=self.device, autocast=self.autocast,
            max_batches=0 if full else self.cfg.train.eval_batches, dist_info=self.info,
            token_bytes=self.data.token_bytes, lockstep=self.fsdp,
        )
        protocol = eval_protocol(self.data, self.cfg, split)
        record = {"kind": "eval", "split": split, "step": self.progress.step, **metrics, "protocol": protocol,
                  "time": self.progress.train_time}
        self.metrics.append(record)
        return record

    def validate_and_save(self, *, full: bool) -> dict:
        record = self.run_eval("val", full=full)
        metrics = {k: record[k] for k in ("loss", "ppl", "bpb", "accuracy", "op_share")}
        p = self.progress
        p.last_val = {"step": p.step, "metrics": metrics}
        if improves(metrics, p.best, self.select):
            p.best = {"step": p.step, "metrics": metrics}
            self.save_checkpoint("best")
        return record

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict:
        """Train to max_steps (resuming first if asked), then test once; returns the results."""
        t, p = self.cfg.train, self.progress
        if self.resume:
            self.progress = p = self.ckpt.load_last()
            self.metrics.truncate_after(p.step)
        if p.step >= self.max_steps and (self.run_dir / "results.json").is_file():
            self.display.say(f"{self.run_dir}: run already complete ({p.step} steps)")
            return json.loads((self.run_dir / "results.json").read_text())
        self.display.start(self.max_steps, p.step, f"{self.cfg.task}/{self.cfg.model.layout}")
        window = torch.zeros(4 + self.n_layers * N_OPS, dtype=torch.float64, device=self.device)
        window_time = 0.0
        try:
            while p.step < self.max_steps:
                start = time.perf_counter()
                out = self.train_step()
                window += out["stats"]
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - start
                window_time += elapsed
                p.train_time += elapsed
                ckpt_due = p.step % self.ckpt_every == 0 or p.step == self.max_steps
                if p.step % t.log_every == 0 or ckpt_due:
                    # Windows also close at checkpoints, so a resumed run logs the same lines.
                    self._log_train(window, window_time, out)
                    window.zero_()
                    window_time = 0.0
                if p.step % self.eval_every == 0 or p.step == self.max_steps:
                    self.display.validation(self.validate_and_save(full=p.step == self.max_steps))
                if ckpt_due:
                    self.save_checkpoint("last")
                self.display.stepped(p.step, self.max_steps, p.train_time, out["stats"])
            return self.finish()
        finally:
            self.display.close()

    def _log_train(self, window: torch.Tensor, elapsed: float, out: dict) -> None:
        D.all_reduce_sum(window, self.info)  # fit() zeroes the window after this
        w = window.cpu()
        loss = float(w[0] / w[1]) if w[1] else float("nan")
        tokens = int(w[3])
        rec = {"kind": "train", "step": self.progress.step, "tokens": self.progress.tokens_seen, "loss": loss,
               "lr": out["lr"], "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
               "grad_norm": out["grad_norm"], "op_share": shares(w[4:].view(self.n_layers, N_OPS)),
               "meta_gate": float(out["meta_gate"]) if out["meta_gate"] is not None else None,
               "time": round(self.progress.train_time, 4)}
        if self.kind == "lm":
            rec["ppl"] = math.exp(min(loss, 700.0))
        else:
            rec["accuracy"] = float(w[2] / w[1]) if w[1] else None
        self.metrics.append(rec)
        self.display.train_window(rec)

    # ------------------------------------------------------------------ end of training
    def finish(self) -> dict:
        p = self.progress
        if p.last_val is None or p.last_val["step"] != p.step:
            self.validate_and_save(full=True)
        test_record = None
        if self.data.test is not None and len(self.data.test):
            self.ckpt.load_best_weights()
            test_record = self.run_eval("test", full=True)
            self.display.test(test_record, p.best["step"])
        results = results_record(run_name=self.run_dir.name, cfg=self.cfg, kind=self.kind, params=self.params,
                                 protocol=eval_protocol(self.data, self.cfg), select=self.select, progress=p,
                                 test_record=test_record, warmup=self.warmup, world=self.info.world,
                                 device=self.device, precision=self.precision)
        if self.mixture is not None:
            test = self.mixture.test(self.model, batch_size=self.eval_bs, device=self.device, autocast=self.autocast) \
                if test_record is not None else {}
            results["mixture"] = self.mixture.record(test)
        if self.info.is_main:
            atomic_write_json(self.run_dir / "results.json", results)
        D.barrier(self.info)
        return results


# ---------------------------------------------------------------------------- entry point
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


def check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    """The one resume check of the config: the run's task, preset, model and data must be those it
    was saved with. The model fields the task fills in (vocabulary, classes, longest input) are
    left to the checkpoint itself, which Checkpointer.load_last compares once the task filled them."""
    changed = diff(RunConfig.load(run_dir / "config.yaml"), cfg, sections=("task", "preset", "model", "data", "mix"))
    changed = [c for c in changed if c.split(":")[0].removeprefix("model.") not in TASK_FILLED_FIELDS]
    if changed:
        raise UserError(f"the checkpoint in {run_dir} does not fit the config: {'; '.join(changed[:3])}")


def train(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, data: TaskData | None = None,
          quiet: bool = False) -> dict:
    """Train (or resume) a run into run_dir; returns the results dict (also written to results.json).

    Process-wide settings (CPU threads or the CUDA device and TF32, deterministic kernels, the
    global seeds) are those of the run while it trains and are restored when train() returns
    (runtime.run_settings); glibc's allocator is tuned only by the command line
    (runtime.tune_cpu_allocator), as that cannot be undone.
    """
    run_dir = Path(run_dir)
    info = D.from_env()
    prepare_run_dir(run_dir, resume)  # every rank checks before the rendezvous below
    if resume:
        check_resumable(run_dir, cfg)  # before any data is prepared
    with run_settings(cfg, info) as device:
        D.init(info, device)
        try:
            def prepare(main: bool) -> tuple[TaskData, dict[str, TaskData]]:
                # Rank 0 prepares (and caches) the data first; the others then read the cache.
                task_data = data if data is not None else load_task_data(cfg, quiet=quiet or not main)
                finalize_model_config(cfg, task_data)
                aux = load_aux_data(cfg, task_data, quiet=quiet or not main)
                if main:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    cfg.save(run_dir / "config.yaml")
                return task_data, aux

            data, aux = _main_first(info, device, prepare)
            trainer = Trainer(cfg, run_dir, data, resume=resume, dist_info=info, quiet=quiet, device=device,
                              aux_data=aux)
            return trainer.fit()
        finally:
            D.shutdown(info)
