"""Strategies for training on several devices or machines with one global memory.

`XBMContrastiveModel` needs nothing from this module to be correct under a
`tf.distribute` strategy: it all-gathers the global batch, so every replica keeps
the same memory. These helpers make the strategy, check that a training dataset
fits it (a static global batch, divisible by the replicas) and give every worker
of a multi-worker job its own path for the files that all workers must write.
"""

from __future__ import annotations

import json
import os
import re

import keras
import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multiworker")


def split_cpu(num_devices: int) -> list[str]:
    """Splits this machine's CPU into `num_devices` logical devices.

    Lets `MirroredStrategy` run `num_devices` replicas on a machine without GPUs,
    e.g. to check a multi-replica run on a laptop. Call it before TensorFlow runs
    any op (TensorFlow fixes its devices then); calling it again with the same
    number is allowed.

    Args:
        num_devices: the number of logical CPU devices (>= 1).

    Returns:
        Their names, `["/cpu:0", ..., f"/cpu:{num_devices - 1}"]`.
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, int):
        raise ValueError(f"num_devices must be an integer, got {num_devices!r}")
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * num_devices
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:  # TensorFlow has initialised its devices already
        have = len(tf.config.list_logical_devices("CPU"))
        if have != num_devices:
            raise ValueError(
                f"Cannot split the CPU into {num_devices} devices: TensorFlow has "
                f"already set up {have}. Split it first thing in the program, "
                "before any TensorFlow op runs."
            ) from None
    return [f"/cpu:{i}" for i in range(num_devices)]


def make_strategy(
    name: str = "default",
    devices: list[str] | None = None,
    cpu_replicas: int | None = None,
):
    """Returns the `tf.distribute` strategy called `name`.

    Create the model (and compile it) under `strategy.scope()`; `fit` then runs
    each step on every replica. A dataset batched to B rows is the global batch:
    each of the R replicas gets B / R rows.

    Args:
        name: `"default"` (no distribution: one device), `"mirrored"` (all the
            GPUs of this machine, or `devices`) or `"multiworker"` (every worker
            of the cluster described by the `TF_CONFIG` environment variable; make
            it first thing in the program, on every worker, before any other
            TensorFlow call).
        devices: for `"mirrored"` only, the devices to use (e.g.
            `["/gpu:0", "/gpu:1"]`); default: all GPUs, else the CPU.
        cpu_replicas: for `"mirrored"` only, instead of `devices`: split the CPU
            into this many logical devices (`split_cpu`) and mirror over them,
            so that a machine without GPUs runs that many replicas. Make the
            strategy before any TensorFlow op runs.

    Returns:
        A `tf.distribute.Strategy`.

    Example:
    ```python
    strategy = make_strategy("mirrored")
    with strategy.scope():
        model = XBMContrastiveModel(backbone, memory_size=8192)
        model.compile(optimizer="adam")
    model.fit(train_ds, epochs=10, steps_per_epoch=500)
    ```
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}: expected one of {STRATEGIES}")
    if devices is not None and name != "mirrored":
        raise ValueError(
            f"devices is only used by the 'mirrored' strategy, not {name!r}"
        )
    if cpu_replicas is not None:
        if name != "mirrored":
            raise ValueError(
                f"cpu_replicas is only used by the 'mirrored' strategy, not {name!r}"
            )
        if devices is not None:
            raise ValueError("give devices or cpu_replicas, not both")
        devices = split_cpu(cpu_replicas)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    # Checked first: with a bad cluster, the strategy would wait for ever.
    parse_tf_config()
    return _MultiWorkerMirroredStrategy()


def parse_tf_config(value: str | None = None) -> dict:
    """Parses and checks a multi-worker `TF_CONFIG`.

    `TF_CONFIG` is JSON with the cluster (the same on every worker) and this
    worker's task, e.g. on the second of two machines:
    `{"cluster": {"worker": ["host1:12345", "host2:12345"]},
    "task": {"type": "worker", "index": 1}}`. A `"chief"` list of one address may
    be added; worker 0 is the chief otherwise.

    Args:
        value: the JSON text; default: the `TF_CONFIG` environment variable.

    Returns:
        The parsed dict.
    """
    if value is None:
        value = os.environ.get("TF_CONFIG")
        if not value:
            raise ValueError(
                "The multiworker strategy needs the TF_CONFIG environment variable, "
                'e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", '
                '"host2:12345"]}, "task": {"type": "worker", "index": 0}}\''
            )
    try:
        config = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {value!r}") from None
    if not isinstance(config, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object, got {value!r}")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster.get("worker"):
        raise ValueError(
            'TF_CONFIG needs "cluster": {"worker": ["host:port", ...]}, got '
            f"cluster={cluster!r}"
        )
    for job, addresses in cluster.items():
        if job not in ("chief", "worker"):
            raise ValueError(
                f"TF_CONFIG cluster job {job!r} is not used by the multiworker "
                "strategy: only 'chief' and 'worker'"
            )
        if not isinstance(addresses, list) or not all(
            isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses
        ):
            raise ValueError(
                f"TF_CONFIG cluster[{job!r}] must be a list of 'host:port' strings, "
                f"got {addresses!r}"
            )
    if len(cluster.get("chief", [])) > 1:
        raise ValueError(f"TF_CONFIG has {len(cluster['chief'])} chiefs: at most one")
    if not isinstance(task, dict):
        raise ValueError(
            'TF_CONFIG needs "task": {"type": "worker", "index": i}, got '
            f"task={task!r}"
        )
    task_type, index = task.get("type"), task.get("index")
    if task_type not in cluster:
        raise ValueError(
            f"TF_CONFIG task type {task_type!r} is not a job of the cluster "
            f"{sorted(cluster)}"
        )
    if not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise ValueError(
            f"TF_CONFIG task index {index!r} is out of range for the "
            f"{len(cluster[task_type])} {task_type!r} address(es)"
        )
    return config


def replica_batch_size(dataset: tf.data.Dataset, strategy=None) -> int:
    """Checks that a training dataset of global batches fits the strategy.

    The memory needs a static batch size: batch with `drop_remainder=True` into a
    global batch divisible by the number of replicas. Under the multiworker
    strategy the dataset must also repeat for ever (`dataset.repeat()`, then
    `fit(steps_per_epoch=...)`): `tf.distribute` otherwise makes the batch size
    dynamic to allow a partial last batch, and workers could run out of data at
    different steps.

    Args:
        dataset: batches of `(inputs, labels)` (or with sample weights).
        strategy: default: the current strategy.

    Returns:
        The per-replica batch size.
    """
    strategy = strategy or tf.distribute.get_strategy()
    spec = tf.nest.flatten(dataset.element_spec)[0]
    global_batch = spec.shape[0] if spec.shape.rank else None
    if global_batch is None:
        raise ValueError(
            f"The training batches have no static size (element shape {spec.shape}):"
            " batch the dataset with drop_remainder=True"
        )
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise ValueError(
            f"The global batch size {global_batch} is not divisible by the "
            f"{replicas} replicas in sync: use a multiple of {replicas}"
        )
    multiworker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    if multiworker and dataset.cardinality() != tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "Under the multiworker strategy the training dataset must repeat for "
            "ever: use dataset.repeat() and fit(steps_per_epoch=...)"
        )
    return global_batch // replicas


def is_chief(strategy=None) -> bool:
    """Whether this worker is the chief (True without a multi-worker cluster)."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def worker_path(path: str, strategy=None) -> str:
    """`path` on the chief; `<parent>/workertemp_<task>/<name>` on other workers.

    Under the multiworker strategy every worker must take part in saving (reading
    the metrics' variables is a collective), so give `BackupAndRestore`,
    `ModelCheckpoint` or `model.save` this path: workers sharing a file system
    then do not overwrite each other's files. The chief's copy is the one to keep
    (the others may be deleted); each worker restores its own `BackupAndRestore`
    backup. The returned path's parent directory may not exist yet.

    Args:
        path: the file or directory the chief writes.
        strategy: default: the current strategy.

    Returns:
        The path this worker writes.

    Example:
    >>> import keras
    >>> backup = worker_path("runs/x/backup")  # the chief's path: unchanged
    >>> backup
    'runs/x/backup'
    >>> callbacks = [keras.callbacks.BackupAndRestore(backup)]
    """
    strategy = strategy or tf.distribute.get_strategy()
    if is_chief(strategy):
        return path
    resolver = strategy.cluster_resolver
    parent, name = os.path.split(os.path.normpath(path))
    worker = f"workertemp_{resolver.task_type}_{resolver.task_id}"
    return os.path.join(parent, worker, name)


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` whose `reduce` accepts what Keras 3 passes.

    Keras 3 (up to 3.15 at least) reduces a nested batch (in `fit`'s symbolic
    build) and scalar logs with `axis=0`; the multi-worker `reduce` rejects both,
    so `fit` fails (keras-team/keras#20585). Here nests are reduced leaf by leaf
    and a scalar is reduced across replicas only.
    """

    def reduce(self, reduce_op, value, axis):
        reduce = super().reduce

        def reduce_one(tensor):
            rank = self.experimental_local_results(tensor)[0].shape.rank
            return reduce(reduce_op, tensor, None if rank == 0 else axis)

        return tf.nest.map_structure(reduce_one, value)


def is_multiworker(strategy=None) -> bool:
    """Whether `strategy` (default: the current one) spans several processes."""
    strategy = strategy or tf.distribute.get_strategy()
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def min_over_workers(value: int, strategy=None) -> int:
    """The smallest of every worker's integer `value`.

    A collective under the multiworker strategy (every worker must call it, with
    the same strategy); `value` itself otherwise.

    Args:
        value: this worker's value.
        strategy: default: the current strategy.

    Returns:
        The minimum over the workers.
    """
    strategy = strategy or tf.distribute.get_strategy()
    if not is_multiworker(strategy):
        return int(value)
    local = tf.constant([value], tf.int64)

    @tf.function
    def gather():
        def replica_fn():
            context = tf.distribute.get_replica_context()
            return context.all_gather(local, axis=0)

        return strategy.run(replica_fn)

    gathered = strategy.experimental_local_results(gather())[0]
    return int(tf.reduce_min(gathered).numpy())


def synchronize_batch_norm(model) -> int:
    """Makes every `BatchNormalization` layer of `model` use global statistics.

    A `BatchNormalization` layer in training mode normalises with the mean and
    variance of its replica's rows only; under a strategy with several replicas
    the forward pass (and the moving statistics) then differ from one device
    trained on the same global batch. With `synchronized=True` (TensorFlow
    backend) the layer all-reduces the sums over every replica's rows, so each
    replica normalises with the global batch's statistics. Call it on the
    embedding network before training under such a strategy.

    Args:
        model: a Keras model (nested models are searched).

    Returns:
        The number of layers changed.
    """
    changed = 0
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            if not layer.synchronized:
                layer.synchronized = True
                changed += 1
    return changed


_TASK = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")


def lost_workers(error: BaseException, tf_config: str | None = None) -> list[str]:
    """Names the workers a multi-worker collective error blames, with addresses.

    When a worker dies, TensorFlow's coordination service stops hearing its
    heartbeats (after 10 s, its default timeout) and aborts the collectives of
    the others with an error listing the unhealthy tasks, e.g.
    `/job:worker/replica:0/task:1`.

    Args:
        error: the exception raised by `fit` (or any collective).
        tf_config: the cluster's `TF_CONFIG` JSON; default: the environment's.

    Returns:
        E.g. `["worker 1 (host2:12345)"]`; empty if the error names no task.
    """
    text = str(error)
    unhealthy = text.find("unhealthy")
    if unhealthy >= 0:  # the tasks listed after it, not the reporter before it
        text = text[unhealthy:]
    cluster = {}
    try:
        cluster = parse_tf_config(tf_config)["cluster"]
    except ValueError:
        pass
    names = []
    for job, index in dict.fromkeys(_TASK.findall(text)):
        addresses = cluster.get(job, [])
        where = f" ({addresses[int(index)]})" if int(index) < len(addresses) else ""
        names.append(f"{job} {index}{where}")
    return names
