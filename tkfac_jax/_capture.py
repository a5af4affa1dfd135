"""Capturing layer inputs and output gradients from a Flax (linen) model inside the train step.

A method interceptor (``flax.linen.intercept_methods``) sees every ``nn.Dense`` call the loss makes.
It records the layer's input and adds a zero "perturbation" to its output; the gradient of the loss
with respect to that perturbation is the layer's output gradient ``dL/dy``. The user's model is
not changed, and the whole thing traces into the user's jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tkfac_jax import _statistics
from tkfac_jax import _tree


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["layers"], meta_fields=["curvature"]
)
@dataclasses.dataclass(frozen=True)
class Statistics:
  """One batch's factor statistics for every captured layer.

  Attributes:
    layers: nested dict that mirrors the differentiated argument (the ``params`` tree): at the
      path of each captured layer's parameter node (``stats.layers['Dense_0']`` for
      ``params['Dense_0']``) a :class:`LayerStatistics`.
    curvature: ``"tkfac"`` or ``"kfac"``, which factors these are; the optimizer checks that it
      was built for the same.
  """

  layers: dict
  curvature: str = "tkfac"


@dataclasses.dataclass(frozen=True)
class _Call:
  """What the shape-only pass learns about one call of a captured layer."""

  input_shape: tuple[int, ...]
  output: jax.ShapeDtypeStruct
  use_bias: bool
  module_path: str


def _kernel_owners(diff_args: Any) -> dict[int, _tree.Path]:
  """Maps the id of every ``kernel`` leaf of the differentiated arguments to its layer's path."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(diff_args)
  return {
      id(leaf): _tree.plain_path(keypath)[:-1]
      for keypath, leaf in leaves
      if keypath and _tree.plain_key(keypath[-1]) == "kernel"
  }


def _interceptor(owners, perturbations, calls, inputs_seen):
  """Records each captured ``nn.Dense`` call and perturbs its output.

  ``calls`` receives the static description of each call, ``inputs_seen`` its input array.
  """

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
      return next_fun(*args, **kwargs)
    path = owners.get(id(module.get_variable("params", "kernel")))
    if path is None:  # Not a layer of the differentiated parameters (frozen, or no params).
      return next_fun(*args, **kwargs)
    inputs = args[0] if args else kwargs["inputs"]
    module_path = "/".join(module.path) or type(module).__name__
    if jnp.ndim(inputs) < 2:
      raise ValueError(
          f"Dense layer '{module_path}' got an input of shape {jnp.shape(inputs)}: curvature "
          "statistics need a leading batch axis. Apply the model to the whole batch inside the "
          "loss (do not jax.vmap the model over examples)."
      )
    outputs = next_fun(*args, **kwargs)
    layer_calls = calls.setdefault(path, [])
    if perturbations is not None:
      outputs = outputs + perturbations[path][len(layer_calls)]
    layer_calls.append(
        _Call(
            input_shape=tuple(inputs.shape),
            output=jax.ShapeDtypeStruct(outputs.shape, outputs.dtype),
            use_bias=bool(module.use_bias),
            module_path=module_path,
        )
    )
    inputs_seen.setdefault(path, []).append(inputs)
    return outputs

  return intercept


def _layer_statistics(
    path: _tree.Path,
    calls: Sequence[_Call],
    inputs: Sequence[jax.Array],
    output_grads: Sequence[jax.Array],
    curvature: str,
) -> _statistics.LayerStatistics:
  """Turns one layer's recorded calls into its factor statistics.

  Each call contributes its positions as locations; a layer called several times (weight sharing)
  has its locations summed, which is exact for the per-example gradient ``sum_t a_t g_t^T``.
  """
  batch = calls[0].input_shape[0]
  for call in calls:
    if call.input_shape[0] != batch:
      raise ValueError(
          f"Dense layer '{calls[0].module_path}' (parameters at '{_tree.path_str(path)}') is "
          f"called on batches of different sizes ({batch} and {call.input_shape[0]}) in one "
          "loss; weight sharing is supported only when every call sees the same examples."
      )
  a = jnp.concatenate([x.reshape(batch, -1, x.shape[-1]) for x in inputs], axis=1)
  # The perturbation gradient is dL/dy of the mean loss; per-example gradients are B times it.
  g = jnp.concatenate(
      [dy.reshape(batch, -1, dy.shape[-1]) * batch for dy in output_grads], axis=1
  )
  if calls[0].use_bias:
    a = _statistics.homogeneous(a)
  return _statistics.dense_statistics(a, g, curvature)


def value_grad_and_stats(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    curvature: _statistics.Curvature = "tkfac",
) -> Callable[..., tuple[Any, Any, Statistics]]:
  """Like :func:`jax.value_and_grad`, and also returns every dense layer's curvature statistics.

  ``fun`` is the user's loss, unchanged: it applies a Flax (linen) model to a batch and returns
  the mean loss over the batch's leading axis. Every ``flax.linen.Dense`` that ``fun`` applies and
  whose kernel is a leaf of the differentiated argument(s) is captured, with its parameters found
  by identity, so the statistics line up with the ``params`` tree however deeply it is nested.
  The statistics are reduced inside the step to small ``(d, d)`` matrices.

  Args:
    fun: the loss. Its leading-axis batch mean convention matters: per-example output gradients
      are taken as ``B * dL/dy``.
    argnums: which positional argument(s) to differentiate, as in :func:`jax.grad`.
    has_aux: whether ``fun`` returns ``(loss, aux)``, as in :func:`jax.value_and_grad`.
    curvature: ``"tkfac"`` (default) or ``"kfac"``; must match the optimizer's ``curvature``.

  Returns:
    A function with ``fun``'s signature returning ``(value, grads, stats)``, where ``value`` is
    ``loss`` or ``(loss, aux)`` and ``stats`` a :class:`Statistics`.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, tkfac_jax
    >>> model = nn.Dense(2)
    >>> x = jnp.ones((8, 3))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> loss_fn = lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)
    >>> loss, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn)(params, x)
    >>> stats.layers.phi.shape  # params is the Dense's own node, so stats.layers is its stats
    (4, 4)
  """
  if curvature not in _statistics.CURVATURES:
    raise ValueError(f"curvature must be one of {_statistics.CURVATURES}, got {curvature!r}.")
  single = isinstance(argnums, int)
  argnums_tuple = (argnums,) if single else tuple(argnums)

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    for i in argnums_tuple:
      if not 0 <= i < len(args):
        raise ValueError(
            f"argnums={argnums} but the function was called with {len(args)} positional "
            "argument(s); the differentiated arguments must be passed positionally."
        )

    def call(diff, perturbations, calls, inputs_seen):
      full = list(args)
      for i, value in zip(argnums_tuple, diff):
        full[i] = value
      owners = _kernel_owners(diff[0] if single else diff)
      with nn.intercept_methods(_interceptor(owners, perturbations, calls, inputs_seen)):
        return fun(*full, **kwargs)

    diff = tuple(args[i] for i in argnums_tuple)
    # A shape-only pass finds the layers and their output shapes, so that the real pass can
    # differentiate with respect to zero perturbations of those shapes.
    found: dict[_tree.Path, list[_Call]] = {}
    jax.eval_shape(lambda d: call(d, None, found, {}), diff)
    perturbations = {
        path: [jnp.zeros(c.output.shape, c.output.dtype) for c in layer_calls]
        for path, layer_calls in found.items()
    }

    def differentiable(diff, perturbations):
      calls: dict[_tree.Path, list[_Call]] = {}
      inputs: dict[_tree.Path, list[jax.Array]] = {}
      out = call(diff, perturbations, calls, inputs)
      if calls != found:
        raise RuntimeError(
            "The loss applied different dense layers in two traces; value_grad_and_stats needs "
            "the loss to be a pure function of its arguments."
        )
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, inputs)

    (loss, (aux, inputs)), (grads, output_grads) = jax.value_and_grad(
        differentiable, argnums=(0, 1), has_aux=True
    )(diff, perturbations)
    layers = {
        path: _layer_statistics(path, found[path], inputs[path], output_grads[path], curvature)
        for path in found
    }
    value = (loss, aux) if has_aux else loss
    grads = grads[0] if single else grads
    return value, grads, Statistics(layers=_tree.nest(layers), curvature=curvature)

  return wrapped
