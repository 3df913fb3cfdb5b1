"""Colab secrets: `get(name)` returns the value or raises SecretNotFoundError, as Colab does."""

import json
import os

from .errors import Error


class SecretNotFoundError(Error):
    pass


class NotebookAccessError(Error):
    pass


def get(key: str) -> str:
    path = os.environ.get("FAKE_COLAB_SECRETS")
    secrets = json.load(open(path)) if path else {}
    if key not in secrets:
        raise SecretNotFoundError(f"Secret {key} does not exist.")
    return secrets[key]
