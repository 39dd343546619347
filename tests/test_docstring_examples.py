"""Every `>>>` example in the package's docstrings runs, as a doctest, and shows
what it prints; examples that need data we do not have are plain code blocks."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import xbm_tf

PACKAGE = Path(xbm_tf.__file__).parent
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="xbm_tf.")
    if not info.name.endswith("__main__")
)
WITH_EXAMPLES = [
    name
    for name in MODULES
    if ">>>" in Path(importlib.util.find_spec(name).origin).read_text()
]


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples write relative paths
    module = importlib.import_module(name)
    result = doctest.testmod(
        module,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        raise_on_error=False,
    )
    report = capsys.readouterr().out
    assert result.attempted > 0, f"{name} has `>>>` lines that doctest did not find"
    assert result.failed == 0, report


def test_no_example_is_skipped():
    for name in MODULES:
        source = Path(importlib.util.find_spec(name).origin).read_text()
        assert "doctest: +SKIP" not in source, (
            f"{name}: an example that cannot run is a plain code block, not a "
            "skipped doctest"
        )
