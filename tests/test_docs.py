"""The docs: the site builds with --strict, and the README stays a front door."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import xbm_tf

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_strict_and_ignores_incoming_fragments(tmp_path):
    # Build a copy, so that the fragment below (an incoming text with a broken link,
    # as other branches write them) never lands in the repository.
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", work)
    shutil.copytree(ROOT / "docs", work / "docs")
    os.symlink(ROOT / "xbm_tf", work / "xbm_tf")
    incoming = work / "docs" / "incoming"
    incoming.mkdir(exist_ok=True)
    (incoming / "issue99.md").write_text("See [nothing](no-such-page.md#none).\n")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    api = (site / "api" / "index.html").read_text()
    assert 'id="xbm_tf.XBMContrastiveModel"' in api
    assert not (site / "incoming").exists()


def _api_targets():
    text = (ROOT / "docs" / "api.md").read_text()
    return set(re.findall(r"^::: (\S+)", text, re.M))


def test_api_page_documents_every_public_name():
    targets = _api_targets()
    missing = [
        name
        for name in xbm_tf.__all__
        if name != "__version__" and f"xbm_tf.{name}" not in targets
    ]
    assert not missing, f"docs/api.md has no ::: entry for {missing}"


def test_readme_is_short_keeps_both_commands_and_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command == 'pip install -e ".[test]" && python -m pytest -q'
    assert ci_command in readme.splitlines()
    train = (
        "pip install -e . && "
        "python scripts/train.py --flagfile configs/quickstart.flags"
    )
    assert train in readme.splitlines()
    assert "mkdocs serve" in readme
    # mkdocs checks the links inside docs/; the README's links are checked here.
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        assert (ROOT / target).exists(), f"README links to missing {target}"
