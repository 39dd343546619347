r"""Cost of one FeatureDrift embedding against the training steps it follows.

  python benchmarks/drift_step_cost.py --flagfile configs/quickstart.flags

In one process, with the flagfile's model, data and drift settings, alternates
`--repeats` times: --drift_every_steps training steps (`train_on_batch` on the
P x K stream: the compiled train step without fit's callbacks), then one
embedding of the drift probe set (what the callback does every
--drift_every_steps steps). Prints the medians [min-max] of both, their ratio
(the drift's share of training time is ratio / (1 + ratio)), and the load
average. The first round (XLA compilation) is left out.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import keras  # noqa: E402
import train  # noqa: E402
from absl import app, flags  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed rounds.")


def _summary(values) -> str:
    return f"{statistics.median(values):.3f} s [{min(values):.3f}-{max(values):.3f}]"


def main(argv):
    del argv
    common.quiet_tensorflow()
    every = common.DRIFT_EVERY.value
    if every < 1:
        raise SystemExit("error: the flagfile must set --drift_every_steps >= 1")
    keras.utils.set_random_seed(common.SEED.value)
    splits = common.load_splits()
    train_data = train.make_train_dataset(splits)
    model = train.build_model()
    drift = train.make_drift(splits, model, workdir=ROOT)
    drift.log_dir = None  # nothing written
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    batches = iter(train_data)
    steps, embeds = [], []
    for round_ in range(_REPEATS.value + 1):
        start = time.perf_counter()
        for _ in range(every):
            images, labels = next(batches)
            model.train_on_batch(images, labels)
        step_time = time.perf_counter() - start
        start = time.perf_counter()
        drift.embed()
        embed_time = time.perf_counter() - start
        if round_:  # round 0 compiles
            steps.append(step_time)
            embeds.append(embed_time)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"{every} training steps: {_summary(steps)}")
    print(f"one probe embedding ({len(drift.embed())} probes): {_summary(embeds)}")
    ratio = statistics.median(embeds) / statistics.median(steps)
    print(f"ratio embedding / {every} steps: {ratio:.3f}")
    print(f"drift share of training time: {ratio / (1 + ratio):.1%}")


if __name__ == "__main__":
    app.run(main)
