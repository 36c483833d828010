"""The library's import graph: no cycle (lazy imports inside functions included), and nothing
in ``satm_jax`` imports the experiments."""

import ast
from pathlib import Path

import satm_jax

PACKAGE = Path(satm_jax.__file__).parent


def _module_name(path: Path) -> str:
    """``satm_jax/experiment/configs.py`` -> ``experiment.configs``; a package's
    ``__init__.py`` -> the package (``""`` for ``satm_jax`` itself)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(dotted: str) -> str | None:
    """The library module an absolute import names (longest prefix that is one)."""
    parts = dotted.split(".")[1:]
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


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
            if n.split(".")[0] != "satm_jax":
                out.add(n.split(".")[0])
            elif (m := _resolve(n)) is not None:
                out.add(m)
    return out


def graph() -> dict[str, set[str]]:
    mods = {m: p for m, p in MODULES.items() if p.name != "__init__.py"}
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
    for p in PACKAGE.rglob("*.py"):
        assert not {"experiments", "tests"} & _imports(p), p


# The orchestration layer, ``satm_jax.experiment``: presets and run configs, the pipeline, the
# continual protocol. The numerical core and the data/model/storage modules never import it.
ORCHESTRATION = "experiment"


def test_the_orchestration_layer_is_its_own_package():
    layer = {m for m in MODULES if m.split(".")[0] == ORCHESTRATION}
    assert {"experiment.configs", "experiment.pipeline", "experiment.continual"} <= layer


def test_nothing_below_the_orchestration_layer_imports_it():
    offenders = {}
    for m, p in MODULES.items():
        if m.split(".")[0] == ORCHESTRATION:
            continue
        bad = sorted(d for d in _imports(p) if d.split(".")[0] == ORCHESTRATION)
        if bad:
            offenders[m] = bad
    assert not offenders
