"""The package's shape: no import circle, kernels below the algorithms, rooms that keep to their
job, every module importable first, a trainer that knows no mode.

The import graph is read from the source (every ``import`` statement, including those under
``TYPE_CHECKING`` and inside functions: a circle a type checker follows is still a circle for the
reader). ``from pkg import sub`` where ``sub`` is a module is an edge to the module only, as
import-linter counts it; importing a submodule does not count as importing its package's
``__init__``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
KERNELS = ("ltta.corruptions", "ltta.transforms", "ltta.models")
ALGORITHMS = ("ltta.tta", "ltta.predictor", "ltta.training", "ltta.search", "ltta.evaluation", "ltta.stages")
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


def _edges(graph: dict[str, set[str]], source: str, target: str) -> set[str]:
    """``module -> imported`` for every import from package ``source`` into package ``target``."""
    return {
        f"{m} -> {t}" for m, targets in graph.items() if _under(m, (source,))
        for t in targets if _under(t, (target,))
    }  # fmt: skip


def test_the_predictor_room_reads_only_the_candidates_from_tta() -> None:
    """Learning to rank needs what a candidate is, never a test-time method: the methods sit above
    the predictor (``learned`` and ``feat_pick`` run it through its scoring), the candidates below."""
    assert _edges(import_graph(SRC), "ltta.predictor", "ltta.tta") <= {
        f"{m} -> ltta.tta.candidates" for m in modules(SRC) if _under(m, ("ltta.predictor",))
    }


def test_the_methods_run_the_predictor_only_through_its_scoring() -> None:
    """A TTA method consults a trained predictor; training one is the predictor room's business."""
    bad = {e for e in _edges(import_graph(SRC), "ltta.tta", "ltta.predictor") if not e.endswith("-> ltta.predictor.scoring")}
    assert bad == set()


def test_the_two_trainers_keep_to_their_rooms() -> None:
    """The target's trainer (``training``) and the predictor's (``predictor``) share only the kernels
    and ``ltta.checkpoint``; neither imports the other."""
    graph = import_graph(SRC)
    assert _edges(graph, "ltta.training", "ltta.predictor") | _edges(graph, "ltta.predictor", "ltta.training") == set()


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """No import order hides a half-made module: each module of the package is imported as the first
    ``ltta`` module of the process (third-party imports stay cached between them, so this is quick).
    The graph above has no circle, but packages can still point at each other (``tta`` <->
    ``predictor``), and only running the imports shows that every entry point works."""
    names = sorted(m for m in modules(SRC) if m != "ltta.__main__")
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'ltta' or m.startswith('ltta.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


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
