"""scripts/train.py and scripts/evaluate.py, end to end on configs/smoke.flags."""

from __future__ import annotations

import csv
import json
import os
import sys

import keras
import numpy as np
import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import evaluate  # noqa: E402
import train  # noqa: E402

from xbm_tf.export import load_exported_embedder  # noqa: E402

FLAGS = flags.FLAGS


class _Interrupt(keras.callbacks.Callback):
    """Records the memory at each epoch end and 'crashes' inside a later epoch."""

    def __init__(self, crash_epoch: int):
        super().__init__()
        self.crash_epoch = crash_epoch
        self.epoch = 0
        self.states = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == self.crash_epoch and batch == 0:
            raise KeyboardInterrupt("simulated crash")

    def on_epoch_end(self, epoch, logs=None):
        self.states[epoch] = _memory_state(self.model)


class _Resumed(keras.callbacks.Callback):
    """Records the state the run starts from (after BackupAndRestore)."""

    def on_train_begin(self, logs=None):
        self.start = _memory_state(self.model)


def _memory_state(model):
    memory = model.memory
    return {
        "embeddings": np.asarray(memory.embeddings).copy(),
        "labels": np.asarray(memory.labels).copy(),
        "count": int(np.asarray(memory.count)),
        "pointer": int(np.asarray(memory.pointer)),
        "step": int(np.asarray(model.optimizer.iterations)),
    }


def test_smoke_run_writes_everything_and_evaluate_agrees(
    parse, tmp_path, capsys, monkeypatch
):
    embeds = []
    original_embed = train.RetrievalEvaluation.embed

    def counting_embed(self):
        embeds.append(1)
        return original_embed(self)

    monkeypatch.setattr(train.RetrievalEvaluation, "embed", counting_embed)
    workdir = tmp_path / "run"
    parse(f"--workdir={workdir}")
    after = train.run()
    # Before training, after each of the 2 epochs; the final one is reused.
    assert len(embeds) == 3
    out = capsys.readouterr().out
    assert "Retrieval on the unseen test classes" in out
    assert "recall@1" in out and "Exported the embedding model" in out
    for name in (
        "recall_curve.png",
        "retrieval_grid_before.png",
        "retrieval_grid_after.png",
        "retrieval_grid_after_hardest.png",
        "checkpoints/last.keras",
    ):
        assert (workdir / name).stat().st_size > 1000, name
    rows = list(csv.DictReader(open(workdir / "log.csv")))
    assert len(rows) == 2  # 6 steps, 3 per epoch
    assert float(rows[-1]["memory_fill"]) == pytest.approx(1.0)  # 4 x 16 >= 40
    assert "val_recall@1" in rows[-1] and float(rows[-1]["xbm_loss"]) > 0
    assert any(
        p.name.startswith("events")
        for p in (workdir / "tensorboard" / "train").iterdir()
    )
    saved = json.load(open(workdir / "retrieval.json"))
    assert saved["after"]["recall@1"] == pytest.approx(after["recall@1"])
    assert set(saved["after"]) >= {"recall@1", "recall@2", "recall@4", "recall@8"}

    embed = load_exported_embedder(str(workdir / "export"))
    emb = embed(np.full((2, 28, 28, 1), 128.0, np.float32))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)

    # evaluate.py on the export reproduces the final numbers of train.py.
    parse(
        f"--workdir={workdir}",
        f"--model={workdir / 'export'}",
        f"--output_dir={tmp_path / 'eval'}",
    )
    metrics = evaluate.run()
    for key, value in after.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert (tmp_path / "eval" / "retrieval.json").exists()
    # ... and so does the .keras checkpoint.
    parse(
        f"--workdir={workdir}",
        f"--model={workdir / 'checkpoints/last.keras'}",
        f"--output_dir={tmp_path / 'eval2'}",
    )
    metrics = evaluate.run()
    assert metrics["recall@1"] == pytest.approx(after["recall@1"], abs=1e-6)

    # A second run must not replace the export without --overwrite.
    parse(f"--workdir={workdir}")
    with pytest.raises(train.FlagError, match="already holds an export.*--overwrite"):
        train.run()
    assert (workdir / "export" / "saved_model.pb").exists()


def test_killed_run_resumes_with_its_memory(parse, tmp_path):
    workdir = tmp_path / "run"
    parse(f"--workdir={workdir}", "--steps=9")  # 3 epochs of 3 steps
    crash = _Interrupt(crash_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        train.run(extra_callbacks=[crash])
    assert (workdir / "backup").is_dir()
    saved = crash.states[0]
    assert saved["step"] == 3 and saved["count"] == 16  # 1 enqueue after step 2
    resumed = _Resumed()
    train.run(extra_callbacks=[resumed])
    start = resumed.start
    assert (start["step"], start["count"], start["pointer"]) == (
        saved["step"],
        saved["count"],
        saved["pointer"],
    )
    np.testing.assert_array_equal(start["embeddings"], saved["embeddings"])
    np.testing.assert_array_equal(start["labels"], saved["labels"])
    rows = list(csv.DictReader(open(workdir / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # epoch 0 not repeated


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory_size=8"], "--memory_size=8 is smaller than the batch"),
        (
            ["--p=12", "--memory_size=100"],
            "--p=12 classes per batch, but the training split has only 10",
        ),
        (["--dataset=cub"], "--dataset=cub needs --data_dir"),
        (["--dataset=cub", "--data_dir=/nonexistent"], "/nonexistent is not a folder"),
        (["--weights=/no/such.weights.h5"], "neither 'imagenet', 'none' nor an"),
        (["--recall_ks=1,500"], "K=500, but the evaluation gallery has 119 items"),
        (["--crop_size=40"], "--crop_size=40 is larger than --resize_size=32"),
    ],
)
def test_bad_flags_fail_fast_with_a_named_error(parse, tmp_path, args, message):
    parse(f"--workdir={tmp_path / 'run'}", *args)
    with pytest.raises(train.FlagError, match=message):
        train.run()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_dataset_file_is_named(parse, tmp_path):
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    parse(f"--workdir={tmp_path / 'run'}", "--dataset=cub", f"--data_dir={root}")
    with pytest.raises(train.data.DatasetLayoutError, match="images.txt"):
        train.run()


def test_evaluate_names_a_bad_model_path(parse, tmp_path):
    parse(f"--model={tmp_path / 'nothing.keras'}")
    with pytest.raises(evaluate.FlagError, match="nothing.keras is neither a Saved"):
        evaluate.run()
