"""Capturing layer inputs and output gradients from a Flax (linen) model inside the train step.

A method interceptor (``flax.linen.intercept_methods``) sees every layer call the loss makes.
It records the layer's input and adds a zero "perturbation" to its output; the gradient of the loss
with respect to that perturbation is the layer's output gradient ``dL/dy``. The user's model is
not changed, and the whole thing traces into the user's jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Literal, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from tkfac_jax import _losses
from tkfac_jax import _statistics
from tkfac_jax import _tree


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["layers", "due"],
    meta_fields=["curvature", "skipped"],
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
    skipped: ``(path, reason)`` for every layer of the differentiated parameters that the loss
      applied but that is not captured (a grouped convolution, a custom module, ...). The
      optimizer sends their parameters to its fallback.
    due: ``None`` when the statistics were computed unconditionally; otherwise the boolean array
      passed as ``stats_due=``: where it is false, ``layers`` holds zeros that were never computed,
      and the optimizer does not fold them in.
  """

  layers: Any
  curvature: str = "tkfac"
  skipped: tuple[tuple[str, str], ...] = ()
  due: Any = None


@dataclasses.dataclass(frozen=True)
class _Call:
  """What the shape-only pass learns about one call of a captured layer."""

  kind: str  # "dense" (Dense, DenseGeneral, Conv: patches times kernel) or "embed".
  input_shape: tuple[int, ...]  # The reader's output: [B, T, d_in], or [B, T] token ids.
  use_bias: bool
  module_path: str
  out_size: int  # Output features (their product, for a DenseGeneral with several output axes).
  num_embeddings: int = 0
  varying: frozenset = frozenset()  # Manual mesh axes the output varies over (inside shard_map).
  stack: tuple[int, ...] = ()  # Leading axes of stacked parameters that nn.scan sliced.


class _Slot(NamedTuple):
  """What a layer's slot receives as its gradient: the statistics summed over the layer's calls,
  and their locations per example (for K-FAC's ``1/T``)."""

  statistics: _statistics.LayerStatistics
  locations: jax.Array


_PARAM_NAMES = ("kernel", "embedding")
# The leaf that rides beside each differentiated kernel (or embedding) through the user's model:
# a placeholder in the shape-only pass, then zeros whose gradient is the layer's statistics.
_SLOT = "tkfac_statistics"


def _layer_params(diff: Any) -> dict[_tree.Path, jax.Array]:
  """The kernel (or embedding) of every layer node of the differentiated arguments, by path."""
  return {
      path[:-1]: leaf
      for path, leaf in _tree.flatten_with_paths(diff).items()
      if path and path[-1] in _PARAM_NAMES
  }


def _children(node: Any):
  """One level of a pytree node: ``[(key, child)]`` and a function that rebuilds the node."""
  entries, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
  keys = [_tree.plain_key(keypath[0]) for keypath, _ in entries]
  return list(zip(keys, [child for _, child in entries])), lambda kids: treedef.unflatten(kids)


def _edit_layer_nodes(tree: Any, paths, edit, path: _tree.Path = ()) -> Any:
  """``tree`` with ``edit(p, node)`` in place of the dict (or Flax ``FrozenDict``) node at each
  path ``p`` of ``paths``. A layer node of another type is left as it is."""
  if not any(p[:len(path)] == path for p in paths):
    return tree
  if isinstance(tree, (dict, flax.core.FrozenDict)):
    out = {k: _edit_layer_nodes(v, paths, edit, path + (k,)) for k, v in tree.items()}
    return type(tree)(edit(path, out) if path in paths else out)
  if _tree.is_box(tree) or jax.tree_util.treedef_is_leaf(jax.tree.structure(tree)):
    return tree
  children, rebuild = _children(tree)
  return rebuild([_edit_layer_nodes(child, paths, edit, path + (key,)) for key, child in children])


def _with_slots(tree: Any, slots: dict[_tree.Path, Any]) -> Any:
  """``tree`` with ``slots[p]`` under the key ``_SLOT`` of the layer node at each path ``p``.

  A layer node that is not a dict (or a ``FrozenDict``) gets no slot: its layer is then not
  captured, and the optimizer names it.
  """
  return _edit_layer_nodes(tree, slots, lambda path, node: {**node, _SLOT: slots[path]})


def _pop_slots(tree: Any, paths) -> tuple[Any, dict[_tree.Path, Any]]:
  """The inverse of :func:`_with_slots`: ``tree`` without the slots, and the slots by path."""
  found: dict[_tree.Path, Any] = {}

  def take(path, node):
    found[path] = node.pop(_SLOT)
    return node

  return _edit_layer_nodes(tree, paths, take), found


def _unboxed(value: Any) -> jax.Array:
  """A parameter without its Flax metadata box (``nn.with_partitioning``), if any."""
  return jax.tree.leaves(value)[0] if isinstance(value, nn.meta.AxisMetadata) else value


def _kernel(module: nn.Module) -> jax.Array:
  for name in _PARAM_NAMES:
    if module.has_variable("params", name):
      return _unboxed(module.get_variable("params", name))
  raise AssertionError("a layer node without a kernel or embedding")


def _is_batched(x: Any) -> bool:
  """Whether ``x`` is mapped by a ``jax.vmap`` (or ``nn.vmap``) that is being traced. (JAX does
  not export its batching tracer's class, hence the name.)"""
  return isinstance(x, jax.core.Tracer) and type(x).__name__ == "BatchTracer"


def _module_path(module: nn.Module) -> str:
  return "/".join(module.path) or type(module).__name__


def _layer_input(args, kwargs) -> jax.Array:
  return args[0] if args else kwargs["inputs"]


def _out_size(module: nn.Module, outputs: jax.Array) -> int:
  """The layer's output features (their product, for several output axes)."""
  return math.prod(outputs.shape[outputs.ndim - _output_axes(module):])


def _batch_size(module_path: str, x: jax.Array, min_ndim: int) -> int:
  if jnp.ndim(x) < min_ndim:
    raise ValueError(
        f"Layer '{module_path}' got an input of shape {jnp.shape(x)}: curvature statistics need "
        "a leading batch axis. Apply the model to the whole batch inside the loss (do not "
        "jax.vmap the model over examples)."
    )
  return x.shape[0]


def _unsupported(module: nn.Module, method: str) -> str | None:
  """Why a layer that owns differentiated parameters cannot be captured, or None if it can."""
  name = type(module).__name__
  if method != "__call__":
    return (
        f"{name}.{method} is applied (for example weight tying); only __call__ is captured, "
        "and a matrix used both ways has no one Kronecker structure to precondition"
    )
  if isinstance(module, nn.Conv):
    if module.feature_group_count != 1:
      return (
          f"grouped convolution (feature_group_count={module.feature_group_count}) is not "
          "preconditioned"
      )
    if module.mask is not None:
      return "masked convolution is not preconditioned"
    return None
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      return "DenseGeneral with batch_dims is not preconditioned"
    if len(_tuple(module.features)) != 1 and not module.use_bias:
      # The optimizer tells a kernel's output axes from its bias (init sees only the params).
      return (
          "DenseGeneral with several output axes and no bias is not preconditioned (the "
          "optimizer tells the output axes from the bias's shape)"
      )
    return None
  if isinstance(module, (nn.Dense, nn.Embed)):
    return None
  return f"{name} is not a layer type that tkfac_jax preconditions"


def _output_axes(module: nn.Module) -> int:
  """How many trailing axes of the layer's output are features (several for a DenseGeneral with
  ``features=(heads, head_dim)``)."""
  return len(_tuple(module.features)) if isinstance(module, nn.DenseGeneral) else 1


def _tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _input_reader(
    module: nn.Module, module_path: str, kernel: jax.Array, x: jax.Array
) -> tuple[str, Callable[[jax.Array], jax.Array]]:
  """Checks a layer's input at trace time, and returns the layer's kind and a function that
  turns the recorded input ``x`` into ``[B, T, d_in]`` (patches for a convolution, token ids for
  Embed).

  The conversion is deferred, so that a step whose statistics are not due (``stats_due``) records
  only the input the layer already had, and never builds a convolution's patches.
  """
  if isinstance(module, nn.Embed):
    return _embed_reader(module_path, x)
  if isinstance(module, nn.Conv):
    # HIGHEST precision: the patches must be copies of the inputs, not TF32/bfloat16 roundings.
    extractor = lambda taps: module.clone(  # noqa: E731
        parent=None, features=taps, use_bias=False, precision=jax.lax.Precision.HIGHEST
    )
    return _conv_reader(module_path, x, kernel, len(_tuple(module.kernel_size)), extractor)
  if isinstance(module, nn.DenseGeneral):
    d_in = kernel.size // math.prod(_tuple(module.features))
    return _general_reader("DenseGeneral", module_path, x, _tuple(module.axis), d_in)
  return _dense_reader(module_path, x)


def _embed_reader(module_path: str, x: jax.Array):
  batch = _batch_size(module_path, x, 1)
  return "embed", lambda x: x.reshape(batch, -1)


def _dense_reader(module_path: str, x: jax.Array):
  batch = _batch_size(module_path, x, 2)
  return "dense", lambda x: x.reshape(batch, -1, x.shape[-1])


def _conv_reader(module_path: str, x: jax.Array, kernel: jax.Array, spatial: int, extractor):
  """A convolution's reader: ``extractor(taps)`` is a linen convolution with the layer's strides,
  padding and dilations and ``taps`` output features, applied to the input with a one-hot kernel,
  which yields the patches in exactly the layout of the layer's kernel (spatial taps, then input
  channels), whatever the padding mode."""
  if jnp.ndim(x) != spatial + 2:
    raise ValueError(
        f"Conv layer '{module_path}' got an input of shape {jnp.shape(x)}; curvature "
        f"statistics need exactly one batch axis before its {spatial} spatial axes and "
        "channels."
    )
  taps = kernel.size // kernel.shape[-1]
  kernel_shape = kernel.shape[:-1] + (taps,)
  conv = extractor(taps)

  def patches(x):
    one_hot = jnp.eye(taps, dtype=x.dtype).reshape(kernel_shape)
    out = conv.apply({"params": {"kernel": one_hot}}, x)
    return out.reshape(x.shape[0], -1, taps)

  return "dense", patches


def _general_reader(name: str, module_path: str, x: jax.Array, axis: Sequence[int], d_in: int):
  """The reader of a layer that contracts the input axes ``axis`` (``name``: its class)."""
  batch = _batch_size(module_path, x, 2)
  # Flax sorts `axis`: the kernel's input axes are in the input's order.
  axes = tuple(sorted(a % x.ndim for a in axis))
  if 0 in axes:
    raise ValueError(
        f"{name} layer '{module_path}' contracts the leading (batch) axis of its input; "
        "curvature statistics need axis 0 to be the batch."
    )

  def moved(x):
    x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
    return x.reshape(batch, -1, d_in)

  return "dense", moved


def _per_example_error(function: str, module_path: str) -> ValueError:
  return ValueError(
      f"{function}: layer '{module_path}' is applied under jax.vmap (or a Flax vmap) over its "
      "inputs, with parameters shared across the map, as when the model is called on one "
      "example at a time. Curvature statistics need per-example output gradients: apply the "
      "model to the whole batch, with the batch as the leading axis of its inputs, and keep "
      "jax.vmap out of the loss."
  )


def _describer(kind, reader, out_size, use_bias, num_embeddings, curvature):
  """``describe(x, g)`` of a layer call's tap: its statistics (in a :class:`_Slot`) from the
  recorded input and the output gradient of the mean loss."""

  def describe(x, g):
    a = reader(x)
    batch, locations = a.shape[:2]
    # g is dL/dy of the mean loss; per-example output gradients are B times it.
    g = g.reshape(batch, -1, out_size) * batch
    # K-FAC's 1/T is applied once all calls are summed: each call counts its locations, so
    # that a call traced twice (nn.scan's body is) but run once counts once.
    if kind == "embed":
      stats = _statistics.embedding_statistics(a, g, num_embeddings, curvature, locations=1)
    else:
      a = _statistics.homogeneous(a) if use_bias else a
      stats = _statistics.dense_statistics(a, g, curvature, locations=1)
    return _Slot(stats, jnp.asarray(locations, jnp.float32))

  return describe


def _finish(filled: dict, curvature: str, axes) -> dict:
  """The statistics from the filled slots (``{path: _Slot}``): K-FAC's 1/T over all of a
  layer's calls, and the average over the shards."""
  stats = {path: slot.statistics for path, slot in filled.items()}
  if curvature == "kfac":
    stats = {
        path: s._replace(psi=s.psi / jnp.maximum(filled[path].locations, 1)[..., None, None])
        for path, s in stats.items()
    }
  return jax.lax.pmean(stats, axes) if axes else stats


def _finder(layer_paths, stored, found, skipped):
  """The shape-only pass's interceptor: finds each differentiated layer's calls.

  Layer ``i``'s slot is a placeholder shaped like its kernel with a last axis of ``i + 1``, so that
  a call knows its layer, and, from the kernel it sees against the stored one, whether a lifted
  transformation (``nn.scan``, ``nn.vmap``) sliced stacked parameters.
  """

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "setup" or not module.has_variable("params", _SLOT):
      return next_fun(*args, **kwargs)
    placeholder = _unboxed(module.get_variable("params", _SLOT))
    path = layer_paths[placeholder.shape[-1] - 1]
    module_path = _module_path(module)
    kernel = _kernel(module)
    stack = tuple(stored[path].shape[:stored[path].ndim - kernel.ndim])
    reason = _unsupported(module, context.method_name)
    if reason is None and stack and _is_batched(kernel):
      reason = (
          f"applied under nn.vmap with stacked parameters (leading axes {stack}); layers of an "
          "nn.vmap stack are not preconditioned (those of an nn.scan stack are)"
      )
    if reason is not None:
      skipped.setdefault(path, f"{module_path}: {reason}")
      return next_fun(*args, **kwargs)
    x = _layer_input(args, kwargs)
    if _is_batched(x) and not _is_batched(kernel):
      raise _per_example_error("tkfac_jax.value_grad_and_stats", module_path)
    kind, reader = _input_reader(module, module_path, kernel, x)
    outputs = next_fun(*args, **kwargs)
    found.setdefault(path, []).append(
        _Call(
            kind=kind,
            input_shape=tuple(jax.eval_shape(reader, x).shape),
            use_bias=bool(getattr(module, "use_bias", False)),
            module_path=module_path,
            out_size=_out_size(module, outputs),
            num_embeddings=int(getattr(module, "num_embeddings", 0)),
            varying=_varying_axes(outputs),
            stack=stack,
        )
    )
    return outputs

  return intercept


def _tapper(due, curvature):
  """The real pass's interceptor: each captured layer call's output goes through a tap whose
  backward pass writes the call's statistics into the gradient of its layer's slot."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "setup" or not module.has_variable("params", _SLOT):
      return next_fun(*args, **kwargs)
    slot = module.get_variable("params", _SLOT)
    x = _layer_input(args, kwargs)
    kind, reader = _input_reader(module, _module_path(module), _kernel(module), x)
    outputs = next_fun(*args, **kwargs)
    out_size = _out_size(module, outputs)
    use_bias = bool(getattr(module, "use_bias", False))
    num_embeddings = int(getattr(module, "num_embeddings", 0))
    describe = _describer(kind, reader, out_size, use_bias, num_embeddings, curvature)
    return _tap(outputs, x, slot, due, describe)

  return intercept


def _tap(outputs, x, slot, due, describe):
  """``outputs``, unchanged; in the backward pass, ``describe(x, dL/doutputs)`` (where ``due``,
  or always when ``due`` is ``None``) becomes the cotangent of ``slot``, and zeros elsewhere;
  nothing flows to ``x``.

  Under ``nn.remat`` or ``jax.checkpoint`` the residual ``x`` is rematerialised like any other, so
  capturing keeps remat's memory saving.
  """
  avals = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), slot)
  axes = tuple(sorted(frozenset().union(*(_varying_axes(s) for s in jax.tree.leaves(slot)))))

  def like_slot(tree):
    return jax.tree.map(lambda t, a: _as_varying(t.astype(a.dtype), axes), tree, avals)

  @jax.custom_vjp
  def tap(outputs, x, slot, due):
    del x, slot, due
    return outputs

  def forward(outputs, x, slot, due):
    del slot
    return outputs, (x, due)

  def backward(residuals, g):
    x, due = residuals
    if always:
      return g, None, like_slot(describe(x, g)), None
    stats = jax.lax.cond(
        due,
        lambda: like_slot(describe(x, g)),
        lambda: like_slot(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), avals)),
    )
    return g, None, stats, None

  tap.defvjp(forward, backward)
  always = due is None  # Statistics on every step: no lax.cond.
  return tap(outputs, x, slot, jnp.ones((), bool) if always else due)


def _varying_axes(x: jax.Array) -> frozenset:
  """The manual mesh axes over which ``x`` varies inside ``jax.shard_map`` (empty elsewhere, and
  when ``check_vma=False``). jax < 0.10 calls them ``vma``; later versions ``manual_axis_type``."""
  aval = jax.typeof(x)
  if hasattr(aval, "vma"):
    return frozenset(aval.vma)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(getattr(manual, "varying", ()))


def _as_varying(x: jax.Array, axes) -> jax.Array:
  """``x`` marked as varying over ``axes`` inside ``jax.shard_map``.

  A replicated (invariant) input's cotangent is summed over the axes it is broadcast along; marking
  it varying first keeps each shard's own gradient. Without shard_map's checks this does nothing.
  """
  missing = tuple(a for a in axes if a not in _varying_axes(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _axis_names(axis_name) -> tuple:
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  for name in names:
    try:
      jax.lax.axis_index(name)
    except NameError as error:
      raise ValueError(
          f"value_grad_and_stats(..., axis_name={axis_name!r}): the axis {name!r} is not bound "
          "here. axis_name is for a train step written with jax.shard_map over that mesh axis; "
          "under plain jax.jit with sharded inputs, leave axis_name=None (the batch means are "
          "already global)."
      ) from error
  return names


def _is_nnx(tree: Any) -> bool:
  """Whether ``tree`` is an NNX module or state (or holds NNX variables)."""
  nnx = _tree.NNX
  if nnx is None:
    return False
  if isinstance(tree, (nnx.Module, nnx.State, nnx.Variable)):
    return True
  return any(
      isinstance(leaf, nnx.Variable)
      for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  )


def value_grad_and_stats(
    fun: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    curvature: _statistics.Curvature = "tkfac",
    fisher: Literal["empirical", "sampled"] = "empirical",
    axis_name: str | Sequence[str] | None = None,
) -> Callable[..., tuple[Any, Any, Statistics]]:
  """Like :func:`jax.value_and_grad`, and also returns every layer's curvature statistics.

  ``fun`` is the user's loss, unchanged: it applies a Flax (linen) model to a batch and returns
  the mean loss over the batch's leading axis. Every ``nn.Dense``, ``nn.DenseGeneral`` (several
  output axes need a bias), ``nn.Conv`` (ungrouped) and ``nn.Embed`` that ``fun`` applies and
  whose kernel (or embedding) belongs to the differentiated argument(s) is captured, so the
  statistics line up with the ``params`` tree however deeply it is nested. Layers under
  ``nn.remat`` or a ``jax.checkpoint`` are captured too, without keeping the activations that
  remat drops. For a Flax NNX model, use :func:`tkfac_jax.nnx.value_grad_and_stats`.

  How: each differentiated layer node (a dict holding a ``kernel`` or ``embedding``) gets an extra
  entry, ``'tkfac_statistics'``, that rides through the model beside the kernel; a method
  interceptor passes the layer's output through an identity whose backward pass reduces the
  layer's input and output gradient to the small ``(d, d)`` statistics and returns them as that
  entry's gradient. So ``fun`` must hand the differentiated parameters to ``model.apply`` as it
  gets them (wrapping them in ``{'params': ...}`` is fine; a cast inside the loss rounds the
  statistics to the cast's precision; rebuilding the tree from another structure drops the entry,
  and the optimizer then names the layers it has no statistics for).

  Never silent: layers of the differentiated parameters that ``fun`` applies but that cannot be
  captured are listed, with the reason, in ``stats.skipped``, and the optimizer warns once that
  they take the fallback: a grouped convolution, a custom module, an ``nn.vmap`` stack whose
  kernels carry a leading layer axis, and a matrix that ``Embed.attend`` also uses
  (tied embeddings: the lookup's Kronecker factors are over (token, feature), the output
  projection's over (feature, token), so the shared matrix has no one block). A model applied
  under ``jax.vmap`` one example at a time raises: per-example statistics need the whole batch in
  one call.

  Stacks: the layers of an ``nn.scan`` stack (``variable_axes={'params': 0}``: each kernel with a
  leading layer axis) are captured layer by layer; their statistics carry the stack's leading
  axes (``phi`` of shape ``(L, d_in + 1, d_in + 1)``), and the optimizer keeps one set of factors
  per layer.

  Sequence models: ``fun`` returns the mean over the batch axis of each example's loss; for a
  ``[B, T]`` token loss, the mean over all tokens is that (every example has ``T`` tokens), and a
  sum over tokens averaged over examples works too (the default scale-invariant optimizer does not
  depend on the loss's scale). Every position of a layer's ``[B, T, d]`` input is a location of
  its Kronecker factors.

  Args:
    fun: the loss. Its leading-axis batch mean convention matters: per-example output gradients
      are taken as ``B * dL/dy``.
    argnums: which positional argument(s) to differentiate, as in :func:`jax.grad`.
    has_aux: whether ``fun`` returns ``(loss, aux)``, as in :func:`jax.value_and_grad`.
    curvature: ``"tkfac"`` (default) or ``"kfac"``; must match the optimizer's ``curvature``.
    fisher: ``"empirical"`` (default): output gradients from the training labels, shared with the
      parameter gradient. ``"sampled"``: the "true" Fisher of K-FAC's papers, with output gradients
      from one extra backward pass from the model output, with targets drawn from the model's own
      predictive distribution. The loss must then compute its value with one of
      :func:`softmax_cross_entropy`, :func:`sigmoid_binary_cross_entropy` or
      :func:`squared_error`, which mark the output and its distribution, and the returned
      function takes a keyword argument ``fisher_key`` (a PRNG key; use a new one every step).
      The parameter gradient always comes from the real labels.
    axis_name: for a train step written with :func:`jax.shard_map`: the mesh axis (or axes) the
      batch is split over. Each shard computes the loss, gradient and statistics of its own
      examples; the loss, the gradient and every statistic are then averaged over the axis
      (``lax.pmean``), so that every shard returns the values of the global batch (for shards of
      equal size). Replicated parameters are differentiated shard by shard before that one
      average, so their gradient is never reduced twice, with ``check_vma`` on or off. With
      ``fisher="sampled"`` the key is folded with the shard's index, so that shards sample
      independently. ``None`` (default; also right under plain :func:`jax.jit` with sharded
      inputs, where the means are already global): no averaging; inside ``shard_map`` the
      statistics are then the shard's own, and the gradient is what :func:`jax.value_and_grad`
      returns there.

  Returns:
    A function with ``fun``'s signature (plus ``fisher_key=`` when ``fisher="sampled"``) returning
    ``(value, grads, stats)``, where ``value`` is ``loss`` or ``(loss, aux)`` and ``stats`` a
    :class:`Statistics`. It also takes the keyword argument ``stats_due``: pass
    ``tkfac_jax.stats_due(opt_state)`` and the statistics are reduced (and, with ``axis_name``,
    averaged over the shards) under ``lax.cond`` only where it is true; elsewhere ``stats.layers``
    holds zeros that cost nothing and ``stats.due`` tells the optimizer to ignore them. The
    forward and backward passes are the same either way, so the step compiles once.

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
  if fisher not in ("empirical", "sampled"):
    raise ValueError(f"fisher must be 'empirical' or 'sampled', got {fisher!r}.")
  single = isinstance(argnums, int)
  argnums_tuple = (argnums,) if single else tuple(argnums)

  @functools.wraps(fun)
  def wrapped(*args, fisher_key=None, stats_due=None, **kwargs):
    axes = () if axis_name is None else _axis_names(axis_name)
    if fisher == "sampled" and fisher_key is None:
      raise ValueError(
          "value_grad_and_stats(..., fisher='sampled') needs fisher_key=<a PRNG key> in each "
          "call, to sample the targets; use a new key every step."
      )
    if fisher == "empirical" and fisher_key is not None:
      raise ValueError(
          "fisher_key was passed but fisher='empirical' uses the training labels; pass "
          "fisher='sampled' to value_grad_and_stats for the sampled Fisher."
      )
    for i in argnums_tuple:
      if not 0 <= i < len(args):
        raise ValueError(
            f"argnums={argnums} but the function was called with {len(args)} positional "
            "argument(s); the differentiated arguments must be passed positionally."
        )
    for i in argnums_tuple:
      if _is_nnx(args[i]):
        raise TypeError(
            f"value_grad_and_stats got an NNX {type(args[i]).__name__} as argument {i}; it "
            "differentiates a linen model's params. For an nnx.Module, use "
            "tkfac_jax.nnx.value_grad_and_stats(loss_fn)(model, ...)."
        )
    due = None if stats_due is None else _check_due(stats_due)

    def call(tree, intercept):
      diff = (tree,) if single else tree
      full = list(args)
      for i, value in zip(argnums_tuple, diff):
        full[i] = value
      with nn.intercept_methods(intercept):
        return fun(*full, **kwargs)

    tree = args[argnums_tuple[0]] if single else tuple(args[i] for i in argnums_tuple)
    if axes:
      tree = jax.tree.map(lambda x: _as_varying(x, axes), tree)
      if fisher_key is not None:
        for name in axes:
          fisher_key = jax.random.fold_in(fisher_key, jax.lax.axis_index(name))
    # A shape-only pass finds the layers, with placeholders in their slots.
    stored = _layer_params(tree)
    layer_paths = list(stored)
    placeholders = {
        path: jax.ShapeDtypeStruct(kernel.shape + (i + 1,), jnp.float32)
        for i, (path, kernel) in enumerate(stored.items())
    }
    found: dict[_tree.Path, list[_Call]] = {}
    skipped: dict[_tree.Path, str] = {}
    jax.eval_shape(
        lambda t: call(t, _finder(layer_paths, stored, found, skipped)),
        _with_slots(tree, placeholders),
    )
    # A layer that is also applied in a way that cannot be captured has incomplete statistics.
    captured = {path: calls for path, calls in found.items() if path not in skipped}
    for path, calls in captured.items():
      if len({call.stack for call in calls}) > 1:
        raise ValueError(
            f"Layer '{calls[0].module_path}' (parameters at '{_tree.path_str(path)}') is applied "
            "both as a whole stack of layers and one layer at a time in one loss; its statistics "
            "need one of the two."
        )
      batches = {call.input_shape[0] for call in calls}
      if len(batches) > 1:
        raise ValueError(
            f"Layer '{calls[0].module_path}' (parameters at '{_tree.path_str(path)}') is called "
            f"on batches of different sizes {sorted(batches)} in one loss; weight sharing is "
            "supported only when every call sees the same examples."
        )
    slots = {path: _zero_statistics(calls, axes) for path, calls in captured.items()}

    finish = functools.partial(_finish, curvature=curvature, axes=axes)

    def zeros(_=None):
      """What ``finish`` returns, where statistics are not due: zeros that cost nothing."""
      return jax.tree.map(
          lambda x: _as_varying(jnp.zeros(x.shape, x.dtype), _varying_axes(x) - set(axes)),
          {path: slot.statistics for path, slot in slots.items()},
      )

    if fisher == "empirical":
      def differentiable(tree):
        # Under a lax.cond even when always due: it keeps XLA from holding on to the activations
        # that nn.remat drops (measured with XLA's memory analysis; see test_transformers.py).
        out = call(tree, _tapper(jnp.ones((), bool) if due is None else due, curvature))
        loss, aux = out if has_aux else (out, None)
        return loss, aux

      (loss, aux), grads = jax.value_and_grad(differentiable, has_aux=True)(
          _with_slots(tree, slots)
      )
      grads, stats = _pop_slots(grads, captured)
      # Where statistics are not due the taps gave zeros; skip the average over the shards too.
      gated = axes and due is not None
      layers = jax.lax.cond(due, finish, zeros, stats) if gated else finish(stats)
    else:  # The extra backward pass runs only where the statistics are due.
      loss, aux, grads, read_stats = _sampled_backward(
          lambda t: call(t, _tapper(jnp.ones((), bool), curvature)), has_aux,
          _with_slots(tree, slots), fisher_key,
      )
      grads, _ = _pop_slots(grads, captured)
      try:
        if due is None:
          layers = finish(_pop_slots(read_stats(), captured)[1])
        else:
          layers = jax.lax.cond(
              due, lambda _: finish(_pop_slots(read_stats(), captured)[1]), zeros, None
          )
      except jax.errors.UnexpectedTracerError as error:
        raise _hidden_output() from error
    if axes:
      loss, grads = jax.lax.pmean((loss, grads), axes)
    value = (loss, aux) if has_aux else loss
    return value, grads, Statistics(
        layers=_tree.nest(layers),
        curvature=curvature,
        skipped=tuple((_tree.path_str(p), reason) for p, reason in skipped.items()),
        due=due,
    )

  return wrapped


def _zero_statistics(calls: Sequence[_Call], axes) -> _Slot:
  """A layer's slot: zeros shaped like its statistics, varying (inside ``jax.shard_map``) over the
  mesh axes its statistics vary over before they are averaged."""
  call = calls[0]
  varying = tuple(sorted(frozenset(axes).union(*(c.varying for c in calls))))
  # A stack's slot has its leading axes: nn.scan hands each layer its own slice.
  zeros = lambda *shape: _as_varying(  # noqa: E731
      jnp.zeros(call.stack + shape, jnp.float32), varying
  )
  if call.kind == "embed":
    phi = zeros(call.num_embeddings)
  else:
    d_in = call.input_shape[-1] + call.use_bias
    phi = zeros(d_in, d_in)
  return _Slot(
      _statistics.LayerStatistics(phi=phi, psi=zeros(call.out_size, call.out_size), delta=zeros()),
      zeros(),
  )


def _check_due(stats_due) -> jax.Array:
  """``stats_due`` as a boolean scalar array, or a TypeError that says what to pass."""
  if isinstance(stats_due, (int, float)) and not isinstance(stats_due, bool):
    raise TypeError(
        f"stats_due must be a boolean (tkfac_jax.stats_due(opt_state)), got {stats_due!r}."
    )
  due = jnp.asarray(stats_due)
  if due.shape != () or due.dtype != jnp.bool_:
    raise TypeError(
        "stats_due must be a boolean scalar, as returned by tkfac_jax.stats_due(opt_state); got "
        f"an array of shape {due.shape} and dtype {due.dtype}."
    )
  return due


def _hidden_output() -> ValueError:
  return ValueError(
      "fisher='sampled': the loss helper was called under a JAX transformation inside the loss "
      "(jax.vmap, lax.scan, jax.checkpoint, ...), so its output cannot be reached. Call "
      "tkfac_jax.softmax_cross_entropy, sigmoid_binary_cross_entropy or squared_error "
      "directly on the batched model output."
  )


def _sampled_backward(forward_loss, has_aux, tree, key):
  """One forward pass and the backward pass from the loss (the parameter gradient); returns with
  them a function that runs the second backward pass, from the marked model output with sampled
  targets, whose slot gradients are the statistics, so that it can run only where they are due."""
  distribution = None

  def forward(tree):
    nonlocal distribution
    with _losses.recording_outputs() as marks:
      out = forward_loss(tree)
    loss, aux = out if has_aux else (out, None)
    if len(marks) != 1:
      raise ValueError(
          "fisher='sampled' needs the loss to mark exactly one model output, by computing its "
          "value with tkfac_jax.softmax_cross_entropy, tkfac_jax.sigmoid_binary_cross_entropy or "
          f"tkfac_jax.squared_error; this loss marked {len(marks)}."
      )
    distribution, output = marks[0]
    return (loss, output), aux

  try:
    (loss, output), vjp_fn, aux = jax.vjp(forward, tree, has_aux=True)
    (grads,) = vjp_fn((jnp.ones_like(loss), jnp.zeros_like(output)))
  except jax.errors.UnexpectedTracerError as error:
    raise _hidden_output() from error

  def read_stats():
    try:
      sampled = _losses.sampled_output_gradient(distribution, output, key).astype(output.dtype)
      return vjp_fn((jnp.zeros_like(loss), sampled))[0]
    except jax.errors.UnexpectedTracerError as error:
      raise _hidden_output() from error

  return loss, aux, grads, read_stats
