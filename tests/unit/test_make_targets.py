"""`make notebook` sets up JupyterLab (pinned) apart from `make test`; `make colab-compat` reads Colab's versions."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def prerequisites(target: str) -> list[str]:
    text = (ROOT / "Makefile").read_text()
    return re.search(rf"^{re.escape(target)}:([^\n]*)", text, re.MULTILINE)[1].split()


def test_jupyterlab_is_pinned_for_make_notebook():
    pins = [line for line in (ROOT / "requirements-notebook.txt").read_text().splitlines() if "==" in line]
    assert any(re.fullmatch(r"jupyterlab==\d+\.\d+\.\d+", p) for p in pins)
    assert "jupyterlab" not in (ROOT / "requirements.txt").read_text()


def test_make_notebook_is_not_part_of_make_test():
    assert "$(NOTEBOOK_STAMP)" in prerequisites("notebook")
    assert not {"notebook", "$(NOTEBOOK_STAMP)"} & set(prerequisites("test"))
    dry = subprocess.run(["make", "-n", "notebook", "NBKIT_CACHE_DIR=/tmp/x", "VENV=/nonexistent-venv"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "requirements-notebook.txt" in dry and "jupyter lab --notebook-dir=notebooks" in dry


def test_colab_compat_takes_colabs_versions_from_the_fixture():
    dry = subprocess.run(["make", "-n", "colab-compat", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "tests/unit/data/colab_pip_freeze_gpu.txt" in dry and "ipywidgets|widgetsnbextension" in dry
