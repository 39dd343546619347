r"""Does the memory help? The paper's Fig. 1 as a command.

  python scripts/ablation.py --flagfile configs/ablation.flags
  python scripts/ablation.py --flagfile configs/quickstart.flags \
      --batch_sizes=16,32 --memory_sizes=1024,4096 --seeds=0,1,2 \
      --workdir=runs/ablation

Trains every combination of {without memory, with memory} x --batch_sizes x
--memory_sizes x --seeds, each as an ordinary `scripts/train.py` run (a
subprocess, in its own folder under --workdir) with the flagfile's settings: K
stays the flagfile's --k, P = batch / K, every run takes --steps optimizer steps.
"Without memory" is --xbm_weight=0, one run per batch size and seed.

Each finished run appends a row to --workdir/ablation.csv (condition, P, K,
memory size, seed, every metric of the run's retrieval.json, train seconds and
steps per second from its timing.json). Started again, the ablation skips the runs
already recorded; a killed run resumes from its backup. At the end it writes
ablation.md (mean +- std over seeds per condition, and the memory's gain paired by
seed) and ablation.png (R@1 and MAP@R against batch size; against memory size too
when there are several).
"""

from __future__ import annotations

import csv
import json
import os
import resource

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent import futures  # noqa: E402

import common  # noqa: E402
from absl import app, flags  # noqa: E402
from common import FlagError  # noqa: E402

from xbm_tf import ablation, plots  # noqa: E402

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
CSV_NAME = "ablation.csv"
# Flags set per run, or that belong to the ablation itself: not in the base flags.
_PER_RUN = ("workdir", "p", "seed", "memory_size", "xbm_weight", "overwrite")
_ABLATION_FLAGS = ("batch_sizes", "memory_sizes", "seeds", "jobs", "report_only")
_ROW_KEYS = ("run", "condition", "batch_size", "p", "k", "memory_size", "seed")
_TIME_KEYS = ("train_seconds", "steps_per_second")
# The untrained network's Recall@1 (train.py's "before" evaluation), to mark
# runs that ended below it (a collapse).
_UNTRAINED_KEYS = (ablation.UNTRAINED_RECALL,)


def _ints(holder) -> list[int]:
    try:
        return [int(v) for v in holder.value]
    except ValueError:
        raise FlagError(
            f"--{holder.name} must be integers, got {','.join(holder.value)}"
        ) from None


def plan() -> list[ablation.AblationRun]:
    """The runs the flags ask for; every flag error is raised here, before any run."""
    common.require(common.WORKDIR, common.STEPS, common.BATCH_SIZES)
    common.check_data_flags()
    batch_sizes = _ints(common.BATCH_SIZES)
    if common.MEMORY_SIZES.value:
        memory_sizes = _ints(common.MEMORY_SIZES)
    else:
        common.require(common.MEMORY_SIZE)
        memory_sizes = [common.MEMORY_SIZE.value]
    if common.XBM_WEIGHT.value <= 0:
        raise FlagError(
            f"--xbm_weight={common.XBM_WEIGHT.value}: the runs with memory need a "
            "positive memory loss weight (the runs without use 0)"
        )
    k = common.K.value
    bad = [b for b in batch_sizes if b % k or b // k < 2]
    if bad:
        raise FlagError(
            f"--batch_sizes={','.join(common.BATCH_SIZES.value)}: {bad} not a "
            f"multiple of --k={k} with P = batch / K >= 2 (e.g. "
            f"{','.join(str(k * p) for p in (2, 4, 8, 16))})"
        )
    common.check_strategy_flags()
    if common.STRATEGY.value == "multiworker":
        raise FlagError(
            "--strategy=multiworker: ablation.py runs its train.py processes on one "
            "machine; use --strategy=mirrored (--cpu_replicas=N without GPUs), or "
            "run train.py itself on every worker"
        )
    replicas = common.CPU_REPLICAS.value or 1
    odd = [b for b in batch_sizes if (b // k) % replicas]
    if odd:
        raise FlagError(
            f"--batch_sizes: {odd} give P = batch / --k not divisible by the "
            f"--cpu_replicas={replicas} replicas (each holds whole classes)"
        )
    try:
        return ablation.plan_runs(batch_sizes, memory_sizes, _ints(common.SEEDS), k)
    except ValueError as error:
        raise FlagError(f"--batch_sizes/--memory_sizes/--seeds: {error}") from None


def _flag_lines(skip=()) -> list[str]:
    """The values of the shared (train.py) flags as flagfile lines."""
    holders = [
        value
        for value in vars(common).values()
        if isinstance(value, flags.FlagHolder)
        and value.name not in _ABLATION_FLAGS + tuple(skip)
    ]
    lines = [flags.FLAGS[h.name].serialize() for h in holders]
    return sorted(line for line in lines if line)


def run_flag_lines(run: ablation.AblationRun, workdir: str) -> list[str]:
    """The flagfile of one run: the base flags plus the run's own."""
    weight = common.XBM_WEIGHT.value if run.condition == ablation.WITH_MEMORY else 0
    # Without memory (weight 0) the rows are unused, but train.py needs a size.
    memory = run.memory_size or max(common.MEMORY_SIZE.value or 0, run.batch_size)
    return _flag_lines(skip=_PER_RUN) + [
        f"--workdir={os.path.join(workdir, run.name)}",
        f"--p={run.p}",
        f"--seed={run.seed}",
        f"--memory_size={memory}",
        f"--xbm_weight={weight}",
    ]


def _write_or_check(path: str, lines: list[str], what: str) -> None:
    """Writes `lines` to `path`, or checks that an existing file holds them."""
    text = "\n".join(lines) + "\n"
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != text:
            differ = sorted(set(old.splitlines()) ^ set(lines))
            raise FlagError(
                f"{path} holds {what} with other flags (differing: "
                f"{'; '.join(differ[:6])}): use another --workdir, or delete it"
            )
        return
    with open(path, "w") as f:
        f.write(text)


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: str, row: dict) -> None:
    """Appends `row` to the CSV, writing the header first if the file is new."""
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            header = next(csv.reader(f))
        if list(row) != header:
            raise FlagError(
                f"{path} has columns {header}, but this run reports {list(row)}: "
                "use another --workdir"
            )
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if not exists:
            writer.writeheader()
        writer.writerow(row)


def _finished(run_dir: str) -> bool:
    return all(
        os.path.exists(os.path.join(run_dir, name))
        for name in ("retrieval.json", "timing.json", "export/saved_model.pb")
    )


def result_row(run: ablation.AblationRun, run_dir: str) -> dict:
    """The CSV row of a finished run, from its retrieval.json and timing.json."""
    with open(os.path.join(run_dir, "retrieval.json")) as f:
        results = json.load(f)
    metrics = results["after"]
    with open(os.path.join(run_dir, "timing.json")) as f:
        timing = json.load(f)
    row = dict(
        run=run.name,
        condition=run.condition,
        batch_size=run.batch_size,
        p=run.p,
        k=run.k,
        memory_size=run.memory_size,
        seed=run.seed,
    )
    row.update({key: f"{value:.6f}" for key, value in metrics.items()})
    if "recall@1" in results.get("before", {}):
        row[ablation.UNTRAINED_RECALL] = f"{results['before']['recall@1']:.6f}"
    row.update(
        train_seconds=f"{timing['train_seconds']:.2f}",
        steps_per_second=f"{timing['steps_per_second']:.3f}",
    )
    return row


def train_one(flagfile: str, log_path: str) -> None:
    """One `scripts/train.py` run in a subprocess; its output goes to `log_path`."""
    with open(log_path, "a") as log:
        process = subprocess.run(
            [sys.executable, TRAIN_SCRIPT, f"--flagfile={flagfile}", "--verbose=2"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if process.returncode:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise RuntimeError(
            f"train.py failed (exit {process.returncode}); its log is {log_path}:\n"
            f"{tail}"
        )


def metric_names(rows: list[dict]) -> list[str]:
    skip = _ROW_KEYS + _TIME_KEYS + _UNTRAINED_KEYS
    return [k for k in rows[0] if k not in skip]


def write_report(rows: list[dict], workdir: str, command: str) -> str:
    """Writes ablation.md and ablation.png from the recorded rows."""
    metrics = metric_names(rows)
    shown = [m for m in ("recall@1", "map@r") if m in metrics] or metrics[:1]
    table = ablation.markdown_report(rows, metrics, gain_metrics=shown)
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
        f.write(f"# Memory ablation\n\n`{command}`\n\n")
        f.write(
            f"{common.STEPS.value} optimizer steps per run; mean +- sample std "
            "over seeds.\n\n"
        )
        f.write(table)
    plots.plot_ablation(
        ablation.aggregate(rows, shown),
        os.path.join(workdir, "ablation.png"),
        metrics=tuple(shown),
        title=f"{common.DATASET.value}: memory vs batch, {common.STEPS.value} steps",
    )
    return table


def run() -> list[dict]:
    """Runs the ablation the flags describe; returns the rows of its runs."""
    runs = plan()
    if common.JOBS.value < 1:
        raise FlagError(f"--jobs={common.JOBS.value} must be at least 1")
    splits = common.load_splits()
    largest_p = max(r.p for r in runs)
    if largest_p > splits.num_train_classes:
        raise FlagError(
            f"--batch_sizes: batch {largest_p * common.K.value} needs P={largest_p} "
            f"classes per batch, but the training split has only "
            f"{splits.num_train_classes} classes"
        )
    workdir = common.WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    _write_or_check(
        os.path.join(workdir, "ablation_base.flags"),
        _flag_lines(skip=_PER_RUN),
        "an ablation",
    )
    csv_path = os.path.join(workdir, CSV_NAME)
    done = {row["run"] for row in read_rows(csv_path)}
    todo = [r for r in runs if r.name not in done]
    if len(todo) < len(runs):
        print(f"Skipping {len(runs) - len(todo)} runs already in {csv_path}")
    if common.REPORT_ONLY.value:  # record the finished runs, train nothing
        todo = [r for r in todo if _finished(os.path.join(workdir, r.name))]
    start = time.perf_counter()
    labels = {}
    for i, item in enumerate(todo):
        run_dir = os.path.join(workdir, item.name)
        os.makedirs(run_dir, exist_ok=True)
        _write_or_check(
            os.path.join(run_dir, "train.flags"),
            run_flag_lines(item, workdir),
            "a run",
        )
        labels[item] = (
            f"{item.condition}, batch {item.batch_size} ({item.p} x {item.k})"
            + (f", M={item.memory_size}" if item.memory_size else "")
            + f", seed {item.seed}"
        )

    def launch(item: ablation.AblationRun) -> ablation.AblationRun:
        run_dir = os.path.join(workdir, item.name)
        print(f"started: {labels[item]}", flush=True)
        if not _finished(run_dir):  # else: finished but not yet recorded
            train_one(
                os.path.join(run_dir, "train.flags"),
                os.path.join(run_dir, "train.log"),
            )
        return item

    with futures.ThreadPoolExecutor(max_workers=common.JOBS.value) as pool:
        pending = [pool.submit(launch, item) for item in todo]
        try:
            for i, future in enumerate(futures.as_completed(pending)):
                item = future.result()
                row = result_row(item, os.path.join(workdir, item.name))
                append_row(csv_path, row)
                elapsed = time.perf_counter() - start
                eta = elapsed / (i + 1) * (len(todo) - i - 1)
                scores = ", ".join(
                    f"{m} {float(row[m]):.4f}"
                    for m in ("recall@1", "map@r")
                    if m in row
                )
                print(
                    f"[{i + 1}/{len(todo)}] {labels[item]}: {scores}; "
                    f"{float(row['train_seconds']):.0f} s train, "
                    f"{float(row['steps_per_second']):.1f} steps/s; elapsed "
                    f"{elapsed:.0f} s, about {eta:.0f} s left",
                    flush=True,
                )
        except BaseException:
            for future in pending:  # start no more runs; running ones finish
                future.cancel()
            raise
    planned = {r.name for r in runs}
    rows = [row for row in read_rows(csv_path) if row["run"] in planned]
    command = "python " + " ".join(sys.argv)
    table = write_report(rows, workdir, command)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        f"\n{table}\nWrote {csv_path}, ablation.md and ablation.png in {workdir}\n"
        f"This invocation finished {len(todo)} runs in "
        f"{time.perf_counter() - start:.0f} s wall, "
        f"{children.ru_utime + children.ru_stime:.0f} s CPU (train.py processes)",
        flush=True,
    )
    return rows


def main(argv):
    try:
        common.main(argv, run)
    except RuntimeError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    app.run(main)
