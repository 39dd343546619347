"""scripts/train.py under two replicas: MirroredStrategy and two worker processes.

This file, run as a script, is the training process: `scripts/train.py` on
configs/smoke.flags plus the arguments given, with a test-only hook read from the
environment (SIGKILL itself after a given step). At the end of training it
dumps every variable (weights, optimizer state, memory), the loss logs of every
step and the embeddings of the test split to `<out>_<task>.npz` (task 0 without
a cluster). The tests compare the dumps of one device, two replicas, and runs
killed and started again.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _driver(out: str, args: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    os.chdir(ROOT)
    import keras
    import train
    from absl import flags

    from xbm_tf.retrieval_callback import embed_dataset

    task = 0
    if "TF_CONFIG" in os.environ:
        task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]

    def step_of(model) -> int:
        return int(keras.ops.convert_to_numpy(model.optimizer.iterations))

    class Dump(keras.callbacks.Callback):
        """Every variable, the per-step losses and the test embeddings."""

        def __init__(self):
            super().__init__()
            self.losses = {}

        def on_train_batch_end(self, batch, logs=None):
            names = ("loss", "batch_loss", "xbm_loss")
            row = [float(np.asarray(logs[name])) for name in names]
            self.losses[step_of(self.model)] = row

        def on_train_end(self, logs=None):
            state = {f"model/{v.path}": np.asarray(v) for v in self.model.variables}
            for v in self.model.optimizer.variables:
                state[f"optimizer/{v.path}"] = np.asarray(v)
            steps = sorted(self.losses)
            state["loss_steps"] = np.asarray(steps)
            state["losses"] = np.asarray([self.losses[s] for s in steps])
            test = train.common.make_eval_dataset(train.common.load_splits().test)
            state["embeddings"], state["labels"] = embed_dataset(self.model, test)
            np.savez(f"{out}_{task}.npz", **state)

    class KillAfter(keras.callbacks.Callback):
        def __init__(self, step):
            super().__init__()
            self.kill_step = step

        def on_train_batch_end(self, batch, logs=None):
            if step_of(self.model) == self.kill_step:
                print(f"test hook: SIGKILL after step {self.kill_step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [Dump()]
    kill = os.environ.get("KILL_AFTER_STEP")
    if kill and int(os.environ.get("KILL_TASK", "0")) == task:
        callbacks.append(KillAfter(int(kill)))
    flags.FLAGS(["train", "--flagfile=configs/smoke.flags", *args])
    train.common.quiet_tensorflow()
    train.run(extra_callbacks=callbacks)


if __name__ == "__main__":
    _driver(sys.argv[1], sys.argv[2:])
    sys.exit(0)
