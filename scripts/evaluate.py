r"""Evaluates a trained embedding model with the dataset's retrieval protocol.

  python scripts/evaluate.py --flagfile configs/quickstart.flags \
      --model runs/quickstart/export
  python scripts/evaluate.py --flagfile configs/sop.flags --data_dir /data/SOP \
      --model runs/sop/checkpoints/last.keras

--model is a SavedModel written by train.py (workdir/export) or a `.keras` file
(workdir/checkpoints/last.keras). The Ks come from --recall_ks in the flagfile
(CUB and Cars R@1/2/4/8; SOP R@1/10/100/1000; In-Shop R@1/10/20/30/40/50;
VehicleID R@1/5, with --vehicleid_test_size=all the Small, Medium and Large test
lists as the columns of one table). The table is printed and written with a
Recall@K curve and a retrieval grid to --output_dir (default: a folder
`evaluation` beside --model).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import keras  # noqa: E402
from absl import app, flags  # noqa: E402
from common import FlagError  # noqa: E402

import xbm_tf  # noqa: E402, F401  (registers the custom objects of .keras files)
from xbm_tf.export import load_exported_embedder  # noqa: E402
from xbm_tf.retrieval import RetrievalEvaluation  # noqa: E402

_MODEL = flags.DEFINE_string(
    "model", None, "A SavedModel directory (train.py's export) or a .keras file."
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where to write the results (default: beside --model)."
)


class _ExportedEmbedder:
    """Gives a SavedModel's serving function the `predict_on_batch` of a model."""

    def __init__(self, path: str):
        self._embed = load_exported_embedder(path)

    def predict_on_batch(self, images):
        return self._embed(images)


def check_model_path(path: str) -> None:
    if not (os.path.isdir(path) or (path.endswith(".keras") and os.path.isfile(path))):
        raise FlagError(
            f"--model={path} is neither a SavedModel directory nor a .keras file"
        )


def load_model(path: str):
    """The embedding model behind --model, whichever of the two kinds it is."""
    if os.path.isdir(path):
        return _ExportedEmbedder(path)
    return keras.models.load_model(path)


def run() -> dict[str, float]:
    common.require(_MODEL)
    common.check_data_flags()
    model_path = _MODEL.value.rstrip("/")
    check_model_path(model_path)
    out_dir = _OUTPUT_DIR.value or os.path.join(
        os.path.dirname(os.path.abspath(model_path)), "evaluation"
    )
    if (
        common.DATASET.value == "vehicleid"
        and common.VEHICLEID_TEST_SIZE.value == "all"
    ):
        return run_vehicleid_sizes(model_path, out_dir)
    splits = common.load_splits()
    model = load_model(model_path)
    os.makedirs(out_dir, exist_ok=True)
    metrics = evaluate_splits(model, splits, out_dir, "test")
    print(f"\n{splits.describe()}", flush=True)
    common.write_table({os.path.basename(model_path): metrics}, out_dir)
    print(f"Wrote {out_dir}/retrieval.json and PNGs", flush=True)
    return metrics


def evaluate_splits(model, splits, out_dir: str, name: str) -> dict[str, float]:
    """Embeds the evaluation split(s) with `model`; metrics and a grid PNG."""
    query, gallery = common.make_eval_datasets(splits)
    evaluation = RetrievalEvaluation(
        query,
        gallery_data=gallery,
        ks=common.recall_ks(),
        backend=common.EVAL_BACKEND.value,
        embedding_model=model,
    )
    return common.evaluate_and_plot(evaluation.embed(), splits, out_dir, name)


def run_vehicleid_sizes(model_path: str, out_dir: str) -> dict[str, dict]:
    """--vehicleid_test_size=all: Small, Medium and Large in one table."""
    sizes = common.vehicleid_test_sizes()
    all_splits = {size: common.load_splits(size) for size in sizes}  # fail fast
    model = load_model(model_path)
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for size, splits in all_splits.items():
        results[size] = evaluate_splits(model, splits, out_dir, f"test_{size}")
        print(f"{splits.test.describe()}", flush=True)
    print(f"\nVehicleID, {os.path.basename(model_path)}:", flush=True)
    common.write_table(results, out_dir)
    print(f"Wrote {out_dir}/retrieval.json and PNGs", flush=True)
    return results


def main(argv):
    common.main(argv, run)


if __name__ == "__main__":
    app.run(main)
