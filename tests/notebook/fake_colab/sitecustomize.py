"""Makes a Python on this path look like Colab's: nbkit is not installed.

The test venv has nbkit installed editable (a setuptools finder, added by a .pth file before this module
runs); Colab has no such thing, so the finder is removed and `import nbkit` works only once the notebook's
first cell has cloned the repository and put the checkout on sys.path. The venv's other packages stay.
Children started from the kernel (the converter, `python -m nbkit bench`) inherit this through PYTHONPATH,
as Colab's subprocesses inherit its environment."""

import sys


def _editable_nbkit(entry) -> bool:
    module = getattr(entry, "__module__", "") or ""
    return module.startswith("__editable__") and "nbkit" in module


sys.meta_path[:] = [f for f in sys.meta_path if not _editable_nbkit(f)]
sys.path[:] = [p for p in sys.path if "__editable__.nbkit" not in p]
for name in [m for m in sys.modules if m.startswith("__editable__") and "nbkit" in m]:
    del sys.modules[name]
