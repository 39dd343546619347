"""TerminateOnNonFinite: stops `fit` at the first non-finite loss, naming it."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

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

    A run resumed mid-epoch (`xbm_tf.fit_segments`) first calls `fit` with the
    epoch's remaining steps only; give `steps_per_epoch` (the full epoch) and
    such a shorter epoch counts as the end of a full one, so the message names
    the run's true step, not the step within the shorter `fit`.

    The logged values are running means over the epoch, so one non-finite step
    makes them non-finite from that step on: the first step seen non-finite is
    the first bad step (with `steps_per_execution=N`, within the last N steps).

    A step can also overflow a gradient while its loss is finite: its update
    makes the weights non-finite, and only the next step's loss shows it, after
    a backup or checkpoint of that step may have saved them. So after every step
    the trainable weights are checked too (one compiled pass over them, small
    next to a step), and non-finite weights stop training in the same way.

    Args:
        check_weights: also stop when a trainable weight is not finite.
        steps_per_epoch: the steps of a full epoch of the run, when `fit` may run
            shorter epochs that finish a resumed one; default: `fit`'s own.

    Example:
    ```python
    model.fit(train, epochs=10, steps_per_epoch=500,
              callbacks=[TerminateOnNonFinite(), backup, checkpoint])
    ```
    """

    def __init__(self, check_weights: bool = True, steps_per_epoch: int | None = None):
        super().__init__()
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")
        self.check_weights = check_weights
        self.steps_per_epoch = steps_per_epoch
        self._epoch = 0
        self._weights_finite = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_begin(self, logs=None):
        self._weights_finite = None  # the model's variables may have changed
        steps = (self.params or {}).get("steps")
        if steps and self.steps_per_epoch and steps > self.steps_per_epoch:
            raise ValueError(
                f"fit runs {steps} steps per epoch, more than the steps_per_epoch="
                f"{self.steps_per_epoch} given to TerminateOnNonFinite."
            )

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        for key, description in TERMS:
            if key not in logs:
                continue
            value = float(np.asarray(logs[key]))
            if not math.isfinite(value):
                self._stop(f"{description} became {value}", batch)
        if self.check_weights and not self._finite_weights():
            self._stop(
                "the weights became non-finite although every loss was finite "
                "(a gradient overflowed)",
                batch,
            )

    def _finite_weights(self) -> bool:
        if self._weights_finite is None:
            variables = [
                v for v in self.model.trainable_variables if "float" in str(v.dtype)
            ]

            @tf.function
            def finite():
                checks = [tf.reduce_all(tf.math.is_finite(v.value)) for v in variables]
                return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)

            self._weights_finite = finite
        return bool(self._weights_finite())

    def _stop(self, what: str, batch: int):
        steps = (self.params or {}).get("steps")
        if steps:
            full = self.steps_per_epoch or steps
            # A shorter fit finishes its epoch: its first step is step full - steps.
            in_epoch = full - steps + batch + 1
            step = self._epoch * full + in_epoch
            where = (
                f"at training step {step} (epoch {self._epoch + 1}, step "
                f"{in_epoch} of {full})"
            )
        else:
            where = f"at epoch {self._epoch + 1}, step {batch + 1}"
        raise NonFiniteLossError(
            f"{what} {where}. Training stopped before anything was saved after "
            "that step, so the last backup and checkpoint are kept. Lower the "
            "learning rate, or check the data for non-finite values"
        )
