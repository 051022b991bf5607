"""Training RNAN: `rnan-fast train` is a thin layer over this package.

    step         TrainStep / make_train_step (eager, or one CUDA graph per step), make_optimizer,
                 train (a plain loop over given batches)
    loop         TrainConfig, resolve_config, run: a whole run (schedule, EMA, validation,
                 checkpoints, signals, logs); learning_rate
    datasets     image folders in memory, patches degraded on the fly, one generator per sample
    checkpoint   the one-file checkpoint, written atomically
    distributed  torch.distributed under torchrun (env://)

    from rnan_fast.train import TrainConfig, run
    run(TrainConfig(task="denoise_gray", sigma=25, data=["train/"], out="runs/g25", steps=10_000))
"""
from rnan_fast.train.step import LOSSES, PRECISIONS, TrainStep, make_optimizer, make_train_step, train
from rnan_fast.train.loop import (ConfigError, Interrupted, NonFiniteLoss, TrainConfig, learning_rate,
                                  resolve_config, run)
from rnan_fast.train.datasets import DataError

__all__ = ["LOSSES", "PRECISIONS", "TrainStep", "make_optimizer", "make_train_step", "train",
           "TrainConfig", "resolve_config", "run", "learning_rate", "ConfigError", "DataError",
           "NonFiniteLoss", "Interrupted"]
