r"""Wall time of the quickstart with and without the feature-drift callback.

  python benchmarks/drift_overhead.py --repeats=2

Runs `scripts/train.py --flagfile configs/quickstart.flags` alternately with
--drift_every_steps=0 and with the flagfile's drift settings (interleaved, so
both see the same machine load), each in a fresh process and a fresh workdir
under --workdir, and prints the wall times: median [min-max] per condition, the
ratio of the medians, the load average before and after, and the drift@dt the
last run with drift wrote into log.csv.
"""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs per condition.")
_FLAGFILE = flags.DEFINE_string(
    "flagfile_to_time", "configs/quickstart.flags", "The flagfile to run."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the runs write (default: a temporary folder)."
)
_CONDITIONS = flags.DEFINE_list(
    "conditions", ["without", "with"], "Conditions to run, in this order."
)
_EXTRA = flags.DEFINE_list("extra", [], "Extra train.py flags for both conditions.")


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _run(workdir: str, drift: bool) -> float:
    command = [
        sys.executable,
        os.path.join(ROOT, "scripts", "train.py"),
        f"--flagfile={_FLAGFILE.value}",
        f"--workdir={workdir}",
        "--verbose=0",
        *_EXTRA.value,
    ]
    if not drift:
        command.append("--drift_every_steps=0")
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv):
    del argv
    base = _WORKDIR.value or tempfile.mkdtemp(prefix="drift_overhead_")
    if os.path.exists(base) and os.listdir(base):
        raise SystemExit(f"error: --workdir={base} is not empty")
    print(f"load average before: {_load()}", flush=True)
    times = {f"{c} drift": [] for c in _CONDITIONS.value}
    for repeat in range(_REPEATS.value):
        for name in times:
            drift = name == "with drift"
            workdir = os.path.join(base, f"{name.replace(' ', '_')}_{repeat}")
            seconds = _run(workdir, drift)
            times[name].append(seconds)
            print(f"run {repeat} {name}: {seconds:.1f} s", flush=True)
    print(f"load average after: {_load()}")
    medians = {}
    for name, values in times.items():
        medians[name] = statistics.median(values)
        print(
            f"{name:>14}: median {medians[name]:.1f} s "
            f"[{min(values):.1f}-{max(values):.1f}] over {len(values)} runs"
        )
    if len(medians) < 2:
        return
    ratio = medians["with drift"] / medians["without drift"]
    print(f"ratio with / without: {ratio:.3f}")
    log = os.path.join(base, f"with_drift_{_REPEATS.value - 1}", "log.csv")
    for row in csv.DictReader(open(log)):
        drift = {k: v for k, v in row.items() if k.startswith("drift@")}
        print(f"epoch {row['epoch']}: {drift}")


if __name__ == "__main__":
    app.run(main)
