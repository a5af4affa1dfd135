"""Loss functions that also mark the model output, for the sampled ("true") Fisher.

Each computes an ordinary mean loss. Inside :func:`value_grad_and_stats` with
``fisher="sampled"``, it also tells the capture which array is the model's output and which
predictive distribution it parametrises, so that output gradients can be taken with targets
sampled from the model instead of the training labels.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Literal

import jax
import jax.numpy as jnp
import optax

Distribution = Literal["categorical", "bernoulli", "gaussian"]

# The recorders of the captures being traced in this thread: innermost last.
_LOCAL = threading.local()


def _recorders() -> list[list[tuple[str, jax.Array]]]:
  if not hasattr(_LOCAL, "recorders"):
    _LOCAL.recorders = []
  return _LOCAL.recorders


@contextlib.contextmanager
def recording_outputs() -> Iterator[list[tuple[str, jax.Array]]]:
  """Collects the ``(distribution, output)`` pairs that the loss helpers mark while active."""
  marks: list[tuple[str, jax.Array]] = []
  _recorders().append(marks)
  try:
    yield marks
  finally:
    _recorders().pop()


def _mark(distribution: Distribution, output: jax.Array) -> None:
  if _recorders():
    _recorders()[-1].append((distribution, output))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels; marks ``logits`` as a categorical output.

  Args:
    logits: ``[..., num_classes]``.
    labels: ``[...]`` integer class indices.

  Returns:
    The cross-entropy averaged over every leading position.
  """
  _mark("categorical", logits)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Multi-label sigmoid cross-entropy; marks ``logits`` as independent Bernoulli outputs.

  Args:
    logits: ``[..., num_labels]``.
    labels: ``[..., num_labels]`` targets in ``[0, 1]``.

  Returns:
    The cross-entropy summed over the last axis and averaged over the leading positions.
  """
  _mark("bernoulli", logits)
  return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1).mean()


def squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """``0.5 |y - t|^2``, the negative log-likelihood of a unit-variance Gaussian (up to a constant);
  marks ``predictions`` as its mean.

  Args:
    predictions: ``[..., features]``.
    targets: ``[..., features]``.

  Returns:
    The squared error summed over the last axis and averaged over the leading positions.
  """
  _mark("gaussian", predictions)
  return 0.5 * jnp.sum((predictions - targets) ** 2, axis=-1).mean()


def sampled_output_gradient(
    distribution: Distribution, output: jax.Array, key: jax.Array
) -> jax.Array:
  """``dL/dz`` of the marked loss with targets drawn from the model's predictive distribution.

  ``L`` is the same mean over leading positions as the loss helpers compute, so the gradient
  carries the same ``1/N`` as the real one.
  """
  output = jax.lax.stop_gradient(output).astype(jnp.float32)
  count = math.prod(output.shape[:-1])
  if distribution == "categorical":
    sampled = jax.random.categorical(key, output, axis=-1)
    one_hot = jax.nn.one_hot(sampled, output.shape[-1], dtype=output.dtype)
    grad = jax.nn.softmax(output, axis=-1) - one_hot
  elif distribution == "bernoulli":
    probabilities = jax.nn.sigmoid(output)
    sampled = jax.random.bernoulli(key, probabilities).astype(output.dtype)
    grad = probabilities - sampled
  elif distribution == "gaussian":
    grad = -jax.random.normal(key, output.shape, output.dtype)  # y - t with t = y + noise
  else:
    raise ValueError(f"Unknown output distribution {distribution!r}.")
  return grad / count
