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
from typing import Any, Callable, Literal, Sequence

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
  input_shape: tuple[int, ...]
  output: jax.ShapeDtypeStruct
  use_bias: bool
  module_path: str
  out_size: int  # Output features (their product, for a DenseGeneral with several output axes).
  num_embeddings: int = 0
  varying: frozenset = frozenset()  # Manual mesh axes the output varies over (inside shard_map).


_PARAM_NAMES = ("kernel", "embedding")


def _param_owners(diff_args: Any) -> dict[int, _tree.Path]:
  """Maps the id of every ``kernel``/``embedding`` leaf of the differentiated arguments to the
  path of its layer's parameter node."""
  return {
      id(leaf): path[:-1]
      for path, leaf in _tree.flatten_with_paths(diff_args).items()
      if path and path[-1] in _PARAM_NAMES
  }


def _owned_layer(module: nn.Module, owners) -> tuple[_tree.Path | None, jax.Array | None]:
  for name in _PARAM_NAMES:
    if module.has_variable("params", name):
      value = module.get_variable("params", name)
      if isinstance(value, nn.meta.AxisMetadata):  # nn.with_partitioning: the array in the box.
        value = jax.tree.leaves(value)[0]
      if id(value) in owners:
        return owners[id(value)], value
  return None, None


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
    return f"{name}.{method} is applied (for example weight tying); only __call__ is captured"
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
    batch = _batch_size(module_path, x, 1)
    return "embed", lambda x: x.reshape(batch, -1)
  if isinstance(module, nn.Conv):
    spatial = len(_tuple(module.kernel_size))
    if jnp.ndim(x) != spatial + 2:
      raise ValueError(
          f"Conv layer '{module_path}' got an input of shape {jnp.shape(x)}; curvature "
          f"statistics need exactly one batch axis before its {spatial} spatial axes and "
          "channels."
      )
    # The module's own convolution with a one-hot kernel yields the patches in exactly the
    # layout of its kernel (spatial taps, then input channels), whatever the padding mode.
    # HIGHEST precision: the patches must be copies of the inputs, not TF32/bfloat16 roundings.
    taps = kernel.size // kernel.shape[-1]
    kernel_shape = kernel.shape[:-1] + (taps,)
    extractor = module.clone(
        parent=None, features=taps, use_bias=False, precision=jax.lax.Precision.HIGHEST
    )

    def patches(x):
      one_hot = jnp.eye(taps, dtype=x.dtype).reshape(kernel_shape)
      out = extractor.apply({"params": {"kernel": one_hot}}, x)
      return out.reshape(x.shape[0], -1, taps)

    return "dense", patches
  if isinstance(module, nn.DenseGeneral):
    batch = _batch_size(module_path, x, 2)
    # Flax sorts `axis`: the kernel's input axes are in the input's order.
    axes = tuple(sorted(a % x.ndim for a in _tuple(module.axis)))
    if 0 in axes:
      raise ValueError(
          f"DenseGeneral layer '{module_path}' contracts the leading (batch) axis of its input; "
          "curvature statistics need axis 0 to be the batch."
      )
    d_in = kernel.size // math.prod(_tuple(module.features))

    def moved(x):
      x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
      return x.reshape(batch, -1, d_in)

    return "dense", moved
  batch = _batch_size(module_path, x, 2)
  return "dense", lambda x: x.reshape(batch, -1, x.shape[-1])


def _interceptor(owners, perturbations, calls, inputs_seen, skipped, readers):
  """Records each captured layer call and perturbs its output.

  ``calls`` receives the static description of each call, ``inputs_seen`` its raw inputs,
  ``readers`` the functions that turn those into ``[B, T, d_in]``, and ``skipped`` the layers of
  the differentiated parameters that cannot be captured.
  """

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "setup":
      return next_fun(*args, **kwargs)
    path, param = _owned_layer(module, owners)
    if path is None:  # Not a layer of the differentiated parameters (frozen, or no params).
      return next_fun(*args, **kwargs)
    module_path = "/".join(module.path) or type(module).__name__
    reason = _unsupported(module, context.method_name)
    if reason is not None:
      skipped.setdefault(path, f"{module_path}: {reason}")
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    kind, reader = _input_reader(module, module_path, param, x)
    outputs = next_fun(*args, **kwargs)
    layer_calls = calls.setdefault(path, [])
    if perturbations is not None:
      outputs = outputs + perturbations[path][len(layer_calls)]
    layer_calls.append(
        _Call(
            kind=kind,
            input_shape=tuple(jax.eval_shape(reader, x).shape),
            output=jax.ShapeDtypeStruct(outputs.shape, outputs.dtype),
            varying=_varying_axes(outputs),
            use_bias=bool(getattr(module, "use_bias", False)),
            module_path=module_path,
            out_size=math.prod(outputs.shape[outputs.ndim - _output_axes(module):]),
            num_embeddings=int(getattr(module, "num_embeddings", 0)),
        )
    )
    inputs_seen.setdefault(path, []).append(x)
    readers.setdefault(path, []).append(reader)
    return outputs

  return intercept


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


def _layer_statistics(
    path: _tree.Path,
    calls: Sequence[_Call],
    readers: Sequence[Callable[[jax.Array], jax.Array]],
    inputs: Sequence[jax.Array],
    output_grads: Sequence[jax.Array],
    curvature: str,
) -> _statistics.LayerStatistics:
  """Turns one layer's recorded calls into its factor statistics.

  Each call contributes its positions as locations; a layer called several times (weight sharing)
  has its locations summed, which is exact for the per-example gradient ``sum_t a_t g_t^T``.
  """
  inputs = [read(x) for read, x in zip(readers, inputs)]
  batch = calls[0].input_shape[0]
  for call in calls:
    if call.input_shape[0] != batch:
      raise ValueError(
          f"Layer '{calls[0].module_path}' (parameters at '{_tree.path_str(path)}') is "
          f"called on batches of different sizes ({batch} and {call.input_shape[0]}) in one "
          "loss; weight sharing is supported only when every call sees the same examples."
      )
  # The perturbation gradient is dL/dy of the mean loss; per-example gradients are B times it.
  g = jnp.concatenate(
      [dy.reshape(batch, -1, call.out_size) * batch for call, dy in zip(calls, output_grads)],
      axis=1,
  )
  a = jnp.concatenate(inputs, axis=1)
  if calls[0].kind == "embed":
    return _statistics.embedding_statistics(a, g, calls[0].num_embeddings, curvature)
  if calls[0].use_bias:
    a = _statistics.homogeneous(a)
  return _statistics.dense_statistics(a, g, curvature)


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
  the mean loss over the batch's leading axis. Every ``nn.Dense``, ``nn.DenseGeneral`` (several output
  axes need a bias), ``nn.Conv`` (ungrouped) and ``nn.Embed`` that ``fun`` applies and whose kernel (or
  embedding) is a leaf of the differentiated argument(s) is captured, with its parameters found by
  identity, so the statistics line up with the ``params`` tree however deeply it is nested. The
  statistics are reduced inside the step to small ``(d, d)`` matrices. Layers of the
  differentiated parameters that ``fun`` applies but that cannot be captured are listed, with the
  reason, in ``stats.skipped``.

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

    def call(diff, perturbations, calls, inputs_seen, skipped, readers):
      full = list(args)
      for i, value in zip(argnums_tuple, diff):
        full[i] = value
      owners = _param_owners(diff[0] if single else diff)
      intercept = _interceptor(owners, perturbations, calls, inputs_seen, skipped, readers)
      with nn.intercept_methods(intercept):
        return fun(*full, **kwargs)

    diff = tuple(args[i] for i in argnums_tuple)
    if axes:
      diff = jax.tree.map(lambda x: _as_varying(x, axes), diff)
      if fisher_key is not None:
        for name in axes:
          fisher_key = jax.random.fold_in(fisher_key, jax.lax.axis_index(name))
    # A shape-only pass finds the layers and their output shapes, so that the real pass can
    # differentiate with respect to zero perturbations of those shapes.
    found: dict[_tree.Path, list[_Call]] = {}
    skipped: dict[_tree.Path, str] = {}
    jax.eval_shape(lambda d: call(d, None, found, {}, skipped, {}), diff)
    perturbations = {
        # Varying like the layer's output, so that its cotangent stays the shard's own.
        path: [
            _as_varying(jnp.zeros(c.output.shape, c.output.dtype), tuple(sorted(c.varying)))
            for c in layer_calls
        ]
        for path, layer_calls in found.items()
    }

    readers: dict[_tree.Path, list[Callable[[jax.Array], jax.Array]]] = {}

    def differentiable(diff, perturbations):
      calls: dict[_tree.Path, list[_Call]] = {}
      inputs: dict[_tree.Path, list[jax.Array]] = {}
      readers.clear()
      out = call(diff, perturbations, calls, inputs, {}, readers)
      if calls != found:
        raise RuntimeError(
            "The loss applied different layers in two traces; value_grad_and_stats needs "
            "the loss to be a pure function of its arguments."
        )
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, inputs)

    if fisher == "empirical":
      (loss, (aux, inputs)), (grads, output_grads) = jax.value_and_grad(
          differentiable, argnums=(0, 1), has_aux=True
      )(diff, perturbations)
      read_output_grads = lambda: output_grads  # noqa: E731  Shared with the gradient.
    else:  # The extra backward pass runs only where the statistics are due.
      loss, aux, inputs, grads, read_output_grads = _sampled_backward(
          differentiable, diff, perturbations, fisher_key
      )
    # A layer that is also applied in a way that cannot be captured has incomplete statistics.
    captured = [path for path in found if path not in skipped]

    def reduce(inputs):
      output_grads = read_output_grads()
      layers = {
          path: _layer_statistics(
              path, found[path], readers[path], inputs[path], output_grads[path], curvature
          )
          for path in captured
      }
      return jax.lax.pmean(layers, axes) if axes else layers

    inputs = {path: inputs[path] for path in captured}
    if stats_due is None:
      layers, due = reduce(inputs), None
    else:
      due = _check_due(stats_due)
      layers = jax.lax.cond(due, reduce, functools.partial(_no_statistics, reduce, axes), inputs)
    if axes:
      loss, grads = jax.lax.pmean((loss, grads), axes)
    value = (loss, aux) if has_aux else loss
    grads = grads[0] if single else grads
    return value, grads, Statistics(
        layers=_tree.nest(layers),
        curvature=curvature,
        skipped=tuple((_tree.path_str(p), reason) for p, reason in skipped.items()),
        due=due,
    )

  return wrapped


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


def _no_statistics(reduce, averaged_axes, inputs):
  """Zeros in place of ``reduce(inputs)``, computing nothing.

  Inside ``jax.shard_map`` the zeros vary over the mesh axes that the layer's own statistics
  vary over (those of its inputs, less the ``averaged_axes`` that ``reduce`` averages over), so
  that both branches of the ``lax.cond`` have one type.
  """
  shapes = jax.eval_shape(reduce, inputs)
  out = {}
  for path, stats in shapes.items():
    axes = frozenset().union(*(_varying_axes(x) for x in inputs[path])) - frozenset(averaged_axes)
    axes = tuple(sorted(axes))
    out[path] = jax.tree.map(lambda s: _as_varying(jnp.zeros(s.shape, s.dtype), axes), stats)
  return out


def _sampled_backward(differentiable, diff, perturbations, key):
  """One forward pass and the backward pass from the loss (the parameter gradient); returns with
  them a function that runs the second backward pass, from the marked model output with sampled
  targets (the layers' output gradients), so that it can run only where statistics are due."""
  distribution = None

  def forward(diff, perturbations):
    nonlocal distribution
    with _losses.recording_outputs() as marks:
      loss, (aux, inputs) = differentiable(diff, perturbations)
    if len(marks) != 1:
      raise ValueError(
          "fisher='sampled' needs the loss to mark exactly one model output, by computing its "
          "value with tkfac_jax.softmax_cross_entropy, tkfac_jax.sigmoid_binary_cross_entropy or "
          f"tkfac_jax.squared_error; this loss marked {len(marks)}."
      )
    distribution, output = marks[0]
    return (loss, output), (aux, inputs)

  def hidden_output(error):
    return ValueError(
        "fisher='sampled': the loss helper was called under a JAX transformation inside the loss "
        "(jax.vmap, lax.scan, jax.checkpoint, ...), so its output cannot be reached. Call "
        "tkfac_jax.softmax_cross_entropy, sigmoid_binary_cross_entropy or squared_error "
        "directly on the batched model output."
    )

  try:
    (loss, output), vjp_fn, (aux, inputs) = jax.vjp(forward, diff, perturbations, has_aux=True)
    grads, _ = vjp_fn((jnp.ones_like(loss), jnp.zeros_like(output)))
  except jax.errors.UnexpectedTracerError as error:
    raise hidden_output(error) from error

  def output_grads():
    try:
      sampled = _losses.sampled_output_gradient(distribution, output, key).astype(output.dtype)
      return vjp_fn((jnp.zeros_like(loss), sampled))[1]
    except jax.errors.UnexpectedTracerError as error:
      raise hidden_output(error) from error

  return loss, aux, inputs, grads, output_grads
