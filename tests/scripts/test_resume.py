"""A training process killed with SIGKILL resumes exactly, also during a backup.

This file, run as a script, is the training process: `scripts/train.py` on
configs/smoke.flags plus the arguments given, with test-only hooks read from the
environment (a SIGKILL after a given step, or in the middle of writing a given
step's backup). It dumps the final weights, optimizer state and memory to an .npz.
The tests run the same command uninterrupted, killed and started again, and
compare the dumps.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 900  # seconds per training process, TensorFlow start-up included
# 9 steps, 3 per epoch, memory from step 2, a backup every 2 steps and at
# epoch ends: steps 2, 3, 4, 6, 8, 9. Evaluation only before and after.
# More flags from the environment, e.g. RESUME_TEST_ARGS=--augmentation=keras_cv.
ARGS = (
    "--steps=9",
    "--backup_every_steps=2",
    "--eval_every_epochs=100",
    *shlex.split(os.environ.get("RESUME_TEST_ARGS", "")),
)
# Each test runs without XLA (the flagfiles' default) and with it: the README
# claims a bit-for-bit resume in both compile modes.
COMPILE_MODES = {"no_xla": ("--jit_compile=false",), "xla": ("--jit_compile=true",)}


def _sigkill(model=None):
    """Dies as a killed process does: no handler, no clean-up."""
    os.kill(os.getpid(), signal.SIGKILL)


def _driver(out: str, args: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    os.chdir(ROOT)
    import keras
    import train
    from absl import flags
    from script_data import AtStep  # this folder: the script's own

    from xbm_tf.backup import TrainingBackup

    class Dump(keras.callbacks.Callback):
        """Saves every variable of the model (weights, optimizer, memory)."""

        def on_train_end(self, logs=None):
            state = {f"model/{v.path}": np.asarray(v) for v in self.model.variables}
            for v in self.model.optimizer.variables:
                state[f"optimizer/{v.path}"] = np.asarray(v)
            state["jit_compile"] = np.asarray(bool(self.model.jit_compile))
            np.savez(out, **state)

    callbacks = [Dump()]
    if "KILL_AFTER_STEP" in os.environ:
        callbacks.append(AtStep(int(os.environ["KILL_AFTER_STEP"]), _sigkill))
    if "KILL_IN_BACKUP_AT_STEP" in os.environ:
        kill_step = int(os.environ["KILL_IN_BACKUP_AT_STEP"])
        write = TrainingBackup._write

        def write_then_die(self, directory):
            if self.step != kill_step:
                return write(self, directory)
            # The weights are on disk, the state file is not: die here.
            self.model.save_weights(os.path.join(directory, "model.weights.h5"))
            _sigkill()

        TrainingBackup._write = write_then_die
    flags.FLAGS(["train", "--flagfile=configs/smoke.flags", *args])
    train.common.quiet_tensorflow()
    train.run(extra_callbacks=callbacks)


if __name__ == "__main__":
    _driver(sys.argv[1], sys.argv[2:])
    sys.exit(0)


def _train(
    out: Path, workdir: Path, mode: tuple[str, ...], **hooks
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    env.update({name.upper(): str(value) for name, value in hooks.items()})
    command = [
        sys.executable,
        __file__,
        str(out),
        f"--workdir={workdir}",
        *mode,
        *ARGS,
    ]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def _finished(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _assert_same_state(path: Path, reference: Path) -> None:
    with np.load(path) as got, np.load(reference) as want:
        assert sorted(got.files) == sorted(want.files)
        assert any("memory" in name and "embeddings" in name for name in want.files)
        for name in want.files:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope="module", params=sorted(COMPILE_MODES))
def mode(request):
    return COMPILE_MODES[request.param]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mode):
    out = tmp_path_factory.mktemp("uninterrupted")
    _finished(_train(out / "state.npz", out / "run", mode))
    with np.load(out / "state.npz") as state:
        (iterations,) = [state[n] for n in state.files if n.endswith("/iteration")]
        assert bool(state["jit_compile"]) == ("--jit_compile=true" in mode)
    assert int(iterations) == 9
    return out / "state.npz"


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_bit_for_bit(uninterrupted, mode, tmp_path):
    workdir = tmp_path / "run"
    killed = _train(tmp_path / "state.npz", workdir, mode, kill_after_step=5)
    assert killed.returncode == -signal.SIGKILL
    # Killed in epoch 1 after its 2nd step; the last backup is step 4's.
    assert sorted(os.listdir(workdir / "backup")) == ["step_000000004"]
    assert not (tmp_path / "state.npz").exists()
    out = _finished(_train(tmp_path / "state.npz", workdir, mode))
    assert "Resuming from the backup at step 4" in out
    _assert_same_state(tmp_path / "state.npz", uninterrupted)
    assert not (workdir / "backup").exists()  # removed once the run is over
    epochs = [line.split(",")[0] for line in open(workdir / "log.csv")][1:]
    assert epochs == ["0", "1", "2"]


@pytest.mark.slow
def test_sigkill_while_writing_a_backup_resumes_from_the_previous_one(
    uninterrupted, mode, tmp_path
):
    workdir = tmp_path / "run"
    killed = _train(tmp_path / "state.npz", workdir, mode, kill_in_backup_at_step=8)
    assert killed.returncode == -signal.SIGKILL
    names = sorted(os.listdir(workdir / "backup"))
    assert names == [".step_000000008.partial", "step_000000006"]
    partial = workdir / "backup" / ".step_000000008.partial"
    assert os.listdir(partial) == ["model.weights.h5"]  # killed before the state
    out = _finished(_train(tmp_path / "state.npz", workdir, mode))
    assert "Resuming from the backup at step 6" in out
    _assert_same_state(tmp_path / "state.npz", uninterrupted)
