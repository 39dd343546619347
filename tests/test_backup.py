"""TrainingBackup (atomic step-level backups) and fit_segments."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

from xbm_tf.backup import TrainingBackup, fit_segments


@pytest.mark.parametrize(
    "start, want",
    [
        (0, [(0, 0, 4, 3)]),
        (3, [(3, 1, 4, 3)]),
        (5, [(5, 1, 2, 1), (6, 2, 4, 3)]),
        (10, [(10, 3, 4, 2)]),
        (12, []),
    ],
)
def test_fit_segments_run_the_remaining_steps_once(start, want):
    segments = fit_segments(start, steps_per_epoch=3, epochs=4)
    assert segments == want
    # Together with the steps already done: every step of the run exactly once.
    steps = list(range(start))
    for first, initial, end, per_epoch in segments:
        assert first == len(steps) and first - initial * 3 < 3
        steps += list(range(first, first + (end - initial - 1) * 3 + per_epoch))
    assert steps == list(range(12))


def test_fit_segments_names_a_backup_past_the_run():
    with pytest.raises(ValueError, match="step 13, past the end of this run"):
        fit_segments(13, steps_per_epoch=3, epochs=4)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    return model


def _fit(model, backup, steps, epochs=1):
    x = np.arange(24, dtype=np.float32).reshape(8, 3) / 10
    model.fit(
        x, x[:, :2], batch_size=2, epochs=epochs, steps_per_epoch=steps,
        callbacks=[backup], verbose=0, shuffle=False,
    )  # fmt: skip


def test_backups_every_n_steps_and_at_epoch_ends_restore_the_newest(tmp_path):
    model = _model()
    saved = []
    backup = TrainingBackup(tmp_path / "backup", every_steps=3)
    backup.save = lambda save=backup.save: saved.append(backup.step) or save()
    assert backup.restore(model) == 0
    _fit(model, backup, steps=4, epochs=2)
    assert saved == [3, 4, 6, 8]  # steps 3 and 6, the ends of epochs at 4, 8
    assert os.listdir(tmp_path / "backup") == ["step_000000008"]
    restored = _model(seed=1)
    assert TrainingBackup(tmp_path / "backup").restore(restored) == 8
    for got, want in zip(restored.variables, model.variables):
        np.testing.assert_array_equal(got, want)
    assert int(restored.optimizer.iterations) == 8


def test_an_unfinished_backup_is_ignored_and_removed(tmp_path):
    model = _model()
    backup = TrainingBackup(tmp_path, every_steps=2)
    backup.set_model(model)
    backup.restore(model)
    _fit(model, backup, steps=2)
    want = [np.asarray(v).copy() for v in model.variables]

    def die_after_the_weights(directory):
        model.save_weights(os.path.join(directory, "model.weights.h5"))
        raise KeyboardInterrupt("killed while writing")

    backup._write = die_after_the_weights
    with pytest.raises(KeyboardInterrupt):
        _fit(model, backup, steps=1)  # step 3: a new backup, never finished
    assert sorted(os.listdir(tmp_path)) == [".step_000000003.partial", "step_000000002"]
    with open(tmp_path / "step_000000002" / "state.json") as f:
        assert f.read() == '{"step": 2}'
    restored = _model(seed=1)
    assert TrainingBackup(tmp_path).restore(restored) == 2
    for got, value in zip(restored.variables, want):
        np.testing.assert_array_equal(got, value)
    assert os.listdir(tmp_path) == ["step_000000002"]
