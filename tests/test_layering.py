"""The shape of the code: no import cycles, the torch-free layers stay torch-free, functions stay short."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tierlm"
MAX_FUNCTION_LINES = 80
LONG_MARK = "# long:"  # on the line before a longer function: why it is one piece


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """tierlm modules imported anywhere in ``path`` (module level and inside functions alike)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != "tierlm":
                out.add(t)
    return out


def test_no_import_cycles():
    mods = _modules()
    edges = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    # Tarjan's strongly connected components; any of more than one module is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for m in mods:
        if m not in index:
            visit(m)
    assert cycles == []


def test_bookkeeping_and_configuration_do_not_import_torch():
    """engine/ is request bookkeeping; the config, the flags and the CLI parse before torch loads."""
    torch_free = ["tierlm.config", "tierlm.engine_args", "tierlm.cli", "tierlm.engine.scheduler",
                  "tierlm.engine.engine", "tierlm.engine.block_manager", "tierlm.engine.budget",
                  "tierlm.sampling_params", "tierlm.memory.plan"]
    code = "import sys\n" + "".join(f"import {m}\n" for m in torch_free) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_functions_are_short_or_say_why():
    long = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                size = node.end_lineno - first + 1
                if size > MAX_FUNCTION_LINES and LONG_MARK not in lines[first - 2]:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({size} lines)")
    assert long == []
