"""The import rules of docs/architecture (README "Layout"), checked on the source itself.

Layers, lowest first: `lora_core` (plain PyTorch) < base modules < stage packages and `ops` <
drivers. Each layer imports only layers below it (and itself); stage packages never import each
other, what one stage needs from another arrives as an argument; nothing imports the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE = {"artifacts", "config", "storage", "prepared", "models", "heads", "collate", "adapters", "lease",
        "devices", "token_tags", "registry_root", "shards", "gguf_llama", "config_yaml"}
STAGES = {"prepare", "train", "evaluate", "registry"}
DRIVERS = {"cli", "dag", "pipeline", "preview", "report", "retrain", "tracking", "tune"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for root in ("workflows", "lora_core"):
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules `path` imports (`from x import y` also counts x.y, in case y is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative, inside lora_core
            package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-node.level])
            out.add(f"{package}.{node.module}" if node.module else package)
    return out


def unit(module: str) -> str:
    """The architectural unit of a project module: `lora_core`, a base module, a stage package, `ops`
    or a driver (the second segment of workflows.x.y)."""
    parts = module.split(".")
    return "lora_core" if parts[0] == "lora_core" else parts[1] if len(parts) > 1 else "workflows"


MODULES = modules()


def project_imports(name: str, top_level_only: bool = False) -> set[str]:
    return {m for m in imports(MODULES[name], top_level_only) if m in MODULES}


def test_the_top_level_of_workflows_holds_only_drivers_base_modules_and_stage_packages():
    top = {p.stem if p.is_file() else p.name for p in (REPO / "workflows").iterdir()
           if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "__init__.py"}
    assert top == BASE | STAGES | DRIVERS | {"ops"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_layer_imports_only_the_layers_below_it(name):
    me = unit(name)
    allowed = {"lora_core"} if me == "lora_core" else \
        {"lora_core", "workflows"} | BASE if me in BASE else \
        {"lora_core", "workflows", me} | BASE if me in STAGES | {"ops"} else \
        {"lora_core", "workflows", "ops"} | BASE | STAGES | DRIVERS - {"cli"} | ({"cli"} if me == "cli" else set())
    wrong = sorted(m for m in project_imports(name) if unit(m) not in allowed)
    assert not wrong, f"{name} ({me}) imports {wrong}"


def test_lora_core_imports_neither_ray_nor_workflows():
    for name, path in MODULES.items():
        if name.startswith("lora_core"):
            bad = {m for m in imports(path) if m.split(".")[0] in ("ray", "workflows")}
            assert not bad, f"{name} imports {bad}"


def test_base_modules_do_not_import_ray_at_import_time():
    for name, path in MODULES.items():
        if unit(name) in BASE:
            assert not {m for m in imports(path, top_level_only=True) if m.split(".")[0] == "ray"}, name


def test_no_import_cycles():
    graph = {n: {m for m in project_imports(n, top_level_only=True) if m != n} for n in MODULES}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_file_is_over_400_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]}: {lines} lines"
