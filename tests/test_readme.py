"""The README's commands and code stay true."""

import contextlib
import io
import os
import re

import jax
import pytest

from tests.helpers import ROOT, read_text

README = read_text(os.path.join(ROOT, "README.md"))


@pytest.mark.slow
def test_readme_optax_example_trains_a_classifier():
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    out = io.StringIO()
    # The block is user code: it runs as users run it, with JAX's default (NumPy-style) rank
    # promotion. The suite's strict setting guards the library, not the README's `x @ w1 + b1`.
    with contextlib.redirect_stdout(out), jax.numpy_rank_promotion("allow"):
        exec(compile(block, "README.md", "exec"), {})
    acc = float(re.search(r"test accuracy ([0-9.]+)", out.getvalue()).group(1))
    assert acc > 0.85, out.getvalue()


def test_readme_has_exactly_the_two_setup_commands_and_ci_runs_the_test_one():
    shell_blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert shell_blocks[:2] == [
        "pip install -e . && python -m experiments.run\n",
        'pip install -e ".[test]" && python -m pytest -q -n 2 tests\n',
    ]
    ci = read_text(os.path.join(ROOT, ".ci", "run"))
    assert 'pip install --quiet -e ".[test]"' in ci and "python -m pytest -q -n 2 tests" in ci
