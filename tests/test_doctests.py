"""Every docstring example of ``satm_jax`` runs and prints what it shows.

The modules are found, not listed: any ``satm_jax`` module whose source holds a ``>>>`` example
is tested, so a new module's examples join the suite by themselves.
"""

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import satm_jax
from tests.helpers import slow_cases

PACKAGE = Path(satm_jax.__file__).parent

# Examples that build, train or differentiate a network run op by op (every primitive compiled
# on its own): about 10 s each on a quiet core, minutes on a shared one.
SLOW = {"evaluate", "matching", "models"}


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(satm_jax.__path__, prefix="satm_jax."):
        name = info.name.removeprefix("satm_jax.")
        path = PACKAGE / f"{name.replace('.', '/')}.py"
        if path.is_file() and ">>>" in path.read_text():
            names.append(name)
    return sorted(names)


MODULES = _modules_with_examples()


@pytest.mark.parametrize("name", slow_cases(MODULES, SLOW))
def test_docstring_examples_run(name):
    module = importlib.import_module(f"satm_jax.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result


def test_the_documented_modules_are_all_found():
    documented = {
        "augment",
        "baselines",
        "convergence",
        "corruptions",
        "datasets.registry",
        "evaluate",
        "experiment.continual",
        "expert_store",
        "experts",
        "flatness",
        "initial_set",
        "jsonio",
        "matching",
        "model_registry",
        "models",
        "outputs",
        "parallel",
        "scale_free",
        "sharpness",
        "step_size",
        "zca",
    }
    assert documented <= set(MODULES), documented - set(MODULES)
    assert SLOW <= set(MODULES)
