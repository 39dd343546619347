"""scripts/train.py: loss flags, flag sanity, and a non-finite loss stopping early."""

from __future__ import annotations

import json
import os
import sys

import h5py
import keras
import numpy as np
import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import train  # noqa: E402
from script_data import AtStep, stop_after  # noqa: E402

from xbm_tf import ContrastiveLoss, MultiSimilarityLoss, TripletLoss  # noqa: E402
from xbm_tf.terminate_on_nonfinite import (  # noqa: E402
    NonFiniteLossError,
    TerminateOnNonFinite,
)

FLAGS = flags.FLAGS


def test_loss_flag_defaults_are_the_documented_values(parse, tmp_path):
    # The README's table of loss hyper-parameters, as literals: a changed default
    # in the loss functions (which the flags read) fails here.
    parse(f"--workdir={tmp_path}")
    assert (FLAGS.contrastive_neg_margin, FLAGS.triplet_margin) == (0.5, 0.1)
    assert FLAGS.triplet_mining == "semihard"
    assert (FLAGS.ms_alpha, FLAGS.ms_beta, FLAGS.ms_threshold, FLAGS.ms_epsilon) == (
        2.0,
        40.0,
        0.5,
        0.1,
    )
    # With no flagfile (the scripts' own defaults), the same values.
    FLAGS.unparse_flags()
    FLAGS(["train"])
    assert (FLAGS.contrastive_neg_margin, FLAGS.triplet_margin) == (0.5, 0.1)
    assert (FLAGS.ms_alpha, FLAGS.ms_beta, FLAGS.ms_threshold, FLAGS.ms_epsilon) == (
        2.0,
        40.0,
        0.5,
        0.1,
    )


@pytest.mark.parametrize(
    "args, kind, expected",
    [
        (
            ["--loss=contrastive", "--contrastive_neg_margin=0.3"],
            ContrastiveLoss,
            {"neg_margin": 0.3, "pair_reduction": "sum"},
        ),
        (
            ["--loss=contrastive", "--contrastive_pair_reduction=mean"],
            ContrastiveLoss,
            {"neg_margin": 0.5, "pair_reduction": "mean"},
        ),
        # The triplet loss gets its own default (0.1), not the contrastive's 0.5.
        (
            ["--loss=triplet"],
            TripletLoss,
            {"margin": 0.1, "mining": "semihard", "pair_reduction": "sum"},
        ),
        (
            [
                "--loss=triplet",
                "--triplet_margin=0.2",
                "--triplet_mining=hard",
                "--triplet_pair_reduction=mean",
            ],
            TripletLoss,
            {"margin": 0.2, "mining": "hard", "pair_reduction": "mean"},
        ),
        (
            [
                "--loss=multi_similarity",
                "--ms_alpha=3",
                "--ms_beta=50",
                "--ms_threshold=0.4",
                "--ms_epsilon=0.2",
            ],
            MultiSimilarityLoss,
            {"alpha": 3.0, "beta": 50.0, "threshold": 0.4, "epsilon": 0.2},
        ),
    ],
)
def test_each_loss_flag_reaches_its_loss(parse, tmp_path, args, kind, expected):
    parse(f"--workdir={tmp_path}", *args)
    train.check_train_flags()
    model = train.build_model()
    assert type(model.pair_loss) is kind
    assert model.pair_loss.hyper_parameters == expected


def test_glyphs_flagfiles_need_no_data_dir(parse, tmp_path):
    for name in ("glyphs", "glyphs_ablation", "glyphs_memory_sweep"):
        parse(f"--flagfile=configs/{name}.flags", f"--workdir={tmp_path}")
        assert FLAGS.dataset == "glyphs" and FLAGS.data_dir is None
        assert FLAGS.contrastive_pair_reduction == "mean"
        train.check_train_flags()
        assert train.build_model().pair_loss.pair_reduction == "mean"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--embedding_dim=0"], "--embedding_dim=0 must be positive"),
        (["--learning_rate=nan"], "--learning_rate=nan is not a finite number"),
        (["--xbm_weight=inf"], "--xbm_weight=inf is not a finite number"),
        (["--ms_epsilon=-inf"], "--ms_epsilon=-inf is not a finite number"),
        (["--eval_batch_size=0"], "--eval_batch_size=0 must be positive"),
        (["--margin=0.3"], "--margin=0.3 is ambiguous"),
        (["--contrastive_neg_margin=1.5"], "must lie in \\[-1, 1\\]"),
        (["--ms_beta=0"], "--ms_beta=0.0 must be positive"),
        (["--triplet_margin=-0.1"], "--triplet_margin=-0.1 must be >= 0"),
        (["--xbm_weight=-1"], "--xbm_weight=-1.0 must be >= 0"),
        (["--xbm_start_step=-1"], "--xbm_start_step=-1 must be >= 0"),
    ],
)
def test_bad_numbers_are_flag_errors(parse, tmp_path, args, message):
    parse(f"--workdir={tmp_path / 'run'}", *args)
    with pytest.raises(train.FlagError, match=message):
        train.run()
    assert not (tmp_path / "run").exists()


def test_terminate_on_nonfinite_names_the_term_and_step():
    callback = TerminateOnNonFinite(check_weights=False)  # no model here
    callback.set_params({"steps": 3})
    callback.on_epoch_begin(2)
    callback.on_train_batch_end(0, {"loss": 1.0, "batch_loss": 1.0, "xbm_loss": 0.0})
    with pytest.raises(
        NonFiniteLossError,
        match=r"memory loss \(xbm_loss\) became nan at training step 8 "
        r"\(epoch 3, step 2 of 3\)",
    ):
        callback.on_train_batch_end(
            1, {"loss": np.nan, "batch_loss": 1.0, "xbm_loss": np.nan}
        )
    with pytest.raises(NonFiniteLossError, match=r"in-batch loss \(batch_loss\)"):
        callback.on_train_batch_end(1, {"batch_loss": np.inf, "xbm_loss": np.nan})
    with pytest.raises(NonFiniteLossError, match="total loss"):
        callback.on_train_batch_end(1, {"loss": np.inf, "batch_loss": 1.0})


def test_terminate_on_nonfinite_counts_a_resumed_epoch_as_its_end():
    # Resumed at step 4 of epochs of 3 steps: the first fit runs the last 2 steps
    # of epoch 2 (fit_segments: steps 5 and 6), as an epoch of 2 steps.
    callback = TerminateOnNonFinite(check_weights=False, steps_per_epoch=3)
    callback.set_params({"steps": 2})
    callback.on_train_begin()
    callback.on_epoch_begin(1)
    with pytest.raises(
        NonFiniteLossError, match=r"at training step 6 \(epoch 2, step 3 of 3\)"
    ):
        callback.on_train_batch_end(1, {"loss": np.nan, "batch_loss": np.nan})
    callback.set_params({"steps": 3})  # the next fit: whole epochs
    callback.on_epoch_begin(2)
    with pytest.raises(NonFiniteLossError, match=r"step 7 \(epoch 3, step 1 of 3\)"):
        callback.on_train_batch_end(0, {"loss": np.nan, "batch_loss": np.nan})
    callback.set_params({"steps": 4})
    with pytest.raises(ValueError, match="fit runs 4 steps per epoch, more than"):
        callback.on_train_begin()


def _poison_memory(model):
    """Fills the memory with NaN."""
    memory = model.memory
    memory.embeddings.assign(np.full(memory.embeddings.shape, np.nan))


class _PoisonMemory(keras.callbacks.Callback):
    """Fills the memory with NaN after the first step of the second epoch."""

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 1 and batch == 0:
            _poison_memory(self.model)


def _all_finite(path) -> bool:
    arrays = []
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda _, node: (
                arrays.append(np.asarray(node))
                if isinstance(node, h5py.Dataset)
                else None
            )
        )
    floats = [a for a in arrays if a.dtype.kind == "f"]
    return bool(floats) and all(np.all(np.isfinite(a)) for a in floats)


def test_nonfinite_memory_loss_stops_at_once_and_keeps_the_backup(
    parse, tmp_path, monkeypatch
):
    workdir = tmp_path / "run"
    parse(f"--workdir={workdir}", "--steps=9")  # 3 epochs of 3 steps
    monkeypatch.setattr(
        train, "make_callbacks", _with_extra(train.make_callbacks, _PoisonMemory())
    )
    with pytest.raises(SystemExit) as exit_info:
        train.main(["train"])
    message = str(exit_info.value)
    assert message.startswith("error: the memory loss (xbm_loss) became nan")
    assert "at training step 5 (epoch 2, step 2 of 3)" in message
    assert not (workdir / "export").exists()
    # The backup of epoch 1 (3 good steps) is kept, with finite weights.
    backups = sorted((workdir / "backup").iterdir())
    assert [b.name for b in backups] == ["step_000000003"]
    assert json.load(open(backups[0] / "state.json")) == {"step": 3}
    assert _all_finite(backups[0] / "model.weights.h5")
    assert (workdir / "checkpoints" / "last.keras").exists()


def _with_extra(make_callbacks, extra):
    def wrapped(*args, **kwargs):
        return make_callbacks(*args, **kwargs) + [extra]

    return wrapped


def test_nonfinite_loss_after_a_mid_epoch_resume_names_the_true_step(
    parse, tmp_path, monkeypatch
):
    workdir = tmp_path / "run"
    # 3 epochs of 3 steps, a backup every 2 steps; killed after step 5.
    parse(f"--workdir={workdir}", "--steps=9", "--backup_every_steps=2")
    with pytest.raises(KeyboardInterrupt):
        train.run(extra_callbacks=[stop_after(5)])
    assert sorted(p.name for p in (workdir / "backup").iterdir()) == ["step_000000004"]
    # Resumed at step 4: a first fit of 2 steps (5, 6) finishes epoch 2. The
    # memory is poisoned after step 5, so step 6's memory loss is NaN.
    monkeypatch.setattr(
        train,
        "make_callbacks",
        _with_extra(train.make_callbacks, AtStep(5, _poison_memory)),
    )
    with pytest.raises(SystemExit) as exit_info:
        train.main(["train"])
    message = str(exit_info.value)
    assert "the memory loss (xbm_loss) became nan" in message
    assert "at training step 6 (epoch 2, step 3 of 3)" in message
