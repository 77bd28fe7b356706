"""Mixed-dataset training (E6; the published v3 "mixed" run): every optimizer step trains on one
batch of the main LM corpus and, with probability `mix.prob`, on ONE extra batch of an auxiliary
task drawn uniformly from `mix.tasks`.

How the extra batch joins the step, as the published code does it: its loss (weight 1) is added
to the main batch's, i.e. it gets its own forward and backward after the main batch's and the
gradients are summed before the one optimizer step (one clip, one learning rate). An LM aux
task trains the shared tied LM head; each classification aux task has its own head (the
classifier's mean-pooled MLP head) on the shared backbone, stored in the model under
`aux_heads.<task>` so it is saved in model.safetensors and restored on resume; loading a run
for eval or generation drops those heads (train/runs.py, LM head only).

Exact resume: the draw of step s is a pure function of (train.seed, s), and each aux task's
BatchSampler position goes into state.json ("mixture") with the main sampler's.

Differences from the published code (train_all.py, train_mixed), on purpose: its classification
aux loss pools the token embeddings (embedding -> final norm -> mean), skipping every layer, into
a Linear head, so those batches never reach the routed layers; here they go through the
backbone. Its draw is made per micro-batch with Python's unseeded `random`; here once per
optimizer step, seeded. It tests the final weights; here the best checkpoint on the main
validation split, as every run.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.tasks import task_spec
from ..errors import UserError
from ..model import ChiarForCausalLM, classification_head, init_module, mean_pool
from .datasets import BatchSampler, TaskData
from .evaluate import eval_protocol, evaluate
from .results import TEST_KEYS
from .run_config import RunConfig
from .task_data import load_task_data

AUX_HEADS = "aux_heads"  # model attribute, and state-dict prefix, of the classification heads
# Data fields every task of a mixture shares with the main task: one vocabulary, one data folder.
SHARED_DATA = ("data_dir", "cache_dir", "tokenizer", "data_seed", "workers")


def aux_run_config(cfg: RunConfig, name: str) -> RunConfig:
    """The run configuration an auxiliary task is loaded with: the main run's data section, with
    a classification task's own published data defaults (length, sizes) and the mix caps."""
    spec = task_spec(name)
    data = copy.deepcopy(cfg.data)
    data.path = ""  # the main task's dataset folder is not the aux task's
    if spec.kind == "cls":
        for key, value in spec.defaults.get("data", {}).items():
            if key not in SHARED_DATA:
                setattr(data, key, value)
        data.seq_len = cfg.mix.seq_len or data.seq_len
        data.max_examples = cfg.mix.max_examples
    else:
        data.max_train_tokens = cfg.mix.max_train_tokens
    return dataclasses.replace(cfg, task=name, data=data)


def load_aux_data(cfg: RunConfig, main: TaskData, quiet: bool = False) -> dict[str, TaskData]:
    """Every auxiliary task's data, checked against the main task's vocabulary; grows
    cfg.model.max_seq_len to the longest aux input (before config.yaml is written)."""
    out = {}
    for name in cfg.mix.tasks:
        aux_cfg = aux_run_config(cfg, name)
        data = load_task_data(aux_cfg, quiet=quiet)
        if data.vocab_size > main.vocab_size:
            raise UserError(f"mix.tasks: {name} has {data.vocab_size} token ids but the main task {cfg.task} only "
                            f"{main.vocab_size}; give every task the same data.tokenizer")
        if aux_cfg.data.seq_len > cfg.model.max_seq_len:  # longer classification inputs than the LM context
            cfg.model = cfg.model.replace(max_seq_len=aux_cfg.data.seq_len)
        out[name] = data
    return out


def draw_task(seed: int, step: int, prob: float, names: list[str]) -> str | None:
    """The aux task trained at optimizer step `step`, or None: a pure function of its arguments,
    so a resumed run draws what an uninterrupted one would."""
    rng = np.random.default_rng([seed, step, 0x313])
    if rng.random() >= prob:
        return None
    return names[int(rng.integers(len(names)))]


class Mixture:
    """The auxiliary tasks of one run: their samplers, heads and the per-step draw."""

    def __init__(self, cfg: RunConfig, aux: dict[str, TaskData], model: ChiarForCausalLM, world: int):
        if world > 1:
            raise UserError("mix.tasks runs in one process only for now (the extra batch bypasses DDP/FSDP sync)")
        self.cfg, self.tasks, self.names = cfg, aux, list(aux)
        self.seed, self.prob = cfg.train.seed, cfg.mix.prob
        self.samplers, self.batches = {}, dict.fromkeys(self.names, 0)
        heads = nn.ModuleDict()
        for i, (name, data) in enumerate(aux.items()):
            size = cfg.mix.batch_size or (cfg.train.batch_size if data.kind == "lm" else max(8, cfg.train.batch_size // 4))
            self.samplers[name] = BatchSampler(len(data.train), size, seed=cfg.train.seed * 1000 + 1 + i)
            if data.kind == "cls":
                heads[name] = classification_head(model.cfg, data.n_classes)
        if len(heads):
            for module in heads.modules():
                init_module(module, model.cfg.init_std)
            model.add_module(AUX_HEADS, heads.to(model.model.embed.weight.device))

    def draw(self, step: int) -> str | None:
        return draw_task(self.seed, step, self.prob, self.names)

    def loss(self, name: str, model: ChiarForCausalLM, batch: dict) -> torch.Tensor:
        """The task loss of one aux batch (as published, without the routing regulariser)."""
        mask = batch.get("attention_mask")
        if self.tasks[name].kind == "lm":
            return model(batch["input_ids"], attention_mask=mask, labels=batch["labels"]).loss
        hidden, _, _ = model.model(batch["input_ids"], mask)
        logits = getattr(model, AUX_HEADS)[name](mean_pool(hidden, mask))
        return F.cross_entropy(logits.float(), batch["labels"])

    def train_extra(self, step: int, model: ChiarForCausalLM, *, micro: int, device: torch.device, autocast,
                    scaler) -> str | None:
        """Forward and backward of step `step`'s extra batch, if it has one (gradients accumulate
        onto the main batch's); returns the task trained."""
        name = self.draw(step)
        if name is None:
            return None
        data = self.tasks[name].train
        idx = self.samplers[name].next_batch()
        for start in range(0, len(idx), micro):
            part = idx[start : start + micro]
            batch = {k: v.to(device, non_blocking=True) for k, v in data.batch(part).items()}
            with autocast():
                loss = self.loss(name, model, batch) * (len(part) / len(idx))
            (scaler.scale(loss) if scaler is not None else loss).backward()
        self.batches[name] += 1
        return name

    # ------------------------------------------------------------------ training state
    def state(self) -> dict:
        return {"samplers": {n: s.state() for n, s in self.samplers.items()}, "batches": dict(self.batches)}

    def load_state(self, state: dict | None) -> None:
        if not state or set(state.get("samplers", {})) != set(self.names):
            raise UserError(f"the checkpoint was not saved with the mixture mix.tasks={self.names}")
        for name, sampler in self.samplers.items():
            sampler.load_state(state["samplers"][name])
        self.batches = {n: int(state["batches"].get(n, 0)) for n in self.names}

    # ------------------------------------------------------------------ test
    def test(self, model: ChiarForCausalLM, *, batch_size: int, device: torch.device, autocast) -> dict:
        """Test metrics of the loaded (best) weights on each LM aux task's test split."""
        out = {}
        for name, data in self.tasks.items():
            if data.kind != "lm" or data.test is None or not len(data.test):
                continue
            metrics = evaluate(model, data.test, batch_size=batch_size, device=device, autocast=autocast,
                               token_bytes=data.token_bytes)
            out[name] = {**{k: metrics[k] for k in TEST_KEYS if k in metrics},
                         "protocol": eval_protocol(data, aux_run_config(self.cfg, name), "test")}
        return out

    def record(self, test: dict) -> dict:
        """The mixture's part of results.json."""
        m = self.cfg.mix
        return {"tasks": self.names, "prob": m.prob, "extra_batches": dict(self.batches),
                "batch_sizes": {n: s.batch_size for n, s in self.samplers.items()}, "test": test}
