"""scripts/common.py: --eval_backend takes engine names; approximate tables say so."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import common  # noqa: E402

from xbm_tf import data  # noqa: E402

FLAGS = flags.FLAGS


def test_eval_backend_flag_takes_the_engine_names():
    try:
        for name in ("exact_rank", "exact", "scann", "scann_ah"):
            FLAGS.unparse_flags()
            FLAGS(["script", f"--eval_backend={name}"])
            assert common.EVAL_BACKEND.value == name
        FLAGS.unparse_flags()
        FLAGS(["script"])
        assert common.EVAL_BACKEND.value == "exact_rank"
        with pytest.raises(flags.IllegalFlagValueError, match="exact_rank"):
            FLAGS(["script", "--eval_backend=faiss"])
    finally:
        FLAGS.unparse_flags()


def test_write_table_labels_approximate_results(tmp_path, monkeypatch):
    titles = []
    plot = common.plots.plot_recall_curve

    def recording_plot(results, path, title=None):
        titles.append(title)
        return plot(results, path, title=title)

    monkeypatch.setattr(common.plots, "plot_recall_curve", recording_plot)
    exact = {"recall@1": 0.5, "recall@2": 0.75, "map@r": 0.25}
    table = common.write_table({"after": exact}, str(tmp_path))
    assert "APPROXIMATE" not in table
    approx = dict(exact, approximate=1.0)
    table = common.write_table({"before": exact, "after": approx}, str(tmp_path))
    assert table.splitlines()[0].startswith("APPROXIMATE search (scann_ah)")
    assert titles == [None, "APPROXIMATE search (scann_ah)"]  # the PNG says so too
    assert "    recall@1     0.5000     0.5000" in table


def test_evaluate_and_plot_draws_spread_and_hardest_queries(tmp_path, monkeypatch):
    # Ranks of the first correct result: [0, 1, 1, 0, -1] (query 4 has no class
    # mate): the hardest two are 1 and 2; the spread ones are 0 and 4.
    x = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1], [0, -1]], np.float32)
    labels = np.array([0, 0, 1, 1, 2])
    toy = data.ImageSet(np.zeros((5, 4, 4, 1), np.uint8), labels, "toy")
    splits = data.RetrievalSplits(train=toy, test=toy, name="toy")
    # Image i is filled with i, so a grid's rows name their queries.
    monkeypatch.setattr(
        common, "_images", lambda s, idx: np.asarray(idx, np.float32)[:, None, None]
    )
    drawn = {}

    def recording_grid(query_images, *args, **kwargs):
        drawn[os.path.basename(args[4])] = query_images[:, 0, 0].astype(int).tolist()

    monkeypatch.setattr(common.plots, "plot_retrieval_grid", recording_grid)
    try:
        FLAGS.unparse_flags()
        FLAGS(["script", "--recall_ks=1,2"])
        metrics = common.evaluate_and_plot(
            (x, labels, None, None), splits, str(tmp_path), "after", num_queries=2, k=2
        )
    finally:
        FLAGS.unparse_flags()
    assert drawn == {
        "retrieval_grid_after.png": [0, 4],
        "retrieval_grid_after_hardest.png": [1, 2],
    }
    assert metrics["recall@1"] == pytest.approx(2 / 5)
