"""The runner contract (engine/runner.py) lists every runner member the engine uses, and the doc agrees."""

import ast
import pathlib
import re

from nbkit.engine.runner import OPTIONAL, Runner

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENGINE = ROOT / "nbkit" / "engine"
USERS = [ENGINE / n for n in ("engine.py", "threads.py", "admission.py", "introspect.py", "selfcheck.py")] + sorted(
    (ENGINE / "speculation").glob("*.py"))


def protocol_members() -> set[str]:
    return {n for n in vars(Runner) if not n.startswith("_")} | set(Runner.__annotations__)


def used_members() -> tuple[set[str], set[str]]:
    """(`runner.NAME` / `self.runner.NAME` attributes, names read through runner_member) in the engine's modules."""
    attrs, optional = set(), set()
    for path in USERS:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and (
                    (isinstance(node.value, ast.Name) and node.value.id in ("runner", "old"))
                    or (isinstance(node.value, ast.Attribute) and node.value.attr == "runner")):
                attrs.add(node.attr)
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("runner_member", "_call_if_present")
                    and isinstance(node.args[1], ast.Constant)):
                optional.add(node.args[1].value)
    return attrs, optional


def test_the_protocol_lists_every_member_the_engine_reads():
    attrs, optional = used_members()
    required = protocol_members()
    assert attrs - required == set(), "read directly but not in the Protocol (or read it through runner_member)"
    assert optional <= set(OPTIONAL), "read through runner_member without a documented default"
    assert not set(OPTIONAL) & required, "a member cannot be both required and optional"
    assert {"synchronize", "recomputes_accepted", "device", "verify", "commit"} <= required


def test_the_docs_runner_contract_names_the_same_members():
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## The runner contract", 1)[1].split("```")[1]
    required, optional = block.split("optional", 1)
    named = lambda part: set(re.findall(r"\b([a-z_]+)\b(?=[ (,]|$)", part, re.M))  # noqa: E731
    assert protocol_members() <= named(required)
    assert set(OPTIONAL) <= named(optional)
