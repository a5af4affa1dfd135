"""``multi_steps``: gradient accumulation in which every micro-batch's statistics count."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tkfac_jax import _capture
from tkfac_jax import _statistics
from tkfac_jax import _transform
from tkfac_jax import _tree

_MISSING = object()


class MultiStepsState(NamedTuple):
  """State of :func:`multi_steps`.

  Attributes:
    mini_step: micro-steps taken in the current window, from 0 to ``every_k - 1``.
    gradient_step: inner updates taken.
    inner_state: the wrapped optimizer's state.
    grads: running mean of the gradients of the current window.
    statistics: nested dict mirroring ``params``: at each layer's parameter node, the sum of the
      :class:`LayerStatistics` received since they were last handed to the inner optimizer.
    stats_count: how many micro-steps those sums hold.
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  inner_state: Any
  grads: Any
  statistics: Any
  stats_count: jax.Array


def _is_layer_stats(x) -> bool:
  return isinstance(x, _statistics.LayerStatistics)


def multi_steps(
    inner: optax.GradientTransformation, every_k: int
) -> optax.GradientTransformationExtraArgs:
  """Accumulates ``every_k`` micro-batches, gradients *and* statistics, into one TKFAC step.

  ``optax.MultiSteps`` passes ``stats=`` to the inner optimizer on every micro-step but keeps the
  inner state of the last one only, so only the last micro-batch's statistics would count. This
  wrapper averages the statistics of every micro-step of a window, as it does the gradients, and
  calls the inner ``update`` once, on the last micro-step (under ``lax.cond``, so the inverses are
  not recomputed on the others). With equal micro-batches, ``every_k`` micro-steps are then one
  step on the whole batch: statistics and gradients are both per-example means.

  The other micro-steps return zero updates. A micro-step may pass ``stats=None`` (a cadence that
  captures statistics only on some steps): the statistics received are averaged over the
  micro-steps that had them, and are handed over on the next last micro-step that itself passes
  statistics. (A window whose last micro-step passes ``None`` steps with the curvature already in
  the state and keeps the window's statistics for later.)

  Args:
    inner: the optimizer to wrap, for example :func:`tkfac`.
    every_k: micro-steps per update.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes ``stats=`` (and
    passes any other extra arguments to ``inner``).

  Examples:
    >>> import jax.numpy as jnp, tkfac_jax
    >>> tx = tkfac_jax.multi_steps(tkfac_jax.tkfac(0.1), every_k=4)
    >>> state = tx.init({'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}})
    >>> int(state.mini_step)
    0
  """
  if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
    raise ValueError(f"every_k must be a positive int (micro-steps per update), got {every_k!r}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    inner_state = inner.init(params)
    # The inner optimizer's layers, with its shapes (a stack's leading axes included); the other
    # layers of params by their own shapes, as their statistics may still arrive.
    known = {
        path: layer.statistics
        for state in _transform.find_states(inner_state)
        for path, layer in _tree.flatten_with_paths(
            state.layers, is_leaf=lambda x: isinstance(x, _transform.LayerState)
        ).items()
    }
    sums = {}
    for path, node in _tree.layer_nodes(params).items():
      if path in known:
        sums[path] = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), known[path])
        continue
      # pylint: disable=protected-access
      phi_shape, psi_shape = _transform._block_shape(_transform._unstacked(node.params, node.lead))
      stack = node.stack
      sums[path] = _statistics.LayerStatistics(
          phi=jnp.zeros(stack + phi_shape, jnp.float32),
          psi=jnp.zeros(stack + psi_shape, jnp.float32),
          delta=jnp.zeros(stack, jnp.float32),
      )
    return MultiStepsState(
        mini_step=jnp.zeros((), jnp.int32),
        gradient_step=jnp.zeros((), jnp.int32),
        inner_state=inner_state,
        grads=jax.tree.map(jnp.zeros_like, params),
        statistics=_tree.nest(sums) if sums else {},
        stats_count=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, *, stats=_MISSING, **extra_args):
    if stats is _MISSING:
      raise ValueError(
          "multi_steps' update needs the keyword argument stats: pass this micro-batch's "
          "statistics from tkfac_jax.value_grad_and_stats, or stats=None."
      )
    final = state.mini_step == every_k - 1
    weight = 1.0 / (state.mini_step + 1).astype(jnp.float32)
    grads = jax.tree.map(
        lambda acc, g: (acc + (g - acc) * weight.astype(acc.dtype)).astype(acc.dtype),
        state.grads,
        updates,
    )
    sums = _tree.flatten_with_paths(state.statistics, is_leaf=_is_layer_stats)
    count = state.stats_count
    inner_stats = None
    if stats is not None:
      if not isinstance(stats, _capture.Statistics):
        raise TypeError(
            "stats must be the statistics returned by tkfac_jax.value_grad_and_stats (or None), "
            f"got {type(stats).__name__}."
        )
      batch = _tree.flatten_with_paths(stats.layers, is_leaf=_is_layer_stats)
      unknown = [_tree.path_str(p) for p in batch if p not in sums]
      if unknown:
        raise ValueError(
            f"Statistics for layer(s) {unknown}, which are not layers of the params given to "
            "multi_steps' init(): were they captured from another model?"
        )
      # Statistics captured with stats_due=False are zeros that were never computed.
      due = jnp.ones((), bool) if stats.due is None else stats.due
      for path, layer in batch.items():
        sums[path] = jax.tree.map(
            lambda s, b: jnp.where(due, s + b.astype(s.dtype), s), sums[path], layer
        )
      count = count + due.astype(count.dtype)
      held = jnp.maximum(count, 1)
      mean = {p: jax.tree.map(lambda s: s / held.astype(s.dtype), sums[p]) for p in batch}
      inner_stats = dataclasses.replace(
          stats, layers=_tree.nest(mean), due=None if stats.due is None else count > 0
      )

    def apply(inner_state):
      return inner.update(grads, inner_state, params, stats=inner_stats, **extra_args)

    def hold(inner_state):
      shapes = jax.eval_shape(apply, inner_state)[0]
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), inner_state

    new_updates, inner_state = jax.lax.cond(final, apply, hold, state.inner_state)
    if stats is not None:  # Handed over on a last micro-step: start the sums again.
      sums = jax.tree.map(lambda s: jnp.where(final, jnp.zeros_like(s), s), sums)
      count = jnp.where(final, 0, count)
    new_state = MultiStepsState(
        mini_step=jnp.where(final, 0, state.mini_step + 1).astype(jnp.int32),
        gradient_step=state.gradient_step + final.astype(jnp.int32),
        inner_state=inner_state,
        grads=jax.tree.map(lambda g: jnp.where(final, jnp.zeros_like(g), g), grads),
        statistics=_tree.nest(sums) if sums else {},
        stats_count=count.astype(jnp.int32),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
