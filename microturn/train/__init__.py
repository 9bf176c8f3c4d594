"""Training on the engine's own model code: full-sequence log-probabilities, a training step,
and the check that the sampler's log-probabilities equal the trainer's bit for bit."""

from microturn.train.alignment import AlignmentReport, verify_alignment
from microturn.train.batch import TimelineBatch
from microturn.train.logprobs import sequence_logprobs
from microturn.train.trainer import StepResult, TrainConfig, Trainer

__all__ = ["AlignmentReport", "StepResult", "TimelineBatch", "TrainConfig", "Trainer",
           "sequence_logprobs", "verify_alignment"]
