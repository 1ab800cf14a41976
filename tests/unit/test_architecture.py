"""The house plan holds (docs/architecture.md): imports run one way, stages never import each other,
no import circle, no private name used across modules, no two public things share a name."""

from __future__ import annotations

import ast
import collections
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]  # the repository
PACKAGE = ROOT / "raydistill"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text())
    return out


def test_import_linter_contracts_are_kept():
    """pyproject.toml's [tool.importlinter]: the layers contract and the stages' independence."""
    run = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                          "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 kept, 0 broken" in run.stdout


def test_no_import_circle_between_modules():
    graph = grimp.build_graph("raydistill")
    modules = sorted(graph.modules)
    edges = {m: graph.find_modules_directly_imported_by(m) & set(modules) for m in modules}
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for nxt in sorted(edges[module]):
            if state.get(nxt) == 1:
                return [*path, module, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, module])):
                return cycle
        state[module] = 2
        return None

    for module in modules:
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle)


def test_no_private_name_is_imported_from_another_module():
    found = [(module, node.module, alias.name)
             for module, tree in _modules().items() for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("raydistill")
             for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert found == []


def test_no_two_modules_define_the_same_public_name():
    where = collections.defaultdict(list)
    for module, tree in _modules().items():
        for node in tree.body:
            names = [node.name] if isinstance(node, (ast.ClassDef, ast.FunctionDef)) else []
            if isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name) and t.id.isupper()]
            where.update({n: [*where[n], module] for n in names if not n.startswith("_")})
    assert {n: ms for n, ms in where.items() if len(ms) > 1} == {}


def test_the_tree_has_the_documented_top_level_packages():
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert packages == ["config", "contracts", "io", "models", "recipes", "runtime", "stages"]
    stages = sorted(p.name for p in (PACKAGE / "stages").iterdir() if (p / "__init__.py").exists())
    assert stages == ["capture", "evaluate", "select", "train"]
    documented = (ROOT / "docs" / "architecture.md").read_text()
    for module in _modules():
        relative = module.removeprefix("raydistill.").replace(".", "/")
        if not module.endswith("__main__") and module != "raydistill":
            assert f"`{relative}" in documented, f"docs/architecture.md has no line for {module}"
