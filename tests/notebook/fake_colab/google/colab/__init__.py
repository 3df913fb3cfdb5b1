"""A stand-in for Colab's `google.colab`, enough for nbkit's notebooks to run as they do in Colab.

Configured by environment variables that the test sets for the kernel:
- FAKE_COLAB_SECRETS: a JSON file {name: value} read by `userdata.get` (the Colab "Secrets" panel);
- FAKE_COLAB_LOG: a file where every call of `output.*` is appended as a JSON line, for the test to read.

`google` stays a namespace package (no google/__init__.py) so that google.protobuf still imports.
"""

from . import errors, kernel, output, userdata

__all__ = ["errors", "kernel", "output", "userdata"]
