"""Training engine: configuration, the training loop, checkpoints, evaluation and run folders.

    from chiarformer.train import RunConfig, resolve, train, load_run
    cfg = resolve(task="listops", preset="tiny", layout="dct_attn", sets=["train.max_steps=100"])
    results = train(cfg, "runs/demo")            # or resume=True to continue runs/demo
    run = load_run("runs/demo", which="best")    # run.model (eval mode), run.config, run.tokenizer
"""

from .loop import TrainingDiverged, train
from .run_config import DataConfig, RunConfig, TrainConfig, resolve
from .runs import load_run, save_model_into_run

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "TrainingDiverged", "load_run", "resolve", "save_model_into_run",
           "train"]
