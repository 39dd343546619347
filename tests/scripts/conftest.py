"""Shared set-up of the script tests: scripts/ importable, a flag parser."""

from __future__ import annotations

import os
import sys

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


@pytest.fixture
def parse(monkeypatch):
    """Parses a command line on configs/smoke.flags, from the repository root.

    `parse(*args)` parses `--flagfile=configs/smoke.flags` then `args`, as every
    script would; the flags are unparsed again after the test.
    """
    monkeypatch.chdir(ROOT)

    def _parse(*args):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["script", "--flagfile=configs/smoke.flags", *args])

    yield _parse
    flags.FLAGS.unparse_flags()
