"""The package's shape: no import circle, kernels below the algorithms, a trainer that knows no mode.

The import graph is read from the source (every ``import`` statement, including those under
``TYPE_CHECKING`` and inside functions: a circle a type checker follows is still a circle for the
reader). ``from pkg import sub`` where ``sub`` is a module is an edge to the module only, as
import-linter counts it; importing a submodule does not count as importing its package's
``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
KERNELS = ("ltta.corruptions", "ltta.transforms", "ltta.models")
ALGORITHMS = ("ltta.tta", "ltta.training", "ltta.search", "ltta.evaluation", "ltta.stages")
#: "About 400 lines": a module longer than this says in its docstring why it is one piece.
MAX_LINES = 420
ONE_PIECE = "Why one module:"


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    mods = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package[: len(package) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_cycle_finder_sees_a_circle_through_type_checking(tmp_path: Path) -> None:
    """The check below can fail: a circle closed only by a TYPE_CHECKING import is found, and a
    package's __init__ importing its own modules is not taken for one."""
    pkg = tmp_path / "ltta"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from ltta.sub import a, b\n")
    (pkg / "sub" / "a.py").write_text("from ltta.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ltta.sub import a\n")
    assert cycles(import_graph(tmp_path)) == [["ltta.sub.a", "ltta.sub.b"]]
    (pkg / "sub" / "b.py").write_text("thing = 1\n")
    assert cycles(import_graph(tmp_path)) == []


def test_no_import_circle_in_src() -> None:
    assert cycles(import_graph(SRC)) == []


def test_kernels_never_import_the_algorithms() -> None:
    graph = import_graph(SRC)
    bad = sorted(
        f"{m} -> {t}" for m, targets in graph.items() if _under(m, KERNELS)
        for t in targets if _under(t, ALGORITHMS)
    )  # fmt: skip
    assert bad == []


def test_only_the_cli_imports_the_stages() -> None:
    """stages -> library, never back: the library is usable without the pipeline around it."""
    graph = import_graph(SRC)
    bad = sorted(
        f"{m} -> {t}" for m, targets in graph.items() if not _under(m, ("ltta.stages", "ltta.cli"))
        for t in targets if _under(t, ("ltta.stages",))
    )  # fmt: skip
    assert bad == []


@pytest.mark.parametrize("name", sorted(modules(SRC)))
def test_a_long_module_says_why_it_is_one_piece(name: str) -> None:
    path = modules(SRC)[name]
    lines = len(path.read_text().splitlines())
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert ONE_PIECE in doc, f"{path.relative_to(SRC)} has {lines} lines; split it, or say '{ONE_PIECE} ...' in its docstring"


def test_the_trainer_knows_no_mode_by_name() -> None:
    """Adding a mode touches its module, its registration and its config keys, never the loop."""
    from ltta.training.modes import TRAIN_MODES

    loop = SRC / "ltta" / "training" / "target.py"
    tree = ast.parse(loop.read_text())
    # A mode named in a comparison (``cfg.mode == "augmix"``, ``in ("policy", ...)``) or looked up by name.
    # (getattr(extra_augment, "policy", None) reads the augmentation's attribute, not the mode.)
    named = {
        c.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        or (isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id == "getattr"))
        for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)
    }  # fmt: skip
    assert not named & set(TRAIN_MODES.names())
    for name in TRAIN_MODES.names():
        assert (SRC / "ltta" / "training" / "modes" / f"{name}.py").exists(), name
