"""The README's commands and code stay true."""

import contextlib
import io
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_readme_optax_example_trains_a_classifier():
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {})
    acc = float(re.search(r"test accuracy ([0-9.]+)", out.getvalue()).group(1))
    assert acc > 0.85, out.getvalue()


def test_readme_has_exactly_the_two_setup_commands_and_ci_runs_the_test_one():
    shell_blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert shell_blocks[:2] == [
        "pip install -e . && python -m experiments.run\n",
        'pip install -e ".[test]" && python -m pytest -q -n 2 tests\n',
    ]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert 'pip install --quiet -e ".[test]"' in ci and "python -m pytest -q -n 2 tests" in ci
