"""The shape of the code: small files, short functions, imports that run one way.

- no Python file over 600 lines;
- no function over 60 lines without a `# long:` comment (by its docstring) saying why;
- no import cycle between lib's modules, function-level imports included;
- the packages' imports run one way: storage <- extract <- output <- inspect, job, cli;
- nothing in the library's core imports the benchmark or the sample builder.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 60
# A package may import those on its left, never those on its right (lib/config.py, errors.py,
# faults.py and overlap.py are below all of them).
LAYERS = ["storage", "extract", "output", "inspect", "job", "commands", "cli"]
APART = ("lib.bench", "lib.sample")  # built on the library; the library never imports them


def python_files() -> list[Path]:
    return sorted(p for top in ("lib", "jobs", "tests") for p in (ROOT / top).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The lib modules `path` imports anywhere in it (a `from lib.x import y` of a module y
    counts as lib.x.y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lib")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lib"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_no_file_over_600_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in python_files()
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert long == {}


def test_no_function_over_60_lines_without_a_reason():
    found = []
    for path in python_files():
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                head = "\n".join(lines[node.lineno - 1 : node.lineno + 25])
                if length > MAX_FUNCTION_LINES and "# long:" not in head:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {length}")
    assert found == []


def graph() -> dict[str, set[str]]:
    """lib module -> the lib modules it imports."""
    modules = {module_name(p): p for p in (ROOT / "lib").rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules} for name, path in modules.items()}


def test_no_import_cycle_even_inside_functions():
    edges = graph()
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_packages_import_one_way():
    wrong = []
    for module, targets in graph().items():
        here = _layer(module)
        if here is None:
            continue
        for target in targets:
            there = _layer(target)
            if there is not None and there > here:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_the_core_never_imports_the_benchmark_or_the_sample():
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        if not module.startswith(APART) and module != "lib.commands.sample"
        for target in targets
        if target.startswith(APART) and module != "lib.cli"
    ]
    assert wrong == []
