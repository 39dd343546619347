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

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _driver(out: str, args: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    os.chdir(ROOT)
    import keras
    import train
    from absl import flags
    from script_data import AtStep  # this folder: the script's own

    from xbm_tf.retrieval.callback import embed_dataset

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

    callbacks = [Dump()]
    kill = os.environ.get("KILL_AFTER_STEP")
    if kill and int(os.environ.get("KILL_TASK", "0")) == task:

        def sigkill(model):
            print(f"test hook: SIGKILL after step {kill}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        callbacks.append(AtStep(int(kill), sigkill))
    flags.FLAGS(["train", "--flagfile=configs/smoke.flags", *args])
    train.common.quiet_tensorflow()
    train.run(extra_callbacks=callbacks)


if __name__ == "__main__":
    _driver(sys.argv[1], sys.argv[2:])
    sys.exit(0)


# ---------------------------------------------------------------- the tests

TIMEOUT = 900  # seconds per run, TensorFlow start-up included, on a loaded CPU
MIRRORED = ("--strategy=mirrored", "--cpu_replicas=2")
# Equality with one device: 3 steps (the memory is used from step 3), with the
# feature drift measured at every step (drift@1 and drift@2).
SHORT = ("--steps=3", "--drift_every_steps=1", "--drift_deltas=1,2")
# Kill and resume: 9 steps, 3 per epoch, a backup every 2 steps and at epoch ends
# (steps 2, 3, 4, 6, 8, 9); evaluation only before and after.
LONG = ("--steps=9", "--backup_every_steps=2", "--eval_every_epochs=100")
# Float32 bound between two replicas and one device. Both runs reduce the same
# terms, split differently (per replica, then all-reduced: the batch-norm sums,
# the gradients, the conv kernels see 8 rows instead of 16). A float32 sum of n
# terms is within (n - 1) u sum|terms| of the exact one (Higham, Accuracy and
# Stability of Numerical Algorithms, 2nd ed., Sec. 4.2), u = 2**-24. The longest
# sum of the smoke model is the first conv kernel's gradient over 16 images x
# 28 x 28 positions: n = 12,544, n u = 7.5e-4, used relative to the losses and
# absolute for the unit-norm embeddings. Adam's update lr m / (sqrt(v) + eps)
# changes by no larger a fraction than the gradient, so two updates keep that
# order. Longer runs drift apart faster (the hinge of the contrastive loss turns
# pairs on and off): after 9 steps the losses differ by 3e-3, so the equality is
# tested over 3 steps.
BOUND = 12_544 * 2.0**-24


def _env(**hooks) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    env.update({name.upper(): str(value) for name, value in hooks.items()})
    return env


def _train(out: Path, workdir: Path, *args, **hooks) -> subprocess.CompletedProcess:
    command = [sys.executable, __file__, str(out), f"--workdir={workdir}", *args]
    return subprocess.run(
        command, env=_env(**hooks), capture_output=True, text=True, timeout=TIMEOUT
    )


def _finished(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _load(path) -> dict:
    with np.load(path) as dump:
        return {name: dump[name] for name in dump.files}


def _assert_same_state(got: dict, want: dict) -> None:
    """Weights, optimizer, memory and test embeddings equal bit for bit."""
    names = sorted(n for n in want if n not in ("loss_steps", "losses"))
    assert sorted(n for n in got if n not in ("loss_steps", "losses")) == names
    assert any("memory" in name and "embeddings" in name for name in names)
    for name in names:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _assert_equals_one_device(got: dict, one: dict) -> None:
    np.testing.assert_array_equal(got["loss_steps"], [1, 2, 3])
    assert (one["losses"][2] > 0).all()  # step 3 has a memory loss
    np.testing.assert_allclose(got["losses"], one["losses"], rtol=BOUND, atol=0)
    assert got["embeddings"].shape == one["embeddings"].shape  # one row per image
    np.testing.assert_array_equal(got["labels"], one["labels"])  # in order
    np.testing.assert_allclose(got["embeddings"], one["embeddings"], atol=BOUND)


def _drift_logged(workdir: Path) -> None:
    with open(workdir / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["drift@2"]) > 0  # steps 0 and 2 measured


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_device")
    _finished(_train(out / "dump", out / "run", *SHORT))
    return _load(out / "dump_0.npz")


@pytest.mark.slow
def test_mirrored_two_replicas_equal_one_device(one_device, tmp_path):
    stdout = _finished(_train(tmp_path / "dump", tmp_path / "run", *SHORT, *MIRRORED))
    assert "Exported the embedding model" in stdout
    _assert_equals_one_device(_load(tmp_path / "dump_0.npz"), one_device)
    _drift_logged(tmp_path / "run")
    assert (tmp_path / "run" / "retrieval_grid_after.png").is_file()


@pytest.mark.slow
def test_two_workers_equal_each_other_and_one_device(
    one_device, tmp_path, run_processes
):
    args = [tmp_path / "dump", f"--workdir={tmp_path / 'run'}", *SHORT]
    args.append("--strategy=multiworker")
    run_processes(__file__, args, tmp_path, 2, "w", TIMEOUT)
    chief, other = _load(tmp_path / "dump_0.npz"), _load(tmp_path / "dump_1.npz")
    _assert_same_state(other, chief)
    np.testing.assert_array_equal(other["losses"], chief["losses"])
    _assert_equals_one_device(chief, one_device)
    _drift_logged(tmp_path / "run")
    _drift_logged(tmp_path / "workertemp_worker_1" / "run")


@pytest.mark.slow
def test_mirrored_sigkill_mid_epoch_resumes_bit_for_bit(tmp_path):
    _finished(_train(tmp_path / "ref", tmp_path / "ref", *LONG, *MIRRORED))
    workdir = tmp_path / "run"
    killed = _train(tmp_path / "dump", workdir, *LONG, *MIRRORED, kill_after_step=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert sorted(os.listdir(workdir / "backup")) == ["step_000000004"]
    stdout = _finished(_train(tmp_path / "dump", workdir, *LONG, *MIRRORED))
    assert "Resuming from the backup at step 4" in stdout
    _assert_same_state(_load(tmp_path / "dump_0.npz"), _load(tmp_path / "ref_0.npz"))


def _start_workers(args, out: Path, log_prefix: str, hosts, **hooks):
    procs = []
    for index in range(len(hosts)):
        task = {"type": "worker", "index": index}
        config = {"cluster": {"worker": hosts}, "task": task}
        log = open(out / f"{log_prefix}{index}.log", "w")
        command = [sys.executable, __file__, *map(str, args)]
        env = _env(tf_config=json.dumps(config), **hooks)
        procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
        log.close()
    return procs


def _wait(procs, timeout):
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_two_workers_sigkill_one_resume_bit_for_bit(tmp_path, run_processes):
    reference = [tmp_path / "ref", f"--workdir={tmp_path / 'ref'}", *LONG]
    run_processes(
        __file__, [*reference, "--strategy=multiworker"], tmp_path, 2, "ref", TIMEOUT
    )
    with socket.socket() as s0, socket.socket() as s1:
        s0.bind(("127.0.0.1", 0))
        s1.bind(("127.0.0.1", 0))
        hosts = [f"127.0.0.1:{s.getsockname()[1]}" for s in (s0, s1)]
    args = [tmp_path / "dump", f"--workdir={tmp_path / 'run'}", *LONG]
    args.append("--strategy=multiworker")
    chief, other = _start_workers(
        args, tmp_path, "killed", hosts, kill_after_step=5, kill_task=1
    )
    try:
        assert other.wait(timeout=TIMEOUT) == -signal.SIGKILL
        died = time.monotonic()
        # TensorFlow's coordination service declares a task dead after 10 s
        # without heartbeats; 60 s leaves room for a loaded machine.
        returncode = chief.wait(timeout=60)
        survived = time.monotonic() - died
    finally:
        _wait([chief, other], 0)
    log = (tmp_path / "killed0.log").read_text()
    assert returncode != 0, log[-4000:]
    assert f"lost contact with worker 1 ({hosts[1]})" in log, log[-4000:]
    print(f"the survivor exited {survived:.1f} s after its peer died")
    # Both started again with their original commands finish the run.
    procs = _start_workers(args, tmp_path, "resumed", hosts)
    _wait(procs, TIMEOUT)
    for index, p in enumerate(procs):
        text = (tmp_path / f"resumed{index}.log").read_text()
        assert p.returncode == 0, text[-4000:]
        assert "Resuming from the backup at step 4" in text
    for index in range(2):
        got = _load(tmp_path / f"dump_{index}.npz")
        _assert_same_state(got, _load(tmp_path / f"ref_{index}.npz"))


# ------------------------------------------------- fast checks of the pieces

# The error of a collective on worker 0 after worker 1 was killed (TF 2.20).
_PEER_DIED = (
    "Collective ops is aborted by: Error reported from /job:worker/task:1: The "
    "following tasks are unhealthy (stopped sending heartbeats):\n"
    "/job:worker/replica:0/task:1\nThe tasks have crashed."
)


def test_lost_workers_names_the_unhealthy_task_and_its_address():
    from xbm_tf.distribute import lost_workers

    config = json.dumps(
        {
            "cluster": {"worker": ["hostA:1", "hostB:2", "hostC:3"]},
            "task": {"type": "worker", "index": 0},
        }
    )
    error = RuntimeError(_PEER_DIED.replace("task:1\n", "task:2\n"))
    assert lost_workers(error, config) == ["worker 2 (hostC:3)"]
    assert lost_workers(RuntimeError("Connection reset"), config) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cpu_replicas=2"], "--cpu_replicas=2 needs --strategy=mirrored"),
        (
            ["--strategy=multiworker", "--cpu_replicas=2"],
            "needs --strategy=mirrored, not --strategy=multiworker",
        ),
        (["--strategy=mirrored", "--cpu_replicas=0"], "must be positive"),
    ],
)
def test_cpu_replicas_flag_errors(parse, tmp_path, args, message):
    import train

    parse(f"--workdir={tmp_path / 'run'}", *args)
    with pytest.raises(train.FlagError, match=message):
        train.run()
    assert not (tmp_path / "run").exists()


def test_split_cpu_once_devices_exist_names_the_problem():
    import tensorflow as tf

    from xbm_tf.distribute import make_strategy, split_cpu

    tf.constant(1.0) + 1.0  # TensorFlow has set up its devices now
    have = len(tf.config.list_logical_devices("CPU"))
    assert split_cpu(have) == [f"/cpu:{i}" for i in range(have)]
    with pytest.raises(ValueError, match=f"already set up {have}"):
        split_cpu(have + 1)
    with pytest.raises(ValueError, match="only used by the 'mirrored' strategy"):
        make_strategy("default", cpu_replicas=2)


def test_synchronize_batch_norm_reaches_nested_layers():
    import keras

    from xbm_tf.distribute import min_over_workers, synchronize_batch_norm

    inner = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    outer = keras.Sequential([inner, keras.layers.BatchNormalization()])
    assert synchronize_batch_norm(outer) == 2
    assert all(
        layer.synchronized
        for layer in outer._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert synchronize_batch_norm(outer) == 0
    assert min_over_workers(7) == 7  # no cluster: this worker's value


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy=multiworker"], "ablation.py runs its train.py processes on one"),
        (
            ["--strategy=mirrored", "--cpu_replicas=4", "--batch_sizes=8,16"],
            r"\[8\] give P = batch / --k not divisible by the --cpu_replicas=4",
        ),
    ],
)
def test_ablation_strategy_flag_errors(parse, tmp_path, args, message):
    import ablation

    parse(f"--workdir={tmp_path / 'ablation'}", "--batch_sizes=8", *args)
    with pytest.raises(ablation.FlagError, match=message):
        ablation.run()
    assert not (tmp_path / "ablation").exists()


@pytest.mark.slow
def test_ablation_and_evaluate_under_mirrored(parse, tmp_path):
    """ablation.py's train.py runs on 2 replicas; evaluate.py on the export."""
    import ablation
    import evaluate

    workdir = tmp_path / "ablation"
    parse(
        f"--workdir={workdir}",
        "--batch_sizes=8",
        "--seeds=0",
        "--steps=2",
        *MIRRORED,
    )
    rows = ablation.run()
    assert sorted(row["run"] for row in rows) == ["with_b8_m40_s0", "without_b8_s0"]
    log = (workdir / "with_b8_m40_s0" / "train.log").read_text()
    assert "cpu_replicas=2" in (workdir / "with_b8_m40_s0" / "train.flags").read_text()
    assert "Exported the embedding model" in log
    export = workdir / "with_b8_m40_s0" / "export"
    parse(f"--model={export}", f"--output_dir={tmp_path / 'eval'}", *MIRRORED)
    metrics = evaluate.run()  # embeds in this process, on one device
    recorded = json.loads((workdir / "with_b8_m40_s0" / "retrieval.json").read_text())
    assert metrics["recall@1"] == pytest.approx(recorded["after"]["recall@1"])


@pytest.mark.slow
def test_nan_stop_under_both_strategies(tmp_path):
    """A learning rate of 1e30 makes step 2's loss NaN: every process stops."""
    args = ["--steps=3", "--learning_rate=1e30"]
    result = _train(tmp_path / "m", tmp_path / "mirrored", *args, *MIRRORED)
    assert result.returncode == 1, result.stderr[-4000:]
    assert "became nan at training step 2" in result.stderr
    assert not (tmp_path / "mirrored" / "backup").exists()  # nothing saved after
    with socket.socket() as s0, socket.socket() as s1:
        s0.bind(("127.0.0.1", 0))
        s1.bind(("127.0.0.1", 0))
        hosts = [f"127.0.0.1:{s.getsockname()[1]}" for s in (s0, s1)]
    args = [tmp_path / "w", f"--workdir={tmp_path / 'multiworker'}", *args]
    procs = _start_workers([*args, "--strategy=multiworker"], tmp_path, "w", hosts)
    _wait(procs, TIMEOUT)
    for index, p in enumerate(procs):
        text = (tmp_path / f"w{index}.log").read_text()
        assert p.returncode == 1, text[-4000:]
        assert "became nan at training step 2" in text
