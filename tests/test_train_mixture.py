"""Mixed-dataset training (train/mixture.py): the per-step draw, the routing of each auxiliary task
to its head, gradients into the shared backbone, validation on the main corpus only, the extra
test on the LM aux task, exact resume, loading a mixed run, and the config errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from chiarformer import ChiarConfig, ChiarForCausalLM
from chiarformer.data import ClassificationData
from chiarformer.data.tasks import TASKS
from chiarformer.errors import UserError
from chiarformer.train import checkpoint as C
from chiarformer.train import load_run, resolve, train
from chiarformer.train.datasets import TaskData
from chiarformer.train.loop import Trainer
from chiarformer.train.mixture import AUX_HEADS, Mixture, draw_task, load_aux_data
from chiarformer.train.runs import evaluate_run
from chiarformer.train.task_data import ClassificationView, finalize_model_config, load_task_data

from corpus import TINY, write_corpus


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIAR_CACHE_DIR", str(tmp_path / "cache"))
    # A second LM task over the same files stands in for the WikiText-2 aux corpus.
    monkeypatch.setitem(TASKS, "text-aux", dataclasses.replace(TASKS["text"], name="text-aux"))
    train_file = write_corpus(tmp_path / "train.txt", 3000, 0)
    test_file = write_corpus(tmp_path / "test.txt", 600, 1)
    return [f"data.train_files=[{train_file}]", f"data.test_files=[{test_file}]", "data.val_fraction=0.1"]


MIX = ["mix.tasks=[text-aux,listops-flat]", "mix.prob=0.5", "mix.max_examples=64", "train.max_steps=8",
       "train.eval_every=4"]


def mixed_cfg(corpus, *extra):
    return resolve("text", "tiny", "dct_attn", sets=TINY + corpus + MIX + list(extra))


def tiny_lm() -> ChiarForCausalLM:
    torch.manual_seed(0)
    return ChiarForCausalLM(ChiarConfig.from_preset("tiny").replace(vocab_size=40, d_model=32, n_heads=2,
                                                                    max_seq_len=16, dropout=0.0))


def cls_task(n_classes: int, seed: int) -> TaskData:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, 40, rng.integers(4, 12)) for _ in range(32)]
    view = ClassificationView(ClassificationData.from_sequences(seqs, rng.integers(0, n_classes, 32), 0))
    return TaskData("cls", view, view, view, vocab_size=40, n_classes=n_classes)


def fake_mixture(model, prob=0.25, seed=0, names=("a", "b", "c")) -> Mixture:
    cfg = resolve("text", "tiny", "dct_attn", sets=[f"mix.prob={prob}", f"train.seed={seed}"])
    return Mixture(cfg, {n: cls_task(2 + i, i) for i, n in enumerate(names)}, model, world=1)


# ---------------------------------------------------------------------------- the draw
def test_extra_batch_rate_is_mix_prob_uniform_over_tasks_and_seeded():
    model = tiny_lm()
    mix = fake_mixture(model, prob=0.25, seed=3)
    draws = [mix.draw(s) for s in range(6000)]
    chosen = [d for d in draws if d is not None]
    assert abs(len(chosen) / len(draws) - 0.25) < 0.02
    for name in ("a", "b", "c"):
        assert abs(chosen.count(name) / len(chosen) - 1 / 3) < 0.04
    assert draws == [fake_mixture(tiny_lm(), prob=0.25, seed=3).draw(s) for s in range(6000)]
    assert draws != [fake_mixture(tiny_lm(), prob=0.25, seed=4).draw(s) for s in range(6000)]
    assert all(fake_mixture(tiny_lm(), prob=0.0).draw(s) is None for s in range(200))


# ---------------------------------------------------------------------------- heads and gradients
def test_each_aux_task_trains_its_own_head_and_the_shared_backbone():
    model = tiny_lm()
    mix = fake_mixture(model)
    lm_rng = np.random.default_rng(0)
    ids = torch.as_tensor(lm_rng.integers(0, 40, (4, 16)))
    lm_batch = {"input_ids": ids, "labels": ids}
    heads = getattr(model, AUX_HEADS)
    assert {n: heads[n][-1].out_features for n in heads} == {"a": 2, "b": 3, "c": 4}
    first_ffn = list(model.model.layers[0].ffn.parameters())
    for name in ("a", "b", "c", "lm"):
        model.zero_grad(set_to_none=True)
        if name == "lm":
            mix.tasks["lm"] = TaskData("lm", None, None, None, vocab_size=40)
            loss = mix.loss("lm", model, lm_batch)
        else:
            data = mix.tasks[name].train
            loss = mix.loss(name, model, data.batch(np.arange(8)))
        loss.backward()
        trained = {n for n in heads if heads[n][0].weight.grad is not None}
        assert trained == (set() if name == "lm" else {name})
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in first_ffn)
        assert model.model.embed.weight.grad.abs().sum() > 0
    # The heads are parameters of the model, so the optimizer and the checkpoint include them.
    assert any(k.startswith(f"{AUX_HEADS}.a.") for k in model.state_dict())


# ---------------------------------------------------------------------------- a mixed run
def test_mixed_run_validates_on_main_tests_main_and_aux_lm_and_loads_lm_only(tmp_path, corpus):
    cfg = mixed_cfg(corpus)
    res = train(cfg, tmp_path / "run", quiet=True)
    mixture = res["mixture"]
    draws = [draw_task(0, s, 0.5, ["text-aux", "listops-flat"]) for s in range(8)]
    assert sum(mixture["extra_batches"].values()) == sum(d is not None for d in draws) > 0
    assert mixture["extra_batches"]["listops-flat"] == draws.count("listops-flat")
    assert set(mixture["test"]) == {"text-aux"}  # classification aux tasks are not tested
    assert np.isfinite(mixture["test"]["text-aux"]["loss"])
    # Validation (checkpoint selection) is on the main corpus: the best checkpoint's validation
    # loss is the main task's validation split evaluated again.
    again = evaluate_run(tmp_path / "run", "val")
    assert again["loss"] == pytest.approx(res["best"]["val"]["loss"], rel=1e-6)
    # The heads are saved; loading the run gives the LM alone.
    state, _ = C.load_model_file(tmp_path / "run" / "checkpoints" / "best" / "model.safetensors")
    assert any(k.startswith(f"{AUX_HEADS}.listops-flat.") for k in state)
    run = load_run(tmp_path / "run")
    assert not hasattr(run.model, AUX_HEADS)
    out = run.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, temperature=0)
    assert out.shape == (1, 7)


def test_mixed_run_resumes_exactly(tmp_path, corpus):
    full = train(mixed_cfg(corpus), tmp_path / "full", quiet=True)
    cfg = mixed_cfg(corpus)
    data = load_task_data(cfg, quiet=True)
    finalize_model_config(cfg, data)
    aux = load_aux_data(cfg, data, quiet=True)
    short = tmp_path / "short"
    short.mkdir()
    cfg.save(short / "config.yaml")
    trainer = Trainer(cfg, short, data, quiet=True, aux_data=aux)
    for _ in range(4):
        trainer.train_step()
    trainer.validate_and_save(full=True)
    trainer.save_checkpoint("last")
    resumed = train(mixed_cfg(corpus), short, resume=True, quiet=True)
    assert resumed["test"]["loss"] == full["test"]["loss"]
    assert resumed["best"] == full["best"]
    assert resumed["mixture"] == full["mixture"]
    # A resume with another mixture is refused before any training.
    with pytest.raises(UserError, match="mix"):
        train(mixed_cfg(corpus, "mix.tasks=[listops-flat]"), short, resume=True, quiet=True)


# ---------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("item, fragment", [
    ("mix.tasks=[nope]", "mix.tasks: unknown task 'nope'"),
    ("mix.prob=1.5", "mix.prob must be between 0 and 1"),
    ("mix.prob=-0.1", "mix.prob must be between 0 and 1"),
    ("mix.tasks=[text]", "not the main task"),
    ("mix.batch_size=-1", "mix.batch_size must be >= 0"),
])
def test_bad_mixture_is_a_one_line_user_error(item, fragment):
    with pytest.raises(UserError) as info:
        resolve("text", "tiny", "dct_attn", sets=[item])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_mixture_needs_an_lm_main_task():
    with pytest.raises(UserError, match="language-model main task"):
        resolve("listops-flat", "tiny", "dct_attn", sets=["mix.tasks=[imdb]"])
