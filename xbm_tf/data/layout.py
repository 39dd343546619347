"""Errors and checks shared by the on-disk dataset loaders.

Every loader raises before any training work starts:

* `MissingDatasetFileError` (a `FileNotFoundError` and a `DatasetLayoutError`)
  when the root, an annotation file or listed image files are missing; the
  message names the missing path(s) and prints the expected layout.
* `DatasetLayoutError` (a `ValueError`) when an annotation file is malformed;
  the message names the file and the 1-based line number.
"""

from __future__ import annotations

import logging
import os

_MAX_NAMES_SHOWN = 5


class DatasetLayoutError(ValueError):
    """An annotation file is malformed or inconsistent with the dataset layout."""


class MissingDatasetFileError(DatasetLayoutError, FileNotFoundError):
    """A dataset root, annotation file or listed image file does not exist."""


def require_dir(path: str, dataset: str, layout: str) -> str:
    """Returns `path` as an absolute path, or raises if it is not a directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise MissingDatasetFileError(
            f"{dataset}: root directory {path!r} does not exist.\n"
            f"Expected layout:\n{layout}"
        )
    return path


def require_file(path: str, dataset: str, layout: str) -> str:
    """Returns `path`, or raises if it is not an existing file."""
    if not os.path.isfile(path):
        raise MissingDatasetFileError(
            f"{dataset}: required file {path!r} does not exist.\n"
            f"Expected layout:\n{layout}"
        )
    return path


def malformed(path: str, line_number: int, message: str) -> DatasetLayoutError:
    """Builds the error for a malformed line (line numbers are 1-based)."""
    return DatasetLayoutError(f"{path}, line {line_number}: {message}")


def check_images_exist(paths: list[str], dataset: str, layout: str) -> None:
    """Raises `MissingDatasetFileError` if any listed image file is missing.

    The message gives the number of missing files and the first few of them.
    """
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = "\n  ".join(missing[:_MAX_NAMES_SHOWN])
        more = "" if len(missing) <= _MAX_NAMES_SHOWN else "\n  ..."
        raise MissingDatasetFileError(
            f"{dataset}: {len(missing)} of {len(paths)} listed image files are "
            f"missing, e.g.:\n  {shown}{more}\nExpected layout:\n{layout}"
        )


def read_lines(path: str) -> list[tuple[int, str]]:
    """Returns `(line_number, stripped_line)` for the non-blank lines of a file."""
    with open(path, encoding="utf-8") as f:
        return [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]


def parse_int(token: str, path: str, line_number: int, what: str) -> int:
    """Parses an integer field, raising a `DatasetLayoutError` naming the line."""
    try:
        return int(token)
    except ValueError:
        raise malformed(
            path, line_number, f"{what} must be an integer, got {token!r}"
        ) from None


def log_count_mismatch(dataset: str, split: str, got: int, expected: int) -> None:
    """Warns (without failing) when a split's size differs from the paper's."""
    if got != expected:
        logging.getLogger(__name__).warning(
            "%s: %s split has %d images; the standard protocol has %d.",
            dataset,
            split,
            got,
            expected,
        )
