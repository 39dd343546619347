"""train.py --drift_every_steps and --dataset=vehicleid in both scripts."""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import numpy as np
import pytest
from absl import flags
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import evaluate  # noqa: E402
import train  # noqa: E402

from xbm_tf.backbones import build_embedding_model  # noqa: E402

FLAGS = flags.FLAGS


def test_drift_flag_writes_png_and_log_columns(parse, tmp_path, monkeypatch):
    plotted = []
    original = train.plots.plot_feature_drift

    def keep(series, path):
        plotted.append(list(series))
        return original(series, path)

    monkeypatch.setattr(train.plots, "plot_feature_drift", keep)
    workdir = tmp_path / "run"
    # 6 steps, 3 per epoch; probes embedded at steps 0-6.
    parse(f"--workdir={workdir}", "--drift_every_steps=1", "--drift_deltas=1,4")
    train.run()
    assert (workdir / "feature_drift.png").stat().st_size > 1000
    series = plotted[0]
    assert [(s, dt) for s, dt, _ in series if dt == 4] == [(4, 4), (5, 4), (6, 4)]
    assert len([1 for _, dt, _ in series if dt == 1]) == 6
    assert all(v > 0 for _, _, v in series)
    rows = list(csv.DictReader(open(workdir / "log.csv")))
    assert len(rows) == 2
    assert float(rows[0]["drift@1"]) == pytest.approx(
        dict(((s, dt), v) for s, dt, v in series)[(3, 1)]
    )
    assert math.isnan(float(rows[0]["drift@4"]))  # at step 3 there is no step -1
    last = {dt: v for s, dt, v in series if s == 6}
    assert float(rows[1]["drift@1"]) == pytest.approx(last[1])
    assert float(rows[1]["drift@4"]) == pytest.approx(last[4])


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--drift_every_steps=2", "--drift_deltas=4,5"],
            "--drift_deltas=4,5 must be positive multiples of --drift_every_steps=2",
        ),
        (["--drift_every_steps=2", "--drift_deltas=x"], "must be integers"),
        (["--drift_every_steps=-1"], "--drift_every_steps must be >= 0"),
        (
            ["--dataset=vehicleid", "--data_dir=/", "--vehicleid_test_size=all"],
            "--vehicleid_test_size=all is for evaluate.py",
        ),
    ],
)
def test_bad_flags_fail_fast(parse, tmp_path, args, message):
    parse(f"--workdir={tmp_path / 'run'}", *args)
    with pytest.raises(train.FlagError, match=message):
        train.run()
    assert not (tmp_path / "run").exists()


def _vehicleid(root, rng):
    """A VehicleID folder in the real layout: 2 images per vehicle."""
    lists = {
        "train_list.txt": range(1, 5),
        "test_list_800.txt": range(101, 104),
        "test_list_1600.txt": range(101, 106),
        "test_list_2400.txt": range(101, 108),
    }
    (root / "image").mkdir(parents=True)
    (root / "train_test_split").mkdir()
    for filename, vehicles in lists.items():
        lines = []
        for vehicle in vehicles:
            for n in range(2):
                name = f"{vehicle:05d}{n:02d}"
                path = root / "image" / f"{name}.jpg"
                if not path.exists():
                    pixels = rng.integers(0, 256, (30, 34, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(path)
                lines.append(f"{name} {vehicle}\n")
        (root / "train_test_split" / filename).write_text("".join(lines))


def test_evaluate_prints_the_three_vehicleid_sizes(parse, tmp_path, capsys):
    root = tmp_path / "VehicleID"
    _vehicleid(root, np.random.default_rng(0))
    model = build_embedding_model(
        "tiny", embedding_dim=8, input_shape=(28, 28, 1), weights=None
    )
    model.save(tmp_path / "model.keras")
    common = [
        "--dataset=vehicleid",
        f"--data_dir={root}",
        "--recall_ks=1,5",
        f"--model={tmp_path / 'model.keras'}",
    ]
    parse(*common, "--vehicleid_test_size=all", f"--output_dir={tmp_path / 'all'}")
    results = evaluate.run()
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if "small" in line][-1]
    assert header.split() == ["small", "medium", "large"]
    assert "recall@5" in out
    saved = json.load(open(tmp_path / "all" / "retrieval.json"))
    assert list(saved) == ["small", "medium", "large"]
    for size, n_test in (("small", 6), ("medium", 10), ("large", 14)):
        assert set(saved[size]) >= {"recall@1", "recall@5", "map@r"}
        assert (tmp_path / "all" / f"retrieval_grid_test_{size}.png").exists()
        # Each column equals a run on that test list alone.
        parse(*common, f"--vehicleid_test_size={size}", f"--output_dir={tmp_path}/x")
        alone = evaluate.run()
        for key, value in alone.items():
            assert results[size][key] == pytest.approx(value, abs=1e-6), (size, key)
        assert f"vehicleid/test_{size}: {n_test} images" in capsys.readouterr().out
