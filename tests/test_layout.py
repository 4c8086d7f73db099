"""The package layout is the architecture: the core imports no tool, and tools use each other's public faces only.

The import graph is read from the source with ``ast`` (every import, including those inside functions), so a lazy
import cannot slip past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_perft"
TOOLS = ("demo", "evaluation", "hub", "monitor", "pilot", "selection", "workflow")
WIRING = ("__init__.py", "patches.py")
"""The package root and the patches it installs: they wire the core, the tools and the layouts together."""
CORE_MODULES = sorted(
    path for path in PACKAGE.rglob("*.py") if path.relative_to(PACKAGE).parts[0] not in TOOLS + WIRING + ("cli",)
)


def module_name(path: Path) -> str:
    parts = ["peft_perft", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the peft_perft modules one file imports (relative imports resolved)."""
    return {name for name in all_imports(path) if name == "peft_perft" or name.startswith("peft_perft.")}


def all_imports(path: Path) -> set[str]:
    """Absolute names of every module one file imports, peft_perft's and others' (relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = node.module if node.level == 0 else ".".join(filter(None, [base, node.module]))
            submodules = {f"{module}.{alias.name}" for alias in node.names} & ALL_MODULES
            # ``from . import terms`` imports the module terms, not the package's names.
            names |= submodules | ({module} if len(submodules) < len(node.names) else set())
    return names


ALL_MODULES = {module_name(path) for path in PACKAGE.rglob("*.py")}


def tool_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in TOOLS else None


def test_the_tree_has_no_flat_module_families() -> None:
    """No top-level module shares a name prefix with another one (families live in subpackages)."""
    top = [path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"]
    prefixes = [name.split("_")[0] for name in top]
    assert sorted(prefixes) == sorted(set(prefixes)), f"flat module family at the top of peft_perft: {top}"
    assert {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").exists()} >= set(TOOLS)


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_core_imports_no_tool(path: Path) -> None:
    tools = sorted(name for name in imported_modules(path) if tool_of(name))
    assert not tools, f"{path.relative_to(PACKAGE)} is core and imports tools: {tools}"


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_use_each_other_through_public_faces(tool: str) -> None:
    """Inside a tool anything goes; another tool is imported only as ``peft_perft.<tool>``, its ``__init__``."""
    reaching_in = []
    for path in sorted((PACKAGE / tool).rglob("*.py")):
        for name in imported_modules(path):
            other = tool_of(name)
            if other and other != tool and name != f"peft_perft.{other}":
                reaching_in.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not reaching_in, "\n".join(reaching_in)


DISTRIBUTED = ("peft_perft.parallel", "torch.distributed", "transformers.distributed")
"""The distributed code: PERFT's layouts, and the engines they build on."""


def path_of(module: str) -> Path:
    relative = Path(*module.split(".")[1:])
    package = PACKAGE / relative / "__init__.py"
    return package if package.exists() else (PACKAGE / relative).with_suffix(".py")


def reached_from(module: str) -> set[str]:
    """The peft_perft modules ``module`` imports, directly or through others (a subpackage's ``__init__``
    included; not the package root, which wires everything together and which Python runs before any of them)."""
    reached, pending = set(), [module]
    while pending:
        current = pending.pop()
        if current in reached or current not in ALL_MODULES or current == "peft_perft":
            continue
        reached.add(current)
        pending += imported_modules(path_of(current))
        pending += [current.rsplit(".", 1)[0]] if current.count(".") > 1 else []
    return reached


def is_distributed(module: str) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in DISTRIBUTED)


def test_the_block_imports_nothing_distributed() -> None:
    """The core block (`layer.py`) and everything it imports read as one process: the parallel layouts wrap it."""
    reached = reached_from("peft_perft.layer")
    distributed = sorted(
        f"{module} imports {name}"
        for module in reached
        for name in all_imports(path_of(module))
        if is_distributed(name)
    )
    assert not distributed, "\n".join(distributed)
    assert {"peft_perft.terms", "peft_perft.dispatch", "peft_perft.dispatch.in_experts"} <= reached


def test_only_the_tuner_reaches_the_parallel_layouts() -> None:
    """`parallel` depends on the core; of the core, only the tuner model (which places each adapter) imports it,
    and the patches module installs its save and expert-parallel hooks."""
    importers = {
        module_name(path)
        for path in CORE_MODULES
        if module_name(path).split(".")[1] != "parallel"
        and any(name.startswith("peft_perft.parallel") for name in imported_modules(path))
    }
    assert importers == {"peft_perft.model"}
    assert any(name.startswith("peft_perft.parallel.") for name in imported_modules(PACKAGE / "patches.py"))


def test_the_checks_see_real_imports() -> None:
    """The import reader finds a known cross-tool import, so the checks above cannot pass vacuously."""
    assert "peft_perft.workflow" in imported_modules(PACKAGE / "pilot" / "run.py")
    assert "peft_perft.layer" in imported_modules(PACKAGE / "monitor" / "adapted_layers.py")


LAYERS = (
    ("the core block", lambda parts: True),
    ("the parallel layouts", lambda parts: parts[:1] == ["parallel"]),
    ("the tuner model", lambda parts: parts == ["model"]),
    ("the tools and their command line", lambda parts: parts[:1] and parts[0] in (*TOOLS, "cli")),
    ("the wiring (package root and patches)", lambda parts: parts in ([], ["patches"])),
)
"""From the bottom up; a module belongs to the highest layer whose rule it matches."""


def layer_of(module: str) -> int:
    parts = module.split(".")[1:]
    return max(index for index, (_, matches) in enumerate(LAYERS) if matches(parts))


def test_no_module_imports_one_above_it() -> None:
    """Imports point down the layers: nothing imports the package root (the wiring that installs the patches),
    the tools are imported by no core or parallel module, the tuner model by no layout."""
    upward = [
        f"{module_name(path)} ({LAYERS[layer_of(module_name(path))][0]}) imports {name} ({LAYERS[layer_of(name)][0]})"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name in imported_modules(path)
        if name in ALL_MODULES and layer_of(name) > layer_of(module_name(path))
    ]
    assert not upward, "\n".join(upward)


def test_nothing_inside_imports_the_package_root() -> None:
    importers = [module_name(path) for path in PACKAGE.rglob("*.py") if "peft_perft" in imported_modules(path)]
    assert importers == []


@pytest.mark.parametrize(("tool", "other"), [("demo", "pilot"), ("pilot", "demo")])
def test_demo_and_pilot_do_not_import_each_other(tool: str, other: str) -> None:
    """They share pieces through `peft_perft.workflow`, not through each other, directly or through a third."""
    reached = set().union(*(reached_from(module_name(path)) for path in (PACKAGE / tool).rglob("*.py")))
    assert sorted(name for name in reached if tool_of(name) == other) == []
    assert "peft_perft.workflow" in reached
