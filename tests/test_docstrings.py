"""The Examples sections of the public docstrings run and print what they say."""

import doctest

import pytest

from tkfac_jax import _alias
from tkfac_jax import _capture
from tkfac_jax import _diagnostics
from tkfac_jax import _multi_steps
from tkfac_jax import _train_state
from tkfac_jax import _transform


@pytest.mark.parametrize(
    "module",
    [_alias, _capture, _diagnostics, _multi_steps, _train_state, _transform],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{module.__name__} has no examples to run"
  assert result.failed == 0
