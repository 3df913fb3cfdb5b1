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


def test_make_test_runs_vllms_own_loader_check_from_a_cached_side_venv():
    """CI proves that vLLM loads nbkit's exports: `make test` builds the side venv (once: it is a stamped
    prerequisite) and points the check at it, so the test does not skip there."""
    assert "$(VLLM_STAMP)" in prerequisites("test")
    assert re.search(r"^VLLM_SIDE \?= \$\(CURDIR\)/\.cache/", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert ".cache/" in (ROOT / ".gitignore").read_text().split()
    dry = subprocess.run(["make", "-n", "test", "VENV=/nonexistent-venv", "VLLM_SIDE=/nonexistent-side"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "scripts/vllm_side_venv.sh /nonexistent-side" in dry
    pytest_line = next(line for line in dry.splitlines() if "-m pytest" in line)
    assert "NBKIT_VLLM_PYTHON=/nonexistent-side/bin/python" in pytest_line
