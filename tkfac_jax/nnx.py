"""Capturing layer statistics from Flax NNX models.

The same mechanism as the linen capture (:func:`tkfac_jax.value_grad_and_stats`), for
``nnx.Module`` models: each captured layer of a copy of the model gets an extra parameter, a
"slot", that rides through the model (and through NNX's lifted transforms, which carry
parameters) beside its kernel; while the loss runs, the layer classes' ``__call__`` pass each
layer's output through an identity whose backward pass reduces the layer's input and output
gradient to its statistics, and returns them as the slot's gradient. The user's model and classes
are unchanged afterwards (the classes are patched only while the loss is traced, as Flax's own
``nnx.capture`` does for method outputs).

Usage, inside the user's jitted train step::

  loss, grads, stats = tkfac_jax.nnx.value_grad_and_stats(loss_fn)(model, x, y)
  optimizer.update(model, grads, stats=stats)  # optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable

import flax
import flax.linen as nn

try:
  from flax import nnx
except ImportError as e:
  raise ImportError(
      f"tkfac_jax.nnx needs flax.nnx, which does not import here (flax {flax.__version__}; "
      f"{e}). Install a flax release whose NNX matches your jax (pip install -U flax)."
  ) from e
import jax
import jax.flatten_util
import jax.numpy as jnp

from tkfac_jax import _capture
from tkfac_jax import _statistics
from tkfac_jax import _tree

__all__ = ["value_grad_and_stats"]

_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Embed)
_SLOT = "tkfac_statistics"


class StatisticsSlot(nnx.Param):
  """The slot beside a captured layer's kernel (a :class:`flax.nnx.Param`, so that NNX's lifted
  transforms carry it wherever they carry parameters). Only ever on the copy of the model that
  :func:`value_grad_and_stats` differentiates."""


def _param_name(module: nnx.Module) -> str:
  return "embedding" if isinstance(module, nnx.Embed) else "kernel"


def _value(variable) -> jax.Array:
  return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _output_axes(module: nnx.Module) -> int:
  return len(module.out_features) if isinstance(module, nnx.LinearGeneral) else 1


def _unsupported(module: nnx.Module) -> str | None:
  """Why a layer cannot be captured, or None if it can."""
  if isinstance(module, nnx.Conv):
    if module.feature_group_count != 1:
      return (
          f"grouped convolution (feature_group_count={module.feature_group_count}) is not "
          "preconditioned"
      )
    if module.mask is not None:
      return "masked convolution is not preconditioned"
  if isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      return "LinearGeneral with batch_axis is not preconditioned"
    if len(module.out_features) != 1 and not module.use_bias:
      return (
          "LinearGeneral with several output axes and no bias is not preconditioned (the "
          "optimizer tells the output axes from the bias's shape)"
      )
  return None


def _input_reader(module: nnx.Module, module_path: str, kernel: jax.Array, x: jax.Array):
  """The layer's kind, and a function from its input to ``[B, T, d_in]`` (token ids for Embed):
  the linen capture's readers, given the NNX layer's settings."""
  if isinstance(module, nnx.Embed):
    return _capture._embed_reader(module_path, x)  # pylint: disable=protected-access
  if isinstance(module, nnx.Conv):
    # linen's Conv shares NNX's padding and dilation conventions.
    extractor = lambda taps: nn.Conv(  # noqa: E731
        features=taps, kernel_size=tuple(module.kernel_size), strides=module.strides,
        padding=module.padding, input_dilation=module.input_dilation,
        kernel_dilation=module.kernel_dilation, use_bias=False,
        precision=jax.lax.Precision.HIGHEST,
    )
    return _capture._conv_reader(  # pylint: disable=protected-access
        module_path, x, kernel, len(module.kernel_size), extractor
    )
  if isinstance(module, nnx.LinearGeneral):
    return _capture._general_reader(  # pylint: disable=protected-access
        "LinearGeneral", module_path, x, module.axis, math.prod(module.in_features)
    )
  return _capture._dense_reader(module_path, x)  # pylint: disable=protected-access


@contextlib.contextmanager
def _patched(types, hook):
  """Each class in ``types`` calls ``hook(module, slot, call, args, kwargs)`` instead of its
  ``__call__`` for the instances that carry a slot (once per call: a subclass's ``__call__`` that
  calls its parent's is one layer call)."""
  active: set[int] = set()
  saved = {}
  for cls in types:
    own = cls.__dict__.get("__call__")
    saved[cls] = own
    call = cls.__call__

    def patched(self, *args, _call=call, **kwargs):
      slot = self.__dict__.get(_SLOT)
      if slot is None or id(self) in active:
        return _call(self, *args, **kwargs)
      active.add(id(self))
      try:
        return hook(self, _value(slot), functools.partial(_call, self), args, kwargs)
      finally:
        active.discard(id(self))

    cls.__call__ = patched
  try:
    yield
  finally:
    for cls, own in saved.items():
      if own is None:
        del cls.__call__
      else:
        cls.__call__ = own


def value_grad_and_stats(
    fun: Callable[..., Any],
    has_aux: bool = False,
    *,
    curvature: _statistics.Curvature = "tkfac",
    wrt: Any = nnx.Param,
    axis_name: str | None = None,
) -> Callable[..., tuple[Any, Any, _capture.Statistics]]:
  """Like :func:`flax.nnx.value_and_grad` (of the model, the first argument), and also returns
  every layer's curvature statistics.

  ``fun(model, *args)`` is the user's loss, unchanged: the mean over the batch's leading axis.
  Every ``nnx.Linear``, ``nnx.LinearGeneral`` (including those of ``nnx.MultiHeadAttention``;
  several output axes need a bias), ``nnx.Conv`` (ungrouped) and ``nnx.Embed`` of the model that
  ``fun`` applies is captured; ``stats.layers`` mirrors ``nnx.state(model, nnx.Param)`` (its
  entry at a layer's path holds that layer's :class:`LayerStatistics`), and the gradient is the
  ``nnx.State`` that :func:`flax.nnx.value_and_grad` returns. Non-parameter state that ``fun``
  changes (batch statistics, RNG counters) is written back to ``model``, as there.

  Never silent: layers that ``fun`` applies but that cannot be captured are listed in
  ``stats.skipped``, with the reason, and the optimizer warns once that they take the fallback.

  Args:
    fun: the loss, ``fun(model, *args, **kwargs)``, returning a scalar (or ``(loss, aux)``).
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    curvature: ``"tkfac"`` or ``"kfac"``; must match the optimizer's.
    wrt: the filter of the differentiated variables (:class:`flax.nnx.Param`, as for
      ``nnx.Optimizer(..., wrt=nnx.Param)``).
    axis_name: as for :func:`tkfac_jax.value_grad_and_stats`: inside ``jax.shard_map`` over the
      batch axis, average the loss, gradient and statistics over it.

  Returns:
    A function ``(model, *args, stats_due=None, **kwargs) -> (value, grads, stats)``; pass
    ``stats_due=tkfac_jax.stats_due(optimizer.opt_state)`` to compute the statistics only on the
    steps that use them.

  Examples:
    >>> import jax.numpy as jnp, tkfac_jax
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> loss_fn = lambda model, x: jnp.mean(model(x) ** 2)
    >>> loss, grads, stats = tkfac_jax.nnx.value_grad_and_stats(loss_fn)(model, jnp.ones((8, 3)))
    >>> stats.layers.phi.shape  # the model is the layer itself, so stats.layers is its stats
    (4, 4)
  """
  if not hasattr(nnx, "iter_modules"):
    raise ImportError(
        f"tkfac_jax.nnx needs flax >= 0.12.2 (nnx.iter_modules, and nnx.Optimizer's "
        f"update(model, grads)); this is flax {flax.__version__}. Upgrade flax, or use the linen "
        "API, tkfac_jax.value_grad_and_stats."
    )
  if curvature not in _statistics.CURVATURES:
    raise ValueError(f"curvature must be one of {_statistics.CURVATURES}, got {curvature!r}.")

  @functools.wraps(fun)
  def wrapped(model, *args, stats_due=None, **kwargs):
    if not isinstance(model, nnx.Module):
      raise TypeError(
          "tkfac_jax.nnx.value_grad_and_stats differentiates an nnx.Module passed as the first "
          f"argument, got {type(model).__name__}. For a linen model's params, use "
          "tkfac_jax.value_grad_and_stats."
      )
    axes = () if axis_name is None else _capture._axis_names(axis_name)  # pylint: disable=protected-access
    due = None if stats_due is None else _capture._check_due(stats_due)  # pylint: disable=protected-access
    graphdef, params, rest = nnx.split(model, wrt, ...)
    if axes:
      params = jax.tree.map(lambda x: _capture._as_varying(x, axes), params)  # pylint: disable=protected-access
    param_paths = set(_tree.flatten_with_paths(params))
    layers = {
        path: module for path, module in nnx.iter_modules(model)
        if isinstance(module, _LAYERS) and path + (_param_name(module),) in param_paths
    }
    layer_paths = list(layers)
    kernels = {path: _value(getattr(m, _param_name(m))) for path, m in layers.items()}
    types = {type(m) for m in layers.values()}

    def run(params, slots, rest, hook):
      """``fun`` on a copy of the model whose layers carry ``slots``; returns its value and the
      copy's state other than ``wrt``."""
      # Fresh variables at this trace level (jax.value_and_grad closes over the arguments it
      # does not differentiate, whose variables belong to the caller's trace).
      rest = jax.tree.map(lambda x: x, rest)
      copy = nnx.merge(graphdef, params, rest)
      carriers = []
      for path, module in nnx.iter_modules(copy):
        if path in slots:
          setattr(module, _SLOT, StatisticsSlot(slots[path]))
          carriers.append(module)
      with _patched(types, hook):
        out = fun(copy, *args, **kwargs)
      for module in carriers:
        delattr(module, _SLOT)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, nnx.split(copy, wrt, ...)[2])

    # A shape-only pass finds the layers' calls (placeholders: the kernel's shape, and a last
    # axis that names the layer).
    found: dict[_tree.Path, list] = {}
    skipped: dict[_tree.Path, str] = {}

    def finder(module, placeholder, call, args, kwargs):
      path = layer_paths[placeholder.shape[-1] - 1]
      module_path = "/".join(str(k) for k in path) or type(module).__name__
      kernel = _value(getattr(module, _param_name(module)))
      stack = tuple(kernels[path].shape[:kernels[path].ndim - kernel.ndim])
      reason = _unsupported(module)
      if reason is None and stack and _capture._is_batched(kernel):  # pylint: disable=protected-access
        reason = (
            f"applied under nnx.vmap with stacked parameters (leading axes {stack}); layers of "
            "an nnx.vmap'ed application are not preconditioned (those applied with nnx.scan are)"
        )
      if reason is not None:
        skipped.setdefault(path, f"{module_path}: {reason}")
        return call(*args, **kwargs)
      x = _capture._layer_input(args, kwargs)  # pylint: disable=protected-access
      if _capture._is_batched(x) and not _capture._is_batched(kernel):  # pylint: disable=protected-access
        raise _capture._per_example_error(  # pylint: disable=protected-access
            "tkfac_jax.nnx.value_grad_and_stats", module_path
        )
      kind, reader = _input_reader(module, module_path, kernel, x)
      outputs = call(*args, **kwargs)
      found.setdefault(path, []).append(
          _capture._Call(  # pylint: disable=protected-access
              kind=kind,
              input_shape=tuple(jax.eval_shape(reader, x).shape),
              use_bias=bool(getattr(module, "use_bias", False)),
              module_path=module_path,
              out_size=math.prod(outputs.shape[outputs.ndim - _output_axes(module):]),
              num_embeddings=int(getattr(module, "num_embeddings", 0)),
              varying=_capture._varying_axes(outputs),  # pylint: disable=protected-access
              stack=stack,
          )
      )
      return outputs

    placeholders = {
        path: jax.ShapeDtypeStruct(kernel.shape + (i + 1,), jnp.float32)
        for i, (path, kernel) in enumerate(kernels.items())
    }
    jax.eval_shape(lambda p, s, r: run(p, s, r, finder), params, placeholders, rest)
    captured = {path: calls for path, calls in found.items() if path not in skipped}
    for path, calls in captured.items():
      if len({call.stack for call in calls}) > 1:
        raise ValueError(
            f"Layer '{calls[0].module_path}' is applied both as a whole stack of layers and one "
            "layer at a time in one loss; its statistics need one of the two."
        )
      if len({call.input_shape[0] for call in calls}) > 1:
        raise ValueError(
            f"Layer '{calls[0].module_path}' is called on batches of different sizes in one "
            "loss; weight sharing is supported only when every call sees the same examples."
        )
    # Each layer's slot is one flat vector (one per layer of a stack, which nnx.scan slices like
    # the kernel), unravelled after the backward pass.
    unravel = {}
    slots = {}
    for path, calls in captured.items():
      one = [dataclasses.replace(c, stack=()) for c in calls]
      flat, unravel[path] = jax.flatten_util.ravel_pytree(
          _capture._zero_statistics(one, axes)  # pylint: disable=protected-access
      )
      for _ in calls[0].stack:
        unravel[path] = jax.vmap(unravel[path])
      slots[path] = jnp.broadcast_to(flat, calls[0].stack + flat.shape)

    def tapper(module, slot, call, args, kwargs):
      x = _capture._layer_input(args, kwargs)  # pylint: disable=protected-access
      module_path = type(module).__name__
      kind, reader = _input_reader(module, module_path, _value(getattr(module, _param_name(module))), x)
      outputs = call(*args, **kwargs)
      out_size = math.prod(outputs.shape[outputs.ndim - _output_axes(module):])
      describe_slot = _capture._describer(  # pylint: disable=protected-access
          kind, reader, out_size, bool(getattr(module, "use_bias", False)),
          int(getattr(module, "num_embeddings", 0)), curvature,
      )

      def describe(x, g):  # The slot is flat: its statistics, ravelled.
        return jax.flatten_util.ravel_pytree(describe_slot(x, g))[0]

      return _capture._tap(  # pylint: disable=protected-access
          outputs, x, slot, jnp.ones((), bool) if due is None else due, describe
      )

    (loss, (aux, new_rest)), (grads, filled) = jax.value_and_grad(
        lambda p, s, r: run(p, s, r, tapper), argnums=(0, 1), has_aux=True
    )(params, slots, rest)

    stats = _capture._finish(  # pylint: disable=protected-access
        {path: unravel[path](flat) for path, flat in filled.items()}, curvature, axes
    )
    if axes:
      loss, grads = jax.lax.pmean((loss, grads), axes)
    nnx.update(model, new_rest)
    value = (loss, aux) if has_aux else loss
    return value, grads, _capture.Statistics(
        layers=_tree.nest(stats),
        curvature=curvature,
        skipped=tuple((_tree.path_str(p), reason) for p, reason in skipped.items()),
        due=due,
    )

  return wrapped
