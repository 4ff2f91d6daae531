"""The package layout's rules, checked on the source (docs/architecture.md draws them):

- each package imports only the packages its row of ALLOWED names (module-level imports;
  a function-local import of a shardline module is refused outright, so no rule or cycle
  can hide behind one);
- no import cycle between shardline modules;
- no Python module over 500 lines, no function over 100, no native source over 700;
- every package has a docstring saying what it owns;
- the scheduler and the client import no torch (the tokenizer does, through transformers).
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "services" / "shardline"

# package -> the shardline packages its modules may import (besides itself and the generated v1)
ALLOWED = {
    "protocol": set(),
    "common": set(),
    "models": {"common"},
    "transforms": {"models", "common"},
    "backends": {"models", "transforms", "common"},
    "worker": {"protocol", "common", "models", "transforms", "backends"},
    "tools": {"common", "models", "transforms", "backends", "worker"},
    "scheduler": {"protocol", "common"},
    "tokenizer": {"common"},
    "client": {"common"},
    # the command line and `shardline up` start every service: they may name their configs
    "cli": set(),
    "__main__": {"cli"},
    "launcher": {"common", "client", "worker.config", "scheduler.config", "tokenizer.config"},
}
# modules an allowed package may still not import: torch-free processes must not pull torch in
NO_TORCH_ROOTS = ["shardline.scheduler.server", "shardline.client",
                  "shardline.client.generate_cmd", "shardline.client.profile_cmd",
                  "shardline.protocol.plan",
                  "shardline.launcher"]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if "v1" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _imports(tree: ast.Module, module: str, top_level_only: bool):
    """(lineno, imported shardline module) for the module's imports."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + [node.module])
            if base.startswith("shardline"):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    yield node.lineno, sub if sub in MODULES else base
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("shardline"):
                    yield node.lineno, alias.name


def _trees():
    return {m: ast.parse(p.read_text(), str(p)) for m, p in MODULES.items()}


TREES = _trees()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, tree in TREES.items():
        graph[module] = {target for _, target in _imports(tree, module, True)
                         if target in MODULES and target != module}
    return graph


def test_packages_import_only_what_their_rule_allows():
    bad = []
    for module, tree in TREES.items():
        pkg = _package(module)
        if pkg == "" or pkg not in ALLOWED:
            if module.count(".") >= 1:
                bad.append(f"{module}: package {pkg!r} has no rule in ALLOWED")
            continue
        for line, target in _imports(tree, module, True):
            if target.startswith("shardline.v1"):
                continue
            tpkg = _package(target)
            if tpkg == pkg:
                continue
            allowed = ALLOWED[pkg]
            sub = ".".join(target.split(".")[1:3])
            if tpkg not in allowed and sub not in allowed:
                bad.append(f"{MODULES[module].relative_to(ROOT.parent)}:{line} imports {target}")
    assert not bad, "imports that break the layout's rules:\n" + "\n".join(bad)


def test_no_function_local_imports_of_shardline_modules():
    bad = []
    for module, tree in TREES.items():
        top = {id(n) for n in tree.body}
        # module-level optional imports (try: import x / except ImportError) count as top level
        top |= {id(n) for t in tree.body if isinstance(t, ast.Try) for n in t.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                for line, target in _imports(ast.Module(body=[node], type_ignores=[]), module,
                                             True):
                    bad.append(f"{MODULES[module].relative_to(ROOT.parent)}:{line} {target}")
    assert not bad, "function-local imports of shardline modules:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_module_and_function_sizes():
    bad = []
    for module, path in MODULES.items():
        lines = path.read_text().count("\n")
        if lines > 500:
            bad.append(f"{path.relative_to(ROOT.parent)}: {lines} lines (> 500)")
        for node in ast.walk(TREES[module]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}: "
                               f"{n} lines (> 100)")
    native = [p for ext in ("*.cpp", "*.h", "*.cu") for p in ROOT.rglob(ext)]
    assert native, "the CPU kernels' sources were not found"
    for path in native:
        lines = path.read_text().count("\n")
        if lines > 700:
            bad.append(f"{path.relative_to(ROOT.parent)}: {lines} lines (> 700)")
    assert not bad, "\n".join(bad)


def test_every_package_says_what_it_owns():
    missing = [m for m, p in MODULES.items() if p.name == "__init__.py" and m != "shardline"
               and not ast.get_docstring(TREES[m])]
    assert not missing, f"packages without a docstring: {missing}"


@pytest.mark.parametrize("module", NO_TORCH_ROOTS)
def test_torch_free_processes_import_no_torch(module):
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules)\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "", f"importing {module} loaded {out}"
