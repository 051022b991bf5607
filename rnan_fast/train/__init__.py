"""Training RNAN.

    step        TrainStep / make_train_step (eager, or one CUDA graph per step), make_optimizer,
                train (a plain loop over given batches)
"""
from rnan_fast.train.step import LOSSES, PRECISIONS, TrainStep, make_optimizer, make_train_step, train

__all__ = ["LOSSES", "PRECISIONS", "TrainStep", "make_optimizer", "make_train_step", "train"]
