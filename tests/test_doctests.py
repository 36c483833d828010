"""The docstring examples of the outer-loop modules run and print what they show."""

import doctest

import pytest

from satm_jax import convergence, scale_free, step_size


@pytest.mark.parametrize("module", [convergence, scale_free, step_size])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
