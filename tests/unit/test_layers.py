"""The layer order of docs/architecture.md, enforced: a module imports only nbkit modules of its own layer
or of layers below it. Imports are read with ast (module level and inside functions alike: a lazy import is
still a dependency), so the test needs none of the heavy packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "nbkit"

# Lowest first (docs/architecture.md, "Layers"). The package itself (nbkit/__init__.py) holds only the version.
LAYERS: list[set[str]] = [
    {"nbkit.models", "nbkit.chat_format", "nbkit.colab"},  # the embedded model, prompts, where we run
    {"nbkit.hub"},  # fetching models and heads, the one heads resolver
    {"nbkit.medusa", "nbkit.gguf"},  # heads, trees, acceptance, export; GGUF files and llama.cpp's bindings
    {"nbkit.engine"},  # scheduler, speculation, runners
    {"nbkit.server", "nbkit.client"},  # HTTP
    {"nbkit.notebook", "nbkit.cli", "nbkit.__main__", "nbkit.bench"},  # what people run
]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.with_suffix("").relative_to(root.parent).parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """The layer of `module` (its longest listed prefix); None for the package root `nbkit`."""
    for index, layer in enumerate(LAYERS):
        if any(module == unit or module.startswith(unit + ".") for unit in layer):
            return index
    return None


def imported(path: Path, root: Path = ROOT) -> set[str]:
    """The nbkit modules `path` imports, relative imports resolved."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out |= {module} if node.module else {f"{module}.{alias.name}" for alias in node.names}
    return {m for m in out if m == "nbkit" or m.startswith("nbkit.")}


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        here = layer_of(name)
        assert here is not None or name == "nbkit", f"{path} is in no layer: add it to LAYERS"
        for target in sorted(imported(path, root)):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                found.append(f"{name} (layer {here}) imports {target} (layer {there})")
    return found


def test_no_module_imports_a_higher_layer():
    assert violations() == []


def test_every_package_has_a_layer():
    packages = {module_name(p) for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert sorted(p for p in packages - {"nbkit"} if layer_of(p) is None) == []


@pytest.mark.parametrize("source, expected", [
    ("from ..cli import main\n", ["nbkit.medusa.x (layer 2) imports nbkit.cli (layer 5)"]),
    ("def f():\n    from ..engine.llamacpp import bindings\n",
     ["nbkit.medusa.x (layer 2) imports nbkit.engine.llamacpp (layer 3)"]),
    ("import nbkit.server.app\n", ["nbkit.medusa.x (layer 2) imports nbkit.server.app (layer 4)"]),
    ("from ..hub import fetch_heads\nfrom . import trees\nfrom ..models import cache_dir\n", []),
])
def test_the_check_sees_lazy_relative_and_absolute_imports(tmp_path, source, expected):
    """The checker itself can fail: a medusa module importing upward (lazily too) is reported."""
    root = tmp_path / "nbkit"
    (root / "medusa").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "medusa" / "__init__.py").write_text("")
    (root / "medusa" / "x.py").write_text(source)
    assert violations(root) == expected
