"""--memory_dtype reaches the model built by scripts/train.py."""

from __future__ import annotations

import os
import sys

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import train  # noqa: E402

FLAGS = flags.FLAGS


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_dtype_flag_builds_the_memory_in_that_dtype(dtype, monkeypatch):
    monkeypatch.chdir(ROOT)
    FLAGS.unparse_flags()
    try:
        FLAGS(["train", "--flagfile=configs/smoke.flags", f"--memory_dtype={dtype}"])
        model = train.build_model()
    finally:
        FLAGS.unparse_flags()
    assert model.memory_dtype == dtype
    keys, _, _ = model.memory.read()
    assert keys.dtype == dtype
    assert tuple(keys.shape) == (40, 16)  # smoke.flags
