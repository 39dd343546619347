"""Tests for xbm_tf.ablation (run grid, aggregation, gains, report) and its plot."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from matplotlib.image import imread

from xbm_tf.ablation import (
    UNTRAINED_RECALL,
    WITH_MEMORY,
    WITHOUT_MEMORY,
    aggregate,
    collapsed_runs,
    markdown_report,
    memory_gains,
    plan_runs,
)
from xbm_tf.plots import plot_ablation


def _row(condition, batch, memory, seed, r1, mapr, k=4):
    return {
        "condition": condition,
        "p": str(batch // k),  # strings, as csv.DictReader gives them
        "k": str(k),
        "memory_size": str(memory),
        "seed": str(seed),
        "recall@1": str(r1),
        "map@r": str(mapr),
    }


ROWS = [
    _row(WITHOUT_MEMORY, 16, 0, 0, 0.90, 0.40),
    _row(WITHOUT_MEMORY, 16, 0, 1, 0.92, 0.44),
    _row(WITHOUT_MEMORY, 16, 0, 2, 0.91, 0.45),
    _row(WITH_MEMORY, 16, 256, 0, 0.95, 0.50),
    _row(WITH_MEMORY, 16, 256, 1, 0.94, 0.52),
    _row(WITH_MEMORY, 16, 256, 2, 0.96, 0.51),
    _row(WITHOUT_MEMORY, 32, 0, 0, 0.93, 0.47),
    _row(WITH_MEMORY, 32, 256, 0, 0.92, 0.49),
]


def test_plan_runs_grid_and_order():
    runs = plan_runs([16, 32], [64, 128], [0, 1], k=4)
    # Per seed and batch: one run without memory, one per memory size.
    assert len(runs) == 2 * 2 * (1 + 2)
    assert [r.name for r in runs[:6]] == [
        "without_b16_s0",
        "with_b16_m64_s0",
        "with_b16_m128_s0",
        "without_b32_s0",
        "with_b32_m64_s0",
        "with_b32_m128_s0",
    ]
    assert runs[3].p == 8 and runs[3].k == 4 and runs[3].memory_size == 0
    assert len({r.name for r in runs}) == len(runs)
    assert {r.seed for r in runs[6:]} == {1}


@pytest.mark.parametrize(
    "batch_sizes, memory_sizes, seeds, match",
    [
        ([16, 18], [64], [0], r"\[18\] are not multiples of K=4"),
        ([4], [64], [0], r"\[4\] are not multiples"),  # P = 1
        ([16], [8], [0], "smaller than the largest batch"),
        ([16, 16], [64], [0], "duplicates"),
        ([], [64], [0], "batch_sizes is empty"),
        ([16], [64], [0.5], "seeds must be integers"),
    ],
)
def test_plan_runs_errors(batch_sizes, memory_sizes, seeds, match):
    with pytest.raises(ValueError, match=match):
        plan_runs(batch_sizes, memory_sizes, seeds, k=4)


def test_aggregate_matches_a_slow_loop():
    summary = aggregate(ROWS, ["recall@1", "map@r"])
    assert [(s["condition"], s["batch_size"], s["seeds"]) for s in summary] == [
        (WITHOUT_MEMORY, 16, 3),
        (WITH_MEMORY, 16, 3),
        (WITHOUT_MEMORY, 32, 1),
        (WITH_MEMORY, 32, 1),
    ]
    for entry in summary:
        for metric in ("recall@1", "map@r"):
            values = [
                float(r[metric])
                for r in ROWS
                if r["condition"] == entry["condition"]
                and int(r["p"]) * int(r["k"]) == entry["batch_size"]
            ]
            assert entry[f"{metric}_mean"] == pytest.approx(statistics.mean(values))
            if len(values) > 1:
                expected = statistics.stdev(values)  # sample std
                assert entry[f"{metric}_std"] == pytest.approx(expected)
            else:
                assert math.isnan(entry[f"{metric}_std"])
    # Closed form: R@1 with memory at 16 is 0.94, 0.95, 0.96: mean .95, std .01.
    assert summary[1]["recall@1_mean"] == pytest.approx(0.95)
    assert summary[1]["recall@1_std"] == pytest.approx(0.01)


def test_memory_gains_pairs_by_seed():
    gains = memory_gains(ROWS, ["recall@1", "map@r"])
    assert [(g["batch_size"], g["memory_size"], g["seeds"]) for g in gains] == [
        (16, 256, 3),
        (32, 256, 1),
    ]
    at16 = gains[0]
    diffs = [0.05, 0.02, 0.05]  # R@1 with - without, seeds 0, 1, 2
    assert at16["recall@1_gain"] == pytest.approx(np.mean(diffs))
    assert at16["recall@1_gain_std"] == pytest.approx(statistics.stdev(diffs))
    assert at16["recall@1_wins"] == 3
    # 0.04 > 2 x max(0.01, 0.01): clear.
    assert at16["recall@1_clear"] is True
    # MAP@R: gains 0.10, 0.08, 0.06 but without-memory std 0.0265: 0.08 > 0.053.
    assert at16["map@r_gain"] == pytest.approx(0.08)
    assert at16["map@r_clear"] is True
    # Batch 32: one seed, and the memory lost in R@1.
    assert gains[1]["recall@1_wins"] == 0
    assert gains[1]["recall@1_gain"] == pytest.approx(-0.01)
    assert gains[1]["recall@1_clear"] is False


def test_memory_gains_not_clear_when_the_gap_is_within_the_noise():
    rows = [
        _row(WITHOUT_MEMORY, 16, 0, s, r, 0.5) for s, r in enumerate([0.90, 0.92])
    ] + [_row(WITH_MEMORY, 16, 64, s, r, 0.5) for s, r in enumerate([0.92, 0.95])]
    (gain,) = memory_gains(rows, ["recall@1"])
    assert gain["recall@1_wins"] == 2
    assert gain["recall@1_gain"] == pytest.approx(0.025)
    # Stds 0.0141 (without) and 0.0212 (with): 0.0212 < 0.025 < 2 x 0.0212.
    assert gain["recall@1_clear"] is False


def test_markdown_report_rows():
    rows = [dict(r, train_seconds="10", steps_per_second="5.0") for r in ROWS]
    text = markdown_report(rows, ["recall@1", "map@r"], gain_metrics=["recall@1"])
    lines = text.splitlines()
    assert lines[0] == (
        "| batch (P x K) | memory | M | seeds | recall@1 | map@r | train s | steps/s |"
    )
    assert lines[2] == (
        "| 16 (4 x 4) | without memory | - | 3 | 0.9100 +- 0.0100 | "
        "0.4300 +- 0.0265 | 10 | 5.0 |"
    )
    assert lines[3].startswith(
        "| 16 (4 x 4) | with memory | 256 | 3 | 0.9500 +- 0.0100"
    )
    assert lines[4] == (
        "| 32 (8 x 4) | without memory | - | 1 | 0.9300 | 0.4700 | 10 | 5.0 |"
    )
    assert "| 16 | 256 | 3 | 0.0400 +- 0.0173 | 3/3 | yes |" in lines
    assert "| 32 | 256 | 1 | -0.0100 | 0/1 | no |" in lines


def test_runs_below_the_untrained_network_are_marked_collapsed():
    rows = [
        dict(r, run=f"run{i}", **{UNTRAINED_RECALL: "0.5"}) for i, r in enumerate(ROWS)
    ]
    rows[4]["recall@1"] = "0.28"  # with memory, batch 16, seed 1
    rows[6][UNTRAINED_RECALL] = "0.93"  # equal to the untrained: not below
    assert [r["run"] for r in collapsed_runs(rows)] == ["run4"]
    lines = markdown_report(rows, ["recall@1"]).splitlines()
    assert lines[0].endswith("| recall@1 | collapsed |")
    assert lines[2].endswith("| 0/3 |") and lines[3].endswith("| **1**/3 |")
    assert (
        "**Collapsed** (final R@1 below the untrained network's): "
        "run4 (0.2800 < 0.5000)"
    ) in lines
    # Rows without the untrained value: no column, no list.
    assert "collapsed" not in markdown_report(ROWS, ["recall@1"]).lower()


def test_plot_ablation_panels(tmp_path):
    metrics = ["recall@1", "map@r"]
    one = plot_ablation(aggregate(ROWS, metrics), tmp_path / "one.png", dpi=50)
    assert imread(one).shape[:2] == (170, 420)  # 1 x 2 panels of 4.2 x 3.4 in
    rows = ROWS + [_row(WITH_MEMORY, 16, 1024, s, 0.97, 0.55) for s in range(3)]
    two = plot_ablation(aggregate(rows, metrics), tmp_path / "two.png", dpi=50)
    image = imread(two)
    assert image.shape[:2] == (340, 420)  # a second row: against memory size
    # Drawn: both default line colours (without = C0, with = C1) appear.
    rgb = np.round(image[..., :3] * 255).astype(int)
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert np.all(np.abs(rgb - colour) <= 2, axis=-1).sum() > 50
    with pytest.raises(ValueError, match="lack"):
        plot_ablation(aggregate(ROWS, ["recall@1"]), tmp_path / "x.png")
