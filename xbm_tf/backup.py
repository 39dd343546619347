"""Atomic, step-level backups of a training run, and an exact resume schedule.

`TrainingBackup` is a Keras callback that saves the whole training state (model
weights, optimizer and memory, via `model.save_weights`) and the number of
steps done, every `every_steps` steps and at each epoch end. A backup is written
into a hidden `.step_<n>.partial` directory, flushed to disk, then renamed to
`step_<n>` (a rename within one directory is atomic); only then is the previous
backup deleted. So a run killed at any moment, even while a backup is being
written, finds a complete backup: the new one or the previous one.

`fit_segments` turns the restored step into the `fit` calls that finish the run
with exactly the steps an uninterrupted run would take (Keras' `fit` restarts an
epoch from its first batch: a run resumed mid-epoch first finishes that epoch
with a shorter `fit`). With a training stream that is a function of
`(seed, step)` (`xbm_tf.data.train_dataset(start_step=...)`), the resumed run
trains on exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

import keras

from xbm_tf import distribute

_COMPLETE = re.compile(r"^step_(\d+)$")
_WEIGHTS = "model.weights.h5"
_STATE = "state.json"

__all__ = ["TrainingBackup", "fit_segments"]


def fit_segments(
    start_step: int, steps_per_epoch: int, epochs: int
) -> list[tuple[int, int, int, int]]:
    """The `fit` calls that take a run from `start_step` to `epochs` epochs.

    Args:
        start_step: the steps already done (the restored backup's step).
        steps_per_epoch: the steps of a full epoch.
        epochs: the total number of epochs of the run.

    Returns:
        A list of `(first_step, initial_epoch, epochs, steps_per_epoch)`: call
        `fit(dataset starting at first_step, initial_epoch=..., epochs=...,
        steps_per_epoch=...)` for each, in order. Resumed mid-epoch, the first
        call finishes that epoch's remaining steps; empty when the run is done.

    Example:
    >>> fit_segments(5, steps_per_epoch=3, epochs=4)
    [(5, 1, 2, 1), (6, 2, 4, 3)]
    """
    if steps_per_epoch < 1 or epochs < 0 or start_step < 0:
        raise ValueError(
            "Need steps_per_epoch >= 1, epochs >= 0 and start_step >= 0, got "
            f"{steps_per_epoch}, {epochs}, {start_step}."
        )
    if start_step > epochs * steps_per_epoch:
        raise ValueError(
            f"The backup is at step {start_step}, past the end of this run "
            f"({epochs} epochs of {steps_per_epoch} steps): was it made by another "
            "command?"
        )
    epoch, done = divmod(start_step, steps_per_epoch)
    segments = []
    if done:
        segments.append((start_step, epoch, epoch + 1, steps_per_epoch - done))
        epoch += 1
    if epoch < epochs:
        segments.append((epoch * steps_per_epoch, epoch, epochs, steps_per_epoch))
    return segments


class TrainingBackup(keras.callbacks.Callback):
    """Backs up the training state every `every_steps` steps, atomically.

    Saves after every `every_steps`-th step and at each epoch end (after the
    callbacks listed before it, so an epoch's logs are written before its
    backup). Call `restore(model)` before `fit`: it loads the newest complete
    backup and returns its step (0 without a backup), from which the callback
    counts. `delete()` removes the backups once the run is over. The backup
    directory must not be used for anything else.

    Args:
        backup_dir: the directory of the backups (created when first needed).
        every_steps: save after every this many steps (and at epoch ends).

    Example:
    ```python
    backup = TrainingBackup("runs/x/backup", every_steps=100)
    step = backup.restore(model)
    for first, initial, epochs, steps in fit_segments(step, 500, 10):
        model.fit(train_dataset(..., start_step=first), initial_epoch=initial,
                  epochs=epochs, steps_per_epoch=steps, callbacks=[backup])
    backup.delete()
    ```
    """

    def __init__(self, backup_dir: str, every_steps: int = 100):
        super().__init__()
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}.")
        self.backup_dir = os.fspath(backup_dir)
        self.every_steps = int(every_steps)
        self.step = 0
        self._saved_step = None
        self._epoch_steps = 0

    def _complete(self) -> list[tuple[int, str]]:
        """`(step, path)` of every complete backup, oldest first."""
        if not os.path.isdir(self.backup_dir):
            return []
        found = []
        for name in os.listdir(self.backup_dir):
            match = _COMPLETE.match(name)
            if match:
                found.append((int(match.group(1)), os.path.join(self.backup_dir, name)))
        return sorted(found)

    def restore(self, model: keras.Model) -> int:
        """Loads the newest complete backup into `model`; returns its step.

        Unfinished (`.partial`) backups of a killed run are deleted.

        Args:
            model: the built, compiled model of the run.

        Returns:
            The number of steps the backup had done, 0 if there is none.
        """
        self.step = 0
        self._saved_step = None
        self._remove_partial()
        complete = dict(self._complete())
        step = max(complete, default=0)
        strategy = getattr(model, "distribute_strategy", None)
        if strategy is not None and distribute.is_multiworker(strategy):
            # Every worker takes part, with or without a backup of its own.
            step = distribute.min_over_workers(step, strategy)
            if step and step not in complete:
                raise ValueError(
                    f"The workers' newest common backup is step {step}, but "
                    f"{self.backup_dir} holds only steps {sorted(complete)}: were "
                    "the workers started with different --workdir or commands?"
                )
        if not step:
            return 0
        path = complete[step]
        weights = os.path.join(path, _WEIGHTS)
        with open(os.path.join(path, _STATE)) as f:
            state = json.load(f)
        if state.get("step") != step:
            raise ValueError(f"{path}/{_STATE} says step {state.get('step')}")
        # The optimizer's variables are made under the model's strategy, if any.
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with scope:
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            model.load_weights(weights)
        self.step = self._saved_step = step
        return step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_steps = 0

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the last step of the call (steps_per_execution may be > 1).
        previous = self.step
        self.step += batch + 1 - self._epoch_steps
        self._epoch_steps = batch + 1
        steps = (self.params or {}).get("steps")
        last_of_epoch = steps is not None and batch + 1 >= steps
        crossed = self.step // self.every_steps > previous // self.every_steps
        if crossed and not last_of_epoch:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        if self._saved_step != self.step:
            self.save()

    def save(self) -> str:
        """Writes the backup of the current step; returns its directory."""
        os.makedirs(self.backup_dir, exist_ok=True)
        final = os.path.join(self.backup_dir, f"step_{self.step:09d}")
        partial = os.path.join(self.backup_dir, f".step_{self.step:09d}.partial")
        if os.path.exists(partial):
            shutil.rmtree(partial)
        os.makedirs(partial)
        self._write(partial)
        if os.path.exists(final):  # the same step again: replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(self.backup_dir)
        # Multi-worker: keep the previous one too, which the other workers may
        # still need if one of them dies before its own copy of this one is done.
        strategy = getattr(self.model, "distribute_strategy", None)
        keep = 2 if strategy is not None and distribute.is_multiworker(strategy) else 1
        for _, path in self._complete()[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
        self._saved_step = self.step
        return final

    def _write(self, directory: str) -> None:
        """Writes the weights, then the state file, each flushed to disk."""
        weights = os.path.join(directory, _WEIGHTS)
        self.model.save_weights(weights, overwrite=True)
        _fsync_file(weights)
        state = os.path.join(directory, _STATE)
        with open(state, "w") as f:
            json.dump({"step": self.step}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(directory)

    def _remove_partial(self) -> None:
        if os.path.isdir(self.backup_dir):
            for name in os.listdir(self.backup_dir):
                if name.endswith(".partial"):
                    shutil.rmtree(
                        os.path.join(self.backup_dir, name), ignore_errors=True
                    )

    def delete(self) -> None:
        """Removes the backup directory (call once the run has finished)."""
        shutil.rmtree(self.backup_dir, ignore_errors=True)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
