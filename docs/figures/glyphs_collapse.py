r"""Collapse vs healthy run on the glyphs: neg_similarity and feature drift.

Draws docs/glyphs_collapse.png from the log.csv of two scripts/train.py runs made
with one epoch per 20 steps (so log.csv has a row every 20 steps):

  for reduction in sum mean; do
    python scripts/train.py --flagfile configs/glyphs.flags \
        --p=4 --k=4 --memory_size=2048 --xbm_start_step=200 \
        --contrastive_pair_reduction=$reduction --workdir=runs/glyphs_k4_$reduction \
        --steps_per_epoch=20 --eval_every_epochs=1000 \
        --drift_every_steps=20 --drift_deltas=20,100,300 --drift_probes=250
  done
  python docs/figures/glyphs_collapse.py runs/glyphs_k4_sum runs/glyphs_k4_mean \
      docs/glyphs_collapse.png
"""

from __future__ import annotations

import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _read(run_dir: str) -> dict[str, list[float]]:
    with open(os.path.join(run_dir, "log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {
        key: [float(r[key]) if r[key] not in ("", "NA") else float("nan") for r in rows]
        for key in rows[0]
    }
    steps_per_row = 20
    columns["step"] = [(int(e) + 1) * steps_per_row for e in columns["epoch"]]
    return columns


def main(collapsed: str, healthy: str, out: str) -> None:
    runs = {
        "sum, weight 1 (collapses)": _read(collapsed),
        "mean, weight 1": _read(healthy),
    }
    panels = [
        ("neg_similarity", "mean cosine similarity,\ndifferent-class pairs", False),
        ("xbm_loss", "memory loss (xbm_loss)", True),
        ("drift@20", "feature drift, dt = 20", True),
        ("drift@300", "feature drift, dt = 300", True),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.6))
    for ax, (key, label, log) in zip(axes, panels):
        for name, columns in runs.items():
            pairs = [
                (s, v)
                for s, v in zip(columns["step"], columns[key])
                if v == v and (v > 0 or not log)
            ]
            ax.plot(*zip(*pairs), label=name)
        ax.axvline(200, color="gray", lw=0.8, ls=":")  # the memory joins
        ax.axvline(700, color="gray", lw=0.8, ls="--")  # learning rate / 10
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "glyphs, batch 16 (4 x 4), memory 2,048 rows from step 200 (dotted); "
        "learning rate / 10 at step 700 (dashed)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
