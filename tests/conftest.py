"""Shared test setup: CPU only, quiet TensorFlow, deterministic seeds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import xbm_tf.losses.matmul_dtype as matmul_dtype_module  # noqa: E402
from xbm_tf.losses import contrastive_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield


@pytest.fixture(autouse=True)
def _cpu_flags(monkeypatch):
    """XBM_TEST_CPU_FLAGS="avx2 fma" (say) runs the tests as on a CPU with just
    those flags: the losses then pick the half-precision matmul such a CPU gets
    (`xbm_tf.losses.matmul_dtype`). Unset, the real CPU decides."""
    flags = os.environ.get("XBM_TEST_CPU_FLAGS")
    if flags is not None:
        fake = frozenset(flags.split())
        monkeypatch.setattr(matmul_dtype_module, "cpu_flags", lambda: fake)
    yield


def _free_ports(count):
    """`count` TCP ports free on 127.0.0.1 now."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    found = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return found


@pytest.fixture
def run_processes():
    """A function that runs `count` Python processes of one script and waits.

    `run_processes(script, args, out, count, log_prefix, timeout, cluster=True)`
    starts `python script *args` `count` times with the repository on
    PYTHONPATH, process i logging to `out/<log_prefix><i>.log`; with `cluster`,
    each gets a TF_CONFIG naming it worker i of a cluster on free local ports.
    It stops waiting as soon as one process fails (a dead worker leaves the
    others blocked in a collective) or `timeout` seconds pass, kills what still
    runs, and fails the test with the log tail of the first process that did not
    exit with 0.
    """

    def run(script, args, out, count, log_prefix, timeout, cluster=True):
        hosts = [f"127.0.0.1:{port}" for port in _free_ports(count)]
        path = os.pathsep.join([str(REPO)] + sys.path)
        procs, logs = [], []
        try:
            for index in range(count):
                env = dict(os.environ, PYTHONPATH=path)
                if cluster:
                    task = {"type": "worker", "index": index}
                    env["TF_CONFIG"] = json.dumps(
                        {"cluster": {"worker": hosts}, "task": task}
                    )
                log = open(out / f"{log_prefix}{index}.log", "w")
                logs.append(log)
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(script), *map(str, args)],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs):
                failed = [p for p in procs if p.poll() not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        for index, p in enumerate(procs):
            if p.returncode != 0:
                text = (out / f"{log_prefix}{index}.log").read_text()[-4000:]
                pytest.fail(f"process {index} exited with {p.returncode}:\n{text}")

    return run


@keras.saving.register_keras_serializable(
    package="xbm_tf_tests", name="scaled_contrastive"
)
def _scaled_contrastive(
    query_embeddings,
    query_labels,
    key_embeddings,
    key_labels,
    key_mask=None,
    query_key_index=None,
    scale: float = 1.0,
):
    return scale * contrastive_loss(
        query_embeddings,
        query_labels,
        key_embeddings,
        key_labels,
        key_mask=key_mask,
        query_key_index=query_key_index,
    )


@pytest.fixture
def scaled_contrastive():
    """A custom pair-loss function registered with Keras (`scale` times the
    contrastive loss), for the tests that save and load custom losses."""
    return _scaled_contrastive


# float32's unit roundoff: one rounding moves a value by at most this fraction.
FLOAT32_UNIT = 2.0**-24


def _float32_gap(
    sum_length: int,
    lr: float = 0.0,
    steps: int = 0,
    momentum: float = 0.0,
    grad: float = 1.0,
) -> float:
    """How far two float32 computations of one value may drift apart when they
    run different kernels (batch shapes, devices, XLA or not, replicas), which
    add up the same terms in another order.

    A sum of n float32 terms is within n * u of the exact sum, relative to the
    sum of the absolute terms, in whatever order it is added (Higham's gamma_n
    bound, u = 2**-24); two orders are thus within 2 n u of each other. Through
    a network the relative errors of the sums on the way add up (to first
    order), so `sum_length` is the total length of those sums: the fan-ins of
    the layers, an L2 norm's width, a loss's sums over keys and batch rows and,
    for training, the backward products and the gradients' sums over rows.

    Training carries a gradient's error into the weights. Each step moves a
    weight by at most `lr * grad / (1 - momentum)` over the rest of the run
    (momentum replays an update with weights beta, beta**2, ...), where `grad`
    bounds a gradient entry; after `steps` steps a weight is off by at most
    2 n u times that path length, on top of the 2 n u of the last pass. To
    first order in u, with lr * |Hessian| < 1 (no growth of earlier errors).

    Returns:
        The bound, relative to values of order 1 (use it as atol and rtol).
    """
    path = lr * steps * grad / (1.0 - momentum)
    return 2.0 * sum_length * FLOAT32_UNIT * (1.0 + path)


@pytest.fixture
def float32_gap():
    """`float32_gap(sum_length, lr=0, steps=0, momentum=0, grad=1)`: the bound
    on the gap between two float32 computations of one value on different
    kernels (see `_float32_gap` for the derivation)."""
    return _float32_gap
