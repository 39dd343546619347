"""scripts/common.py: --eval_backend takes engine names; approximate tables say so."""

from __future__ import annotations

import os
import sys

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import common  # noqa: E402

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
