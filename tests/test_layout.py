"""The package's shape (issue 13): functions that fit on a screen, imports that point one way.

Every ``import`` in ``src/swav`` counts, also those inside functions (lazy imports): a cycle hidden
in a function is still a cycle for a reader.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "swav"
MAX_FUNCTION_LINES = 100
# no module in these packages may import the trainer (they sit below it)
BELOW_THE_TRAINER = ("swav.eval", "swav.report", "swav.data", "swav.models")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str) -> set[str]:
    """The swav modules that module ``name`` imports, anywhere in its body."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, name, path.name == "__init__.py")
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in MODULES:  # `from swav.x import func` -> swav.x
                t = t.rpartition(".")[0]
            while t and t != name:  # importing swav.a.b also runs swav/a/__init__.py
                found.add(t)
                t = t.rpartition(".")[0]
    return found


def _is_parent_package(a: str, b: str) -> bool:
    """Importing ``swav.data.x`` runs ``swav.data/__init__``: a package and its own modules are not
    counted as a cycle of one another (the package's __init__ re-exports from its modules)."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def import_cycles() -> list[list[str]]:
    graph = {m: {t for t in imports_of(m) if not _is_parent_package(m, t)} for m in MODULES}
    index, low, stack, on_stack, sccs, counter = {}, {}, [], set(), [], [0]

    def connect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in graph:
        if v not in index:
            connect(v)
    return sccs


def long_functions() -> list[str]:
    out = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{name}.{node.name}: {n} lines")
    return out


def test_no_function_is_longer_than_a_screen():
    assert not long_functions(), "functions over 100 lines:\n  " + "\n  ".join(long_functions())


def test_no_import_cycles():
    assert not import_cycles(), f"import cycles (lazy imports count): {import_cycles()}"


@pytest.mark.parametrize("package", BELOW_THE_TRAINER)
def test_nothing_below_the_trainer_imports_it(package):
    offenders = sorted(m for m in MODULES if (m == package or m.startswith(package + "."))
                       and "swav.trainer" in imports_of(m))
    assert not offenders, f"{offenders} import swav.trainer"


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The cycle finder is not vacuous: two modules that import each other are found."""
    pkg = tmp_path / "swav"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from swav import b\n")
    (pkg / "b.py").write_text("from swav.a import f\n")
    monkeypatch.setattr(__import__(__name__), "MODULES", {module_name_in(pkg, p): p for p in pkg.glob("*.py")})
    assert import_cycles() == [["swav.a", "swav.b"]]


def module_name_in(pkg: Path, p: Path) -> str:
    return "swav" if p.stem == "__init__" else f"swav.{p.stem}"


# ---------------------------------------------------------------- backbone families (issue 21)
def _family_words() -> set[str]:
    from swav.models import FAMILIES, list_backbones

    return {f.prefix for f in FAMILIES if f.prefix} | set(list_backbones()) | {"resnet"}


def family_tests_outside_models() -> list[str]:
    """Places outside ``swav.models`` that test a backbone family's name: a comparison with, or a
    ``startswith``/``endswith``/``in`` test against, a family prefix (``timm/``...) or an arch name, and
    imports of the optional libraries (timm, torchvision), which belong inside their family."""
    words, found = _family_words(), []
    for name, path in MODULES.items():
        if name == "swav.models" or name.startswith("swav.models."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            consts = []
            if isinstance(node, ast.Compare):
                consts = [n for n in [node.left, *node.comparators] if isinstance(n, ast.Constant)]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("startswith", "endswith"):
                consts = [n for a in node.args for n in ast.walk(a) if isinstance(n, ast.Constant)]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{name}:{node.lineno} imports {m}" for m in mods if m.split(".")[0] in ("timm", "torchvision")]
            for c in consts:
                if isinstance(c.value, str) and any(c.value == w or c.value.startswith(w) for w in words):
                    found.append(f"{name}:{c.lineno} tests {c.value!r}")
    return found


def test_nothing_outside_models_tests_a_family_name():
    assert not family_tests_outside_models(), "ask swav.models.family_of(arch) instead:\n  " + "\n  ".join(
        family_tests_outside_models())


def test_the_family_name_checker_sees_a_test(tmp_path, monkeypatch):
    pkg = tmp_path / "swav"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def f(arch):\n    return arch.startswith('timm/') or arch == 'resnet50'\n")
    monkeypatch.setattr(__import__(__name__), "MODULES", {module_name_in(pkg, p): p for p in pkg.glob("*.py")})
    assert len(family_tests_outside_models()) == 2
