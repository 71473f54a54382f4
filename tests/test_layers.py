"""The package's import structure: the floors of docs/design.md §2, no import running up a floor,
no import cycle. Read from the source with ``ast`` (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import vapt_kernels

PACKAGE = Path(vapt_kernels.__file__).parent

# Floor of each module, bottom first; a module imports only from lower floors, or from its own
# subpackage on the same floor (the ops, the Triton kernels, the benchmark). The oracle
# (official.py) imports only the options: it must not share code with what it checks.
FLOORS = {
    "foundations": ["_version", "config", "testing", "state_dicts", "files"],
    "ops": ["ops"],
    "prompt modules": ["modules"],
    "timm integration": ["timm"],
    "saved tasks": ["pretrained"],
    "library tools": ["checkpoint", "multitask", "environment", "official", "backbones", "paper_data"],
    "commands": ["train", "bench", "check"],
    "suite runner": ["suite"],
    "package": ["__init__"],
}


def module_names() -> list[str]:
    """Every module of the package, dotted below it (``ops.library``, ``bench.cli``, ``__init__``)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if len(parts) > 1 and parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def imports_of(name: str) -> set[str]:
    """The package modules ``name`` imports (``from . import x`` resolved to the module ``x`` where
    it is one)."""
    parts = name.split(".")
    is_package = name == "__init__" or (PACKAGE / Path(*parts) / "__init__.py").exists()
    path = PACKAGE / "__init__.py" if name == "__init__" else (
        PACKAGE / Path(*parts) / "__init__.py" if is_package else PACKAGE / Path(*parts).with_suffix(".py")
    )
    here = [] if name == "__init__" else (parts if is_package else parts[:-1])
    known = set(module_names())
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "vapt_kernels":
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                candidate = ".".join(base + [alias.name])
                found.add(candidate if candidate in known else ".".join(base) or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vapt_kernels":
                    found.add(".".join(alias.name.split(".")[1:]) or "__init__")
    return {m for m in found if m != name}


def floor_of(name: str) -> tuple[int, str]:
    top = name.split(".")[0]
    for level, (floor, members) in enumerate(FLOORS.items()):
        if top in members:
            return level, top
    raise AssertionError(f"vapt_kernels.{name} is on no floor of tests/test_layers.py's FLOORS: add it")


def test_every_module_has_a_floor():
    for name in module_names():
        floor_of(name)


def test_no_import_runs_up_a_floor():
    upward = []
    for name in module_names():
        level, top = floor_of(name)
        for target in imports_of(name):
            target_level, target_top = floor_of(target)
            if target_level > level or (target_level == level and target_top != top):
                upward.append(f"{name} -> {target}")
    assert not upward, f"imports to a higher floor or across one floor: {upward}"


def test_the_oracle_imports_only_the_options():
    assert imports_of("official") <= {"config"}


def test_no_import_cycle():
    graph = {name: imports_of(name) for name in module_names()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [name, target])}")
            if target not in state:
                visit(target, path + [name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
