"""The package layering that docs/architecture.md states is the one the code has.

The document lists the layers in a code block (one layer a line: its packages and modules
before the first two spaces); each may import only the layers above it and its own. This
test reads that order from the document itself, every import in src/shardlm (AST, function-
level imports included; only ``if TYPE_CHECKING:`` blocks are exempt — from the cycle checks
too, so type-only back references are allowed) and fails on an import
against the order, on an import circle between modules, or between packages.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "shardlm"
DOC = ROOT / "docs" / "architecture.md"


def documented_layers(text: str) -> list[list[str]]:
    """The names of each layer, top first, from the block after '## Layers of the code'."""
    section = text.split("## Layers of the code", 1)[1]
    block = section.split("```", 2)[1]
    layers = []
    for line in block.splitlines():
        if not line or line.startswith(" "):
            continue  # a continuation of the description
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        layers.append([n.strip().rstrip("/") for n in names.split(",")])
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path) -> set[str]:
    """shardlm modules this file imports (a ``from pkg import name`` names pkg.name when it
    is a module, else pkg)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            found.add(f"{RELATIVE}{'.' * node.level}{node.module or ''}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "shardlm")
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "shardlm"
        ):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                as_file = SRC.parent / Path(*sub.split("."))
                is_module = as_file.with_suffix(".py").is_file() or as_file.is_dir()
                found.add(sub if is_module else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


RELATIVE = "relative import "


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    return {
        m: {i for i in imports_of(p) if i != m and not i.startswith(RELATIVE)}
        for m, p in modules.items()
    }


def test_imports_are_absolute():
    """The checks below read absolute imports; a relative one would slip past them."""
    relative = [
        f"{module_name(p)}: {i}"
        for p in SRC.rglob("*.py")
        for i in imports_of(p)
        if i.startswith(RELATIVE)
    ]
    assert not relative


def unit(module: str) -> str:
    """The layer unit a module belongs to: shardlm.X (a top-level package or module)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "shardlm"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_the_document_names_every_package_and_module_once():
    layers = documented_layers(DOC.read_text())
    names = [n for layer in layers for n in layer]
    assert len(names) == len(set(names)), "a name appears in two layers"
    present = {unit(m) for m in graph()} - {"shardlm"}
    assert set(names) == present, (
        f"undocumented: {sorted(present - set(names))}; gone: {sorted(set(names) - present)}"
    )


def test_every_import_follows_the_documented_order():
    order = {n: i for i, layer in enumerate(documented_layers(DOC.read_text())) for n in layer}
    bad = []
    for module, imported in graph().items():
        if module == "shardlm":  # the package's face: re-exports the public API
            continue
        for target in imported:
            if target == "shardlm":
                bad.append(f"{module} imports the package root (import the defining module)")
            elif order[unit(target)] > order[unit(module)]:
                bad.append(f"{module} imports {target}, which is in a lower layer")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circle_between_modules():
    assert find_cycle(graph()) is None


def test_no_import_circle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, imported in graph().items():
        if module == "shardlm":
            continue
        packages.setdefault(unit(module), set()).update(
            unit(t) for t in imported if unit(t) != unit(module)
        )
    assert find_cycle(packages) is None


@pytest.mark.parametrize(
    "edges, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ],
)
def test_the_cycle_finder_can_fail(edges, cycle):
    assert find_cycle(edges) == cycle


def test_the_order_check_sees_function_level_imports(tmp_path):
    """A deferred import counts like a top-level one; TYPE_CHECKING ones do not."""
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from shardlm.engine.llm import LLM\n"
        "def g():\n    from shardlm.engine import llm_engine\n"
    )
    assert imports_of(f) == {"shardlm.engine.llm_engine"}
    f.write_text("from . import x\n")
    assert imports_of(f) == {RELATIVE + "."}
