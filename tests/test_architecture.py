"""The package's layers, as drawn in its docstring, are true: every module is drawn
once, imports (outside ``TYPE_CHECKING``) only go to its own layer or lower ones,
and there is no import cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import socketio_dbctx

PACKAGE = Path(socketio_dbctx.__file__).parent
LAYER_LINE = re.compile(r"^    ([a-z]+)\s{2,}([a-z_ ]+?)\s*$")
#: more modules of the layer above, on a line of their own
MORE_LINE = re.compile(r"^ {16}([a-z_ ]+?)\s*$")


def drawn_layers() -> list[tuple[str, list[str]]]:
    """``[(layer, [module, ...]), ...]`` from the top of the drawing down."""
    doc = socketio_dbctx.__doc__ or ""
    layers = []
    for line in doc.splitlines():
        match = LAYER_LINE.match(line)
        if match:
            layers.append((match.group(1), match.group(2).split()))
        elif layers and MORE_LINE.match(line):
            layers[-1][1].extend(line.split())
    return layers


def runtime_imports(module: str) -> set[str]:
    """The package modules ``module`` imports when it runs (relative imports outside
    ``if TYPE_CHECKING:``)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            for child in ast.walk(node):
                if isinstance(child, ast.ImportFrom) and child.level == 1:
                    if child.module:
                        found.add(child.module.split(".")[0])
                    else:
                        found.update(alias.name for alias in child.names)

    visit(tree.body)
    return found


def modules() -> set[str]:
    return {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


def test_every_module_is_drawn_once() -> None:
    drawn = [name for _, names in drawn_layers() for name in names]
    assert len(drawn) == len(set(drawn)), "a module is drawn twice"
    assert sorted(drawn) == sorted(modules())


def test_imports_only_go_down_or_sideways() -> None:
    rank = {
        name: depth for depth, (_, names) in enumerate(reversed(drawn_layers())) for name in names
    }
    upward = [
        f"{module} ({rank[module]}) imports {target} ({rank[target]})"
        for module in modules()
        for target in runtime_imports(module)
        if rank[target] > rank[module]
    ]
    assert not upward


def test_there_is_no_import_cycle() -> None:
    graph = {module: runtime_imports(module) & modules() for module in modules()}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        assert module not in visiting, " -> ".join([*visiting, module])
        if module in done:
            return
        visiting.append(module)
        for target in sorted(graph[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_scan_sees_imports_and_skips_type_checking() -> None:
    """The scan is not blind: it finds a real import and skips a TYPE_CHECKING one."""
    assert "metrics" in runtime_imports("state")
    assert "state" not in runtime_imports("pipeline")  # only under TYPE_CHECKING there
