"""Where this process runs: a Google Colab runtime or not, and Colab's secrets.

Below every other nbkit module: the hub login (nbkit.hub) and the notebook helpers both ask.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def in_colab() -> bool:
    """True inside a Google Colab runtime (its kernel imports google.colab; the runtime sets COLAB_*)."""
    if "google.colab" in sys.modules:
        return True
    return "COLAB_RELEASE_TAG" in os.environ and _has_module("google.colab")


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def colab_secret(name: str) -> str | None:
    """A Colab secret's value, or None outside Colab, when it is missing or access was refused."""
    if not in_colab():
        return None
    try:
        from google.colab import userdata  # type: ignore[import-not-found]

        value = userdata.get(name)
    except Exception:  # noqa: BLE001 -- SecretNotFoundError, NotebookAccessError, TimeoutException: all mean "no secret"
        return None
    return (value.strip() or None) if isinstance(value, str) else None
