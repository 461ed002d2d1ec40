"""Rules for the package's shape, enforced: no import cycles, no module over 600 lines, no two
modules or packages whose names differ by one letter.

The import graph is read from the source (``ast``), not from ``sys.modules``: every import
counts, at module level, inside functions (lazy imports) and under ``TYPE_CHECKING``, because
each of those is a dependency a reader has to follow, and a lazy import is how a cycle usually
hides.
"""

import ast
import itertools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rlmt_megatron"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import name`` counts as importing
    ``pkg.name`` when that is a module, else ``pkg``)."""

    def owner(dotted: str):
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = anchor + ("." + node.module if node.module else "")
                targets = [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                if target.startswith(PACKAGE.name):
                    dep = owner(target)
                    if dep is not None and dep != name:
                        graph[name].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge found by depth-first search (empty when the graph is a DAG)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_cycle_finder_sees_cycles_and_the_graph_sees_lazy_imports():
    # The finder itself, on graphs written out by hand.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    # The graph on this package: a module-level import, a lazy one inside a function, and
    # ``from package import module``.
    graph = _import_graph(_modules())
    assert "rlmt_megatron.trainer.updates" in graph["rlmt_megatron.trainer.loop"]
    assert "rlmt_megatron.runner.logprobs" in graph["rlmt_megatron.runner.forward_only"]  # inside a function
    assert "rlmt_megatron.rollout.weight_sync.fp8" in graph["rlmt_megatron.trainer.roles"]


def test_the_package_has_no_import_cycle():
    cycles = _cycles(_import_graph(_modules()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_is_longer_than_600_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def _one_letter_apart(a: str, b: str) -> bool:
    """Levenshtein distance exactly 1 (one letter added, removed or changed)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


@pytest.mark.parametrize("a, b, apart", [("layout", "layouts", True), ("trainer", "training", False),
                                         ("config", "config", False), ("rows", "roles", False),
                                         ("stop", "step", True)])
def test_one_letter_apart(a, b, apart):
    assert _one_letter_apart(a, b) == apart


def test_no_two_module_or_package_names_differ_by_one_letter_or_share_a_stem():
    names = sorted({p.stem for p in PACKAGE.rglob("*.py") if p.stem != "__init__"}
                   | {p.name for p in PACKAGE.rglob("*") if p.is_dir() and (p / "__init__.py").exists()})
    close = [(a, b) for a, b in itertools.combinations(names, 2) if _one_letter_apart(a, b)]
    assert not close, f"module/package names one letter apart: {close}"
    # trainer/training-style pairs: one name the other's stem plus a suffix
    stems = [(a, b) for a, b in itertools.permutations(names, 2)
             if len(a) >= 5 and b.startswith(a[:-1]) and b != a and b[len(a) - 1:] in ("ing", "er", "s", "ings", "ers")]
    assert not stems, f"look-alike module/package names: {stems}"
