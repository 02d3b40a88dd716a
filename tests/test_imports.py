"""The project's modules import one another without cycles, and data flows one way (DESIGN.md): `core` never
imports `scaffold`, generated ports import only `core` (and transformers). Imports inside functions count too."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("core", "scaffold", "generated_models")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports: `from pkg import name` counts as pkg.name when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                         for alias in node.names)
    return {name for name in found if name in modules}


def _import_graph() -> dict[str, set[str]]:
    modules = _project_modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_no_module_imports_itself_through_others():
    graph = _import_graph()
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join(stack[stack.index(imported):] + [imported]))
            elif imported not in state:
                visit(imported, stack + [imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_core_never_imports_the_generator_and_ports_import_only_core():
    graph = _import_graph()
    for module, imported in graph.items():
        if module.startswith("core"):
            assert not {name for name in imported if name.startswith("scaffold")}, module
        if module.startswith("generated_models"):
            assert {name.split(".")[0] for name in imported} <= {"core", "generated_models"}, module
