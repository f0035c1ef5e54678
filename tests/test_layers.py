"""The package's one-way flow: cli and bench on top, then stages/, then everything else.

Nothing below `stages/` imports `stages/` (the loader layer, gendd_deploy/loaders.py, is how the deploy
side reads artifacts), and `serve/` imports no training code. Imports under `if TYPE_CHECKING:`
run for type checkers only and are not counted.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "gendd_deploy"
ABOVE_STAGES = {"cli.py", "__main__.py", "bench", "stages"}  # may import stages/
TRAINING = ("gendd_deploy.stages", "gendd_deploy.training", "gendd_deploy.dist")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth, outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def _modules(where: Path):
    return sorted(p for p in where.rglob("*.py"))


def _offenders(files, forbidden) -> list[str]:
    return [
        f"{p.relative_to(PKG.parent)}:{line} imports {mod}"
        for p in files
        for line, mod in _imports(p)
        if any(mod == f or mod.startswith(f + ".") for f in forbidden)
    ]


def test_nothing_below_stages_imports_stages():
    below = [p for p in _modules(PKG) if p.relative_to(PKG).parts[0] not in ABOVE_STAGES]
    assert below, "no modules found below stages/"
    assert _offenders(below, ("gendd_deploy.stages",)) == []


def test_serve_imports_no_training_code():
    assert _offenders(_modules(PKG / "serve"), TRAINING) == []


@pytest.mark.parametrize("source, caught", [
    ("from gendd_deploy.stages.export import x\n", True),
    ("def f():\n    import gendd_deploy.stages.base\n", True),
    ("from gendd_deploy import stages\n", True),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gendd_deploy.stages.base import Context\n", False),
    ("from gendd_deploy.loaders import load_student\n", False),
])
def test_the_check_sees_imports_at_any_depth(tmp_path, source, caught):
    p = tmp_path / "m.py"
    p.write_text(source)
    got = [mod for _, mod in _imports(p) if mod == "gendd_deploy.stages" or mod.startswith("gendd_deploy.stages.")]
    assert bool(got) == caught


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at any depth (an import inside a function to dodge
    a circle is still a circle). `from pkg import name` counts pkg, and pkg.name when that is a module."""
    files = {_module_name(p): p for p in _modules(PKG)}
    return {name: {mod for _, mod in _imports(path) if mod in files and mod != name} for name, path in files.items()}


def test_no_import_circle_anywhere_in_the_package():
    graph = _import_graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
