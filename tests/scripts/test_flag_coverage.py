"""Every flag of the scripts is exercised by a test that passes it to a script.

The rule (docs: development): each flag that scripts/*.py or scripts/common.py
defines appears on a command line in some test, either in a test's source (a
string such as "--loss=triplet", "--nosprite") or in a flagfile that a test
passes ("--flagfile=configs/smoke.flags" and the flagfiles it includes). A new
flag without such a test fails here, naming it: add a test that runs the script
with it (tests/scripts/test_smoke_matrix.py is the place for a documented
option value), or, for a flag no test can run here, an entry with its reason in
EXEMPT below.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tokenize
from pathlib import Path

from absl import flags

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

# Flags no test passes to a script, `{flag: reason}`. Keep this short: empty
# today (each flag is passed by a test or set by configs/smoke.flags' chain).
EXEMPT: dict[str, str] = {}

_OPTION = re.compile(r"--([a-z][a-z0-9_]*)")


def script_flags() -> dict[str, str]:
    """`{flag: module}` of every flag defined by scripts/*.py."""
    modules = sorted(p.stem for p in (ROOT / "scripts").glob("*.py"))
    for name in modules:
        __import__(name)
    by_module = flags.FLAGS.flags_by_module_dict()
    return {f.name: m for m in modules for f in by_module.get(m, [])}


def _options(text: str) -> set[str]:
    found = set()
    for name in _OPTION.findall(text):
        found.add(name)
        if name.startswith("no"):  # --noflip
            found.add(name[2:])
    return found


def _flagfile_options(path: Path, seen: set[Path]) -> set[str]:
    """The flags a flagfile sets, with those of the flagfiles it includes."""
    if path in seen or not path.is_file():
        return set()
    seen.add(path)
    found = set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("--flagfile="):
            found |= _flagfile_options(ROOT / line.split("=", 1)[1], seen)
        elif line.startswith("--"):
            found |= _options(line.split("=", 1)[0])
    return found


def flags_tests_pass() -> set[str]:
    """The flags the tests pass: in their strings, or in the flagfiles they pass."""
    found, seen = set(), set()
    for path in sorted((ROOT / "tests").rglob("*.py")):
        source = path.read_text()
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type != tokenize.STRING:
                continue
            found |= _options(token.string)
            for flagfile in re.findall(r"--flagfile=([\w./-]+\.flags)", token.string):
                found |= _flagfile_options(ROOT / flagfile, seen)
    return found


def test_every_script_flag_is_passed_by_a_test():
    defined = script_flags()
    untested = sorted(set(defined) - flags_tests_pass() - set(EXEMPT))
    assert not untested, (
        "These flags are passed to a script by no test: "
        + ", ".join(f"--{name} ({defined[name]}.py)" for name in untested)
        + ". Add a test that runs the script with each (e.g. a case of "
        "tests/scripts/test_smoke_matrix.py), or an entry with its reason in "
        f"EXEMPT of {os.path.relpath(__file__, ROOT)}."
    )


def test_exemptions_are_flags_and_still_needed():
    defined = script_flags()
    assert set(EXEMPT) <= set(defined), set(EXEMPT) - set(defined)
    stale = sorted(set(EXEMPT) & flags_tests_pass())
    assert not stale, f"exempt, but a test passes them now: remove {stale} from EXEMPT"


def test_the_scan_sees_a_flag_in_a_string_and_a_flagfile(tmp_path):
    assert _options("f'--workdir={tmp}' '--nosprite' # --x") == {
        "workdir",
        "nosprite",
        "sprite",
        "x",
    }
    base = tmp_path / "base.flags"
    base.write_text("# --comment_flag\n--pooling=max\n")
    top = tmp_path / "top.flags"
    top.write_text(f"--flagfile={base}\n--noflip\n")
    assert _flagfile_options(top, set()) == {"pooling", "noflip", "flip"}
