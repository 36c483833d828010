"""The library's import graph: no cycle (lazy imports inside functions included), and nothing
in ``satm_jax`` imports the experiments."""

import ast
from pathlib import Path

import satm_jax

PACKAGE = Path(satm_jax.__file__).parent


def _imports(path: Path) -> set[str]:
    """``satm_jax`` modules ``path`` imports, anywhere in the file, and other top-level names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "satm_jax" and len(parts) > 1 and (PACKAGE / f"{parts[1]}.py").exists():
                out.add(parts[1])
            elif parts[0] != "satm_jax":
                out.add(parts[0])
    return out


def graph() -> dict[str, set[str]]:
    mods = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {m: {d for d in _imports(p) if d in mods and d != m} for m, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(g[n]):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_import_graph_has_no_cycle():
    assert find_cycle(graph()) is None


def test_the_library_never_imports_the_experiments_or_the_tests():
    for p in PACKAGE.glob("*.py"):
        assert not {"experiments", "tests"} & _imports(p), p.name


# The orchestration layer: presets and run configs, the pipeline, the continual protocol. The
# numerical core and the data/model/storage modules below it never import it.
ORCHESTRATION = {"configs", "pipeline", "continual"}


def test_nothing_below_the_orchestration_layer_imports_it():
    g = graph()
    offenders = {m: sorted(d & ORCHESTRATION) for m, d in g.items() if m not in ORCHESTRATION}
    assert not {m: d for m, d in offenders.items() if d}
