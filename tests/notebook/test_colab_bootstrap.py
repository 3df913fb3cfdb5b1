"""The notebooks' first cell, as Colab runs it: nbkit is not installed, /content is the working directory.

It clones $NBKIT_GIT (or the form field), stops with git's reason when the clone fails, and puts the
checkout first on sys.path, also after a restart, when /content/nbkit (the repository root, no __init__.py)
is found as an empty namespace package called `nbkit`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE_COLAB = Path(__file__).resolve().parent / "fake_colab"  # its sitecustomize hides the venv's nbkit
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def bootstrap_source(path: Path = ROOT / "notebooks" / "00_run_all.ipynb") -> str:
    nb = nbformat.read(path, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code" and "NBKIT_GIT" in c.source)


def test_every_notebook_has_the_same_bootstrap():
    assert {bootstrap_source(p) for p in NOTEBOOKS} == {bootstrap_source()}


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> str:
    bare = tmp_path_factory.mktemp("remote") / "nbkit.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(ROOT), str(bare)], check=True)
    return f"file://{bare}"


def kernel(content: Path, git_url: str, after: str) -> subprocess.CompletedProcess:
    """A fresh Python in `content` (on sys.path first, as IPython puts the working directory) that runs the
    bootstrap cell, then `after`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBKIT_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(FAKE_COLAB), NBKIT_GIT=git_url, NBKIT_CHECKOUT=str(content / "nbkit"))
    code = "import sys\nsys.path.insert(0, '')\n" + bootstrap_source() + "\n" + after
    return subprocess.run([sys.executable, "-c", code], cwd=content, env=env, capture_output=True, text=True,
                          timeout=120)


def test_clone_then_restart(repository, tmp_path):
    content = tmp_path / "content"
    content.mkdir()
    probe = "import nbkit.notebook.env\nprint(nbkit.__file__)"
    first = kernel(content, repository, probe)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(content / "nbkit" / "nbkit" / "__init__.py")
    head = (content / "nbkit" / ".git").stat().st_ino
    # Restart: /content/nbkit now shadows as a namespace package; the cell must still give the real one.
    ghost = kernel(content, repository, "import importlib.util\nprint(importlib.util.find_spec('nbkit').origin)")
    assert ghost.returncode == 0 and ghost.stdout.strip().endswith("__init__.py"), ghost.stderr
    shadow = subprocess.run([sys.executable, "-c", "import nbkit; print(nbkit.__file__)"], cwd=content,
                            env={**os.environ, "PYTHONPATH": str(FAKE_COLAB)}, capture_output=True, text=True)
    assert shadow.stdout.strip() == "None", "without the cell, the checkout is an empty namespace (Colab's bug)"
    again = kernel(content, repository, probe)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == first.stdout.strip()
    assert (content / "nbkit" / ".git").stat().st_ino == head, "a restart does not clone again"


def test_a_failed_clone_stops_with_the_reason(tmp_path):
    content = tmp_path / "content"
    content.mkdir()
    failed = kernel(content, f"file://{tmp_path}/no-such-repo.git", "print('went on')")
    assert failed.returncode != 0 and "went on" not in failed.stdout
    assert "RuntimeError: git clone file://" in failed.stderr and "failed (exit 128)" in failed.stderr
    assert "Set NBKIT_GIT above" in failed.stderr and "repository exists" in failed.stderr  # git's own reason
    assert not (content / "nbkit").exists()
