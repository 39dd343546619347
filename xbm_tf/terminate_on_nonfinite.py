"""TerminateOnNonFinite: stops `fit` at the first non-finite loss, naming it."""

from __future__ import annotations

import math

import keras
import numpy as np

__all__ = ["NonFiniteLossError", "TerminateOnNonFinite"]

# The loss terms XBMContrastiveModel logs, in the order they are blamed.
TERMS = (
    ("batch_loss", "the in-batch loss (batch_loss)"),
    ("xbm_loss", "the memory loss (xbm_loss)"),
    ("loss", "the total loss (loss: a layer's regularization loss)"),
)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite during training."""


class TerminateOnNonFinite(keras.callbacks.Callback):
    """Raises `NonFiniteLossError` after the first step whose loss is not finite.

    Unlike `keras.callbacks.TerminateOnNaN`, which lets the epoch end (so epoch-end
    callbacks such as `BackupAndRestore` and `ModelCheckpoint` then save the
    non-finite weights), this raises at once from `on_train_batch_end`: `fit`
    stops, no later callback saves anything, and the last backup and checkpoint
    (from before the bad step) are kept. The message names the training step
    (1-based, counted over epochs), and the term that went non-finite:
    `batch_loss` or `xbm_loss` of `XBMContrastiveModel`, or else `loss`.

    The logged values are running means over the epoch, so one non-finite step
    makes them non-finite from that step on: the first step seen non-finite is
    the first bad step (with `steps_per_execution=N`, within the last N steps).

    Example:
    >>> model.fit(train, epochs=10, steps_per_epoch=500,
    ...           callbacks=[TerminateOnNonFinite(), backup, checkpoint])
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        for key, description in TERMS:
            if key not in logs:
                continue
            value = float(np.asarray(logs[key]))
            if math.isfinite(value):
                continue
            steps = (self.params or {}).get("steps")
            if steps:
                step = self._epoch * steps + batch + 1
                where = (
                    f"at training step {step} (epoch {self._epoch + 1}, step "
                    f"{batch + 1} of {steps})"
                )
            else:
                where = f"at epoch {self._epoch + 1}, step {batch + 1}"
            raise NonFiniteLossError(
                f"{description} became {value} {where}. Training stopped before "
                "anything was saved after the last epoch end, so the last backup "
                "and checkpoint are kept. Lower the learning rate, or check the "
                "data for non-finite values"
            )
