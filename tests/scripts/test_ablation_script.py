"""scripts/ablation.py end to end on configs/smoke.flags: 2 runs x 1 seed."""

from __future__ import annotations

import csv
import json
import os
import sys

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import ablation  # noqa: E402
from common import FlagError  # noqa: E402

FLAGS = flags.FLAGS


@pytest.fixture
def launches(monkeypatch):
    """Counts the train.py runs the ablation starts (and still starts them)."""
    started = []
    real = ablation.train_one

    def counting(flagfile, log_path):
        started.append(flagfile)
        real(flagfile, log_path)

    monkeypatch.setattr(ablation, "train_one", counting)
    return started


def _rows(workdir):
    with open(workdir / "ablation.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_runs_write_all_files_and_a_restart_skips_them(
    parse, launches, tmp_path, capsys
):
    workdir = tmp_path / "ablation"
    # Two runs at a time: rows are appended as runs finish, in either order.
    parse(f"--workdir={workdir}", "--batch_sizes=8", "--seeds=3", "--jobs=2")
    rows = ablation.run()
    assert len(launches) == 2  # without and with memory, one seed
    rows = sorted(rows, key=lambda r: r["run"], reverse=True)
    assert [r["run"] for r in rows] == ["without_b8_s3", "with_b8_m40_s3"]
    without, with_memory = rows
    assert without["condition"] == "without memory" and without["memory_size"] == "0"
    assert with_memory["condition"] == "with memory"
    assert with_memory["memory_size"] == "40"  # smoke.flags' --memory_size
    for row in rows:
        assert (row["p"], row["k"], row["batch_size"], row["seed"]) == (
            "2",
            "4",
            "8",
            "3",
        )
        assert float(row["train_seconds"]) > 0
        assert float(row["steps_per_second"]) > 0
        # Every metric of the run's retrieval.json, recorded as it is.
        saved = json.load(open(workdir / row["run"] / "retrieval.json"))["after"]
        assert set(saved) <= set(row)
        for key, value in saved.items():
            assert float(row[key]) == pytest.approx(value, abs=1e-6)
        # The untrained network's R@1 (the "before" evaluation), for ablation.md.
        before = json.load(open(workdir / row["run"] / "retrieval.json"))["before"]
        untrained = float(row["untrained_recall@1"])
        assert untrained == pytest.approx(before["recall@1"], abs=1e-6)
        timing = json.load(open(workdir / row["run"] / "timing.json"))
        assert timing["steps"] == 6  # the same number of steps in each condition
    # Without memory is --xbm_weight=0; with memory keeps the flagfile's weight.
    run_flags = {
        r["run"]: open(workdir / r["run"] / "train.flags").read() for r in rows
    }
    assert "--xbm_weight=0\n" in run_flags["without_b8_s3"]
    assert "--xbm_weight=1.0\n" in run_flags["with_b8_m40_s3"]
    assert "--p=2\n" in run_flags["with_b8_m40_s3"]
    assert "--seed=3\n" in run_flags["with_b8_m40_s3"]

    md = (workdir / "ablation.md").read_text()
    assert "| 8 (2 x 4) | without memory | - | 1 |" in md
    assert "| 8 (2 x 4) | with memory | 40 | 1 |" in md
    assert "| 8 | 40 | 1 |" in md  # the gain table
    assert "| steps/s | collapsed |" in md
    assert (workdir / "ablation.png").stat().st_size > 5000
    capsys.readouterr()

    # Started again: nothing to train, the same rows.
    rows_before = _rows(workdir)
    parse(f"--workdir={workdir}", "--batch_sizes=8", "--seeds=3")
    ablation.run()
    assert len(launches) == 2
    assert _rows(workdir) == rows_before
    assert "Skipping 2 runs already in" in capsys.readouterr().out

    # A run that finished but was not recorded (killed in between) is recorded
    # from its folder, not trained again.
    with open(workdir / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_before[0]))
        writer.writeheader()
        writer.writerow(rows_before[0])
    parse(f"--workdir={workdir}", "--batch_sizes=8", "--seeds=3")
    ablation.run()
    assert len(launches) == 2
    assert _rows(workdir) == rows_before
    assert "Skipping 1 runs already in" in capsys.readouterr().out

    # --report_only trains nothing and reports the recorded runs of the plan.
    parse(f"--workdir={workdir}", "--batch_sizes=8", "--seeds=3,4", "--report_only")
    assert ablation.run() == rows_before
    assert len(launches) == 2
    assert not (workdir / "without_b8_s4").exists()

    # Other base flags in the same workdir: refused before any run.
    parse(f"--workdir={workdir}", "--batch_sizes=8", "--seeds=3", "--steps=7")
    with pytest.raises(FlagError, match="ablation_base.flags holds an ablation"):
        ablation.run()
    assert len(launches) == 2


@pytest.mark.parametrize(
    "args, match",
    [
        (["--batch_sizes=8,10"], r"--batch_sizes=8,10: \[10\] not a multiple of --k=4"),
        (["--batch_sizes=4"], r"\[4\] not a multiple of --k=4 with P = batch / K >= 2"),
        (["--batch_sizes=8,x"], "--batch_sizes must be integers"),
        (
            ["--batch_sizes=48", "--memory_sizes=64"],
            "needs P=12 classes per batch, but the training split",
        ),
        (["--batch_sizes=8", "--memory_sizes=4"], "smaller than the largest batch"),
        (["--batch_sizes=8", "--xbm_weight=0"], "--xbm_weight=0.0"),
        ([], r"missing required flag\(s\): --batch_sizes"),
        (["--batch_sizes=8", "--jobs=0"], "--jobs=0 must be at least 1"),
    ],
)
def test_bad_flags_fail_before_any_run(parse, launches, tmp_path, args, match):
    workdir = tmp_path / "ablation"
    parse(f"--workdir={workdir}", *args)
    with pytest.raises(FlagError, match=match):
        ablation.run()
    assert launches == []
    assert not workdir.exists()
