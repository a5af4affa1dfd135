"""``scale_by_tkfac``: the TKFAC preconditioner as an Optax gradient transformation."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import optax

from tkfac_jax import _capture
from tkfac_jax import _inverses
from tkfac_jax import _schedule
from tkfac_jax import _spread
from tkfac_jax import _statistics
from tkfac_jax import _tree

_MISSING = object()
# The default damping: relative to each block's mean eigenvalue in the scale-invariant mode (from
# benchmarks/defaults.py), absolute in the paper's mode.
RELATIVE_DAMPING = 10.0
ABSOLUTE_DAMPING = 1e-2
# The share of the largest curvature seen below which the scale-invariant mode stops following it
# (an empirical Fisher vanishes as the training loss reaches zero).
CURVATURE_FLOOR = 1e-4


class LayerState(NamedTuple):
  """The running curvature of one layer.

  Attributes:
    statistics: exponential moving averages of the batch :class:`LayerStatistics` (the
      un-normalised numerators and ``delta``; ``Phi = phi / delta``).
    count: how many batches have been folded in (skipped non-finite batches do not count).
    inverses: the damped inverses ``Phi_hat^-1`` and ``Psi_hat^-1`` in use (identity until the
      layer's first statistics arrive).
    damping: the ``lambda`` those inverses were computed with (0 until then).
    peak: the largest trace the running statistics' Fisher block has had (0 until the first
      statistics); ``curvature_floor`` of it bounds the curvature the damping and the step's scale
      are relative to from below.
    work: the refresh in progress, for a layer whose Newton-Schulz refresh is spread over the
      steps of the period (:mod:`tkfac_jax._schedule`); else ``None``.
  """

  statistics: _statistics.LayerStatistics
  count: jax.Array
  inverses: _inverses.DampedInverses
  damping: jax.Array
  peak: jax.Array
  work: Any = None


class ScaleByTKFACState(NamedTuple):
  """State of :func:`scale_by_tkfac`.

  Attributes:
    count: number of updates taken.
    layers: nested dict mirroring ``params``: at each preconditioned layer's parameter node, its
      :class:`LayerState`.
    kl_scale: the factor the last update was scaled by for KL clipping (1 without clipping).
    fallback: the state of the fallback transformation.
    stats_due: whether the next update folds in statistics (every ``stats_every`` updates, and
      until the layers given statistics have had some); read it with :func:`stats_due`.
  """

  count: jax.Array
  layers: Any
  kl_scale: jax.Array
  fallback: Any = optax.EmptyState()
  stats_due: jax.Array = True


def _is_layer_state(x) -> bool:
  return isinstance(x, LayerState)


def _is_layer_stats(x) -> bool:
  return isinstance(x, _statistics.LayerStatistics)


def _lead(layer: LayerState) -> int:
  """How many leading axes stack copies of the layer (``nn.scan``), each with its own factors."""
  return layer.count.ndim


def _per_layer(fn, lead: int, *, inverts: bool = False):
  """``fn`` mapped over ``lead`` leading axes of all its arguments (itself when ``lead == 0``).

  ``inverts``: ``fn`` inverts matrices. On CPU it then runs layer after layer (``lax.map``, one
  compiled loop) rather than batched by ``jax.vmap``: there a batched Cholesky inside a
  conditional deadlocked XLA's CPU runtime (jax 0.10.2, measured: the train step of an
  ``nn.scan`` stack hung on one start in three, every time with ``OPENBLAS_NUM_THREADS=1``), and
  per layer the inversion's own conditionals (Newton-Schulz from the previous inverse, Cholesky
  only where it does not converge) stay conditionals instead of both branches running for all
  layers. Accelerators invert the stack batched.
  """
  if lead == 0:
    return fn
  if inverts and jax.default_backend() == "cpu":
    inner = _per_layer(fn, lead - 1, inverts=True)
    return lambda *args: jax.lax.map(lambda xs: inner(*xs), args)
  for _ in range(lead):
    fn = jax.vmap(fn)
  return fn


def _broadcast(mask: jax.Array, like: jax.Array) -> jax.Array:
  """A per-layer ``mask`` (of a stack's leading axes, or a scalar) shaped to broadcast over
  ``like``."""
  return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def _masked_sum(mask: jax.Array, x: jax.Array) -> jax.Array:
  """The sum of ``x`` over the layers where ``mask`` holds."""
  if mask.ndim == 0:
    return jnp.where(mask, jnp.sum(x), 0.0)
  return jnp.sum(jnp.where(_broadcast(mask, x), x, 0.0))


def _unstacked(block: dict[str, Any], lead: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one layer of a stack's parameters."""
  return {k: jax.ShapeDtypeStruct(jnp.shape(v)[lead:], jnp.result_type(v)) for k, v in block.items()}


def _check_concrete(name: str, value: Any, ok, requirement: str) -> None:
  """Validates a hyperparameter at trace time when it is a concrete value (not under a tracer)."""
  if value is None or callable(value):
    return
  try:
    value = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return  # Traced, for example under optax.inject_hyperparams: nothing to check statically.
  if not ok(value):
    raise ValueError(f"{name} must be {requirement}, got {value!r}.")


def _layer_blocks(tree: Any, layer_paths, what: str) -> dict[_tree.Path, dict[str, Any]]:
  """The parameter leaves (kernel or embedding, and bias) of each layer in ``tree``."""
  flat = _tree.flatten_with_paths(tree)
  blocks = {}
  for path in layer_paths:
    block = {k: flat[path + (k,)] for k in ("kernel", "embedding", "bias") if path + (k,) in flat}
    if "kernel" not in block and "embedding" not in block:
      raise ValueError(
          f"The {what} have no 'kernel' or 'embedding' at '{_tree.path_str(path)}', a layer the "
          f"optimizer state was initialised with. Pass {what} with the structure of the params "
          "given to init()."
      )
    blocks[path] = block
  return blocks


def _output_axes(block: dict[str, Any]) -> int:
  """How many of the kernel's last axes are outputs: the bias's (two for an attention projection
  with ``features=(heads, head_dim)``), else one."""
  return len(block["bias"].shape) if "bias" in block else 1


def _block_shape(block: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, int]]:
  """Shapes of ``phi`` and ``psi`` for a layer's parameters.

  A kernel's input side is every axis but the output axes (a convolution's taps and input
  channels, in the order of its patches); the bias is the homogeneous coordinate. Several output
  axes (``features=(heads, head_dim)``) make one output block over all of them, so that the
  output factor sees the correlations between heads. An embedding's input factor is diagonal.
  """
  if "embedding" in block:
    num_embeddings, features = block["embedding"].shape
    return (num_embeddings,), (features, features)
  kernel, out_axes = block["kernel"], _output_axes(block)
  d_out = math.prod(kernel.shape[-out_axes:])
  d_in = math.prod(kernel.shape[:-out_axes]) + ("bias" in block)
  return (d_in, d_in), (d_out, d_out)


def _is_conv(block: dict[str, Any]) -> bool:
  return "kernel" in block and len(block["kernel"].shape) - _output_axes(block) > 1


def _augmented(block: dict[str, jax.Array]) -> jax.Array:
  """The ``(d_in [+ 1], d_out)`` gradient block, ``[W; b]`` with the bias as the last row."""
  if "embedding" in block:
    return block["embedding"].astype(jnp.float32)
  kernel = block["kernel"].astype(jnp.float32)
  d_out = math.prod(kernel.shape[-_output_axes(block):])
  kernel = kernel.reshape(-1, d_out)
  if "bias" not in block:
    return kernel
  return jnp.concatenate([kernel, block["bias"].astype(jnp.float32).reshape(1, d_out)], axis=0)


def _split(matrix: jax.Array, block: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The inverse of :func:`_augmented`."""
  if "embedding" in block:
    return {"embedding": matrix.astype(block["embedding"].dtype)}
  kernel = block["kernel"]
  rows = kernel.size // matrix.shape[-1]
  out = {"kernel": matrix[:rows].reshape(kernel.shape).astype(kernel.dtype)}
  if "bias" in block:
    out["bias"] = matrix[-1].reshape(block["bias"].shape).astype(block["bias"].dtype)
  return out


def _fold_in(
    layer: LayerState, batch: _statistics.LayerStatistics, decay, curvature: str
) -> tuple[LayerState, jax.Array]:
  """One exponential-moving-average step (and the block's largest trace so far); a batch with
  NaN/Inf statistics is skipped."""
  finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in batch]))
  first = layer.count == 0
  statistics = jax.tree.map(
      lambda old, new: jnp.where(
          finite,
          jnp.where(first, new, decay * old + (1 - decay) * new).astype(old.dtype),
          old,
      ),
      layer.statistics,
      batch,
  )
  count = layer.count + finite.astype(layer.count.dtype)
  layer = layer._replace(statistics=statistics, count=count)
  trace, _ = _mean_curvature(layer, curvature)
  peak = jnp.maximum(layer.peak, trace.astype(layer.peak.dtype))
  return layer._replace(peak=peak), first & finite


def _fold_due(layer_states, batch, decay, due, curvature):
  """Folds ``batch`` into the running statistics where ``due``, under ``lax.cond`` so that a step
  without statistics does not touch the factors; returns them and, per layer, whether it got its
  first statistics."""
  no_first = {path: jnp.zeros((), bool) for path in layer_states}

  def fold(layer_states):
    layer_states, firsts = dict(layer_states), dict(no_first)
    for path in batch:
      fold_in = _per_layer(
          lambda s, b: _fold_in(s, b, decay, curvature), _lead(layer_states[path])
      )
      layer_states[path], first = fold_in(layer_states[path], batch[path])
      firsts[path] = jnp.any(first)  # A stack's layers are refreshed together.
    return layer_states, firsts

  return jax.lax.cond(due, fold, lambda s: (dict(s), dict(no_first)), layer_states)


def _cost(layer: LayerState) -> float:
  """The relative cost of inverting a layer's two factors (``n^3`` each; ``n`` for a diagonal),
  times the layers of a stack."""
  lead = _lead(layer)
  return math.prod(layer.count.shape) * sum(
      float(x.shape[-1]) ** (3 if x.ndim - lead == 2 else 1)
      for x in (layer.statistics.phi, layer.statistics.psi)
  )


def _static_period(inverse_every) -> int | None:
  """``inverse_every`` as an int, or ``None`` where it is an array (``optax.inject_hyperparams``
  makes every numeric argument one unless it is named in its ``static_args``)."""
  if isinstance(inverse_every, (jax.Array, jax.core.Tracer)):
    return None
  return int(inverse_every)


def _refresh_groups(layer_states: dict, inverse_every) -> list[list[_tree.Path]]:
  """The layers split into at most ``inverse_every`` groups of balanced inversion cost, each
  refreshed on its own step of the period. One group when there is one layer, or when
  ``inverse_every`` is traced: ``optax.inject_hyperparams`` makes every numeric argument a traced
  hyperparameter unless it is named in its ``static_args``, so pass
  ``static_args=("inverse_every",)`` there to keep the refreshes staggered."""
  try:
    period = int(inverse_every)
  except (TypeError, jax.errors.ConcretizationTypeError):
    period = 1
  paths = list(layer_states)
  count = max(1, min(period, len(paths)))
  owners = _spread.assign([_cost(layer_states[p]) for p in paths], count)
  groups = [[p for p, owner in zip(paths, owners) if owner == g] for g in range(count)]
  return [g for g in groups if g]


def _refresh(
    layer_states: dict,
    *,
    dampings: dict,
    curvature: str,
    pi_damping: bool,
    inverse_method: str,
    inverse_axis: str | None,
    mesh,
) -> dict:
  """Recomputes the damped inverses of ``layer_states`` (all, or one staggered group).

  A layer whose factors cannot be inverted (or that has no statistics yet) keeps its previous
  inverses and damping.
  """
  # A layer's inverses were computed from statistics once its damping is set (with damping=0
  # this stays false, and every refresh is a Cholesky inverse).
  inputs = {
      path: (layer.statistics, dampings[path], layer.inverses, layer.damping > 0)
      for path, layer in layer_states.items()
  }

  def invert(inputs):
    one = lambda *x: _inverses.damped_inverses(*x, curvature, pi_damping, inverse_method)  # noqa: E731
    return _per_layer(one, jnp.ndim(inputs[3]), inverts=True)(*inputs)

  if inverse_axis is None:
    results = {path: invert(x) for path, x in inputs.items()}
  else:
    costs = {path: _cost(layer) for path, layer in layer_states.items()}
    results = _spread.spread(invert, inputs, costs, inverse_axis, mesh)
  out = {}
  for path, layer in layer_states.items():
    new, ok = results[path]
    use = ok & (layer.count > 0)
    out[path] = layer._replace(
        inverses=jax.tree.map(
            lambda n, o: jnp.where(_broadcast(use, n), n, o), new, layer.inverses
        ),
        damping=jnp.where(use, dampings[path], layer.damping),
    )
  return out


def _mean_curvature(layer: LayerState, curvature: str) -> tuple[jax.Array, int]:
  """The trace of a layer's Kronecker-factored Fisher block (one per layer of a stack), and the
  block's size ``d_in d_out``.

  TKFAC: ``tr(delta Psi kron Phi) = delta``; K-FAC: ``tr(A) tr(G)``. (Traces only: this runs on
  every step.)
  """
  stats, lead = layer.statistics, _lead(layer)
  size = stats.phi.shape[-1] * stats.psi.shape[-1]
  if curvature == "tkfac":
    return stats.delta, size
  diagonal = stats.phi.ndim - lead == 1
  trace_phi = jnp.sum(stats.phi, -1) if diagonal else jnp.trace(stats.phi, axis1=-2, axis2=-1)
  return trace_phi * jnp.trace(stats.psi, axis1=-2, axis2=-1), size


def _floored_curvature(layer: LayerState, curvature: str, floor) -> tuple[jax.Array, int]:
  """:func:`_mean_curvature`'s trace, at least ``floor`` times the largest it has been."""
  trace, size = _mean_curvature(layer, curvature)
  return jnp.maximum(trace, floor * layer.peak.astype(trace.dtype)), size


def find_states(opt_state: Any) -> list[ScaleByTKFACState]:
  """Every :class:`ScaleByTKFACState` inside an optimizer state (a chain, a wrapper, ...)."""
  is_state = lambda x: isinstance(x, ScaleByTKFACState)  # noqa: E731
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def stats_due(opt_state: Any) -> jax.Array:
  """Whether the next update of the optimizer whose state this is folds in statistics.

  Pass it to the function made by :func:`value_grad_and_stats`, inside the jitted train step, so
  that the statistics are computed only on the steps that use them (every ``stats_every``):

  .. code-block:: python

    loss, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn)(
        params, x, y, stats_due=tkfac_jax.stats_due(opt_state))

  Args:
    opt_state: the state of :func:`tkfac` or :func:`scale_by_tkfac`, or of any chain or wrapper
      holding one (``optax.inject_hyperparams``, :func:`multi_steps`, ``optax.partition``).

  Returns:
    A boolean scalar array (true when any of the TKFAC states inside is due).
  """
  states = find_states(opt_state)
  if not states:
    raise ValueError(
        "stats_due needs an optimizer state holding a scale_by_tkfac state (the state of "
        f"tkfac_jax.tkfac or a chain with scale_by_tkfac); got {type(opt_state).__name__}."
    )
  due = jnp.asarray(states[0].stats_due, bool)
  for state in states[1:]:
    due = due | state.stats_due
  return due


def scale_by_tkfac(
    damping: chex.Numeric | None = None,
    *,
    decay: chex.Numeric = 0.95,
    stats_every: chex.Numeric = 10,
    inverse_every: chex.Numeric = 100,
    curvature: _statistics.Curvature = "tkfac",
    scale_invariant: bool = True,
    curvature_floor: chex.Numeric = CURVATURE_FLOOR,
    pi_damping: bool | None = None,
    conv_damping_floor: chex.Numeric | None = None,
    inverse_method: _inverses.InverseMethod = "newton_schulz",
    stagger: bool = True,
    kl_clip: chex.Numeric | None = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
    fallback: optax.GradientTransformation | None = None,
    layers: Sequence[str] | None = None,
    stacked: Mapping[str, int] | None = None,
    dtype: Any = None,
    inverse_axis: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions layers' gradients with TKFAC's damped Kronecker-factored Fisher.

  For each captured layer (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Embed``) with
  gradient block ``G = [dW; db]`` (a kernel reshaped to ``(inputs, outputs)``, the bias as the last
  row). An attention projection (``DenseGeneral`` with ``features=(heads, head_dim)`` and a bias of
  that shape) is one block over all its ``heads * head_dim`` outputs rather than one block per
  head. Measured (``benchmarks/attention_blocks.py``: a 2-block, 4-head, width-32 character
  language model, 3 seeds, 2026-12-04) both reach each validation loss in the same number of
  steps (within one evaluation, 25 steps), while one block per head costs 1.12x the mean step
  and 2.2x the projections' optimizer state: with ``d_model = heads * head_dim``, per head the
  factors hold ``(heads + 1 / heads) d_model^2`` numbers against ``2 d_model^2``, and
  preconditioning takes ``2 heads`` small matrix products instead of two. One block also keeps
  the correlations between heads in its output factor. (Leaving the projections to the fallback
  took 1.25x the steps to a loss of 2.2 and did not reach 2.1.)

  .. math::
    \hat\Phi = \sqrt{\delta}\,\Phi + \sqrt{\lambda} I, \quad
    \hat\Psi = \sqrt{\delta}\,\Psi + \sqrt{\lambda} I, \quad
    U = \hat\Phi^{-1} G \hat\Psi^{-1}

  (TKFAC Eqs. 4.9, 5.14-5.15), where ``delta``, ``Phi`` and ``Psi`` are exponential moving averages
  of the statistics from :func:`value_grad_and_stats`. The inverses are recomputed every
  ``inverse_every`` steps inside the update (with ``lax.cond``), and as soon as a layer's first
  statistics arrive.

  Every other parameter (norm scales and biases, layers that cannot be captured, and layers that
  have not yet received statistics) takes the ``fallback`` transformation's update instead.

  **Stacks.** The layers of an ``nn.scan`` stack (``variable_axes={'params': 0}``: kernel
  ``(L, d_in, d_out)``) each get their own factors, held along the stack's leading axes in the
  state, folded, refreshed (in one batched computation) and applied layer by layer, exactly as the
  same layers unrolled. A stack with biases is recognised by the leading axes its bias shares
  with its kernel; one without needs ``stacked``.

  **Scale invariance** (``scale_invariant=True``, the default). The empirical Fisher scales as
  ``c^2`` when the loss is multiplied by ``c`` (a loss summed over pixels, tokens or the batch
  instead of averaged) while the gradient scales as ``c``, so with a fixed damping the update
  above changes with the loss's scale: nearly a plain gradient step where ``lambda`` dominates the
  curvature, nearly a natural-gradient step of size ``1/c`` where it does not. This mode removes
  ``c`` everywhere:

  * each layer's damping is relative to its block: ``lambda_l = damping * m_l``, where
    ``m_l = tr(F_l) / (d_in d_out)`` is the block's mean eigenvalue (``delta_l / (d_in d_out)`` for
    TKFAC; the paper's convolution damping is this with ``damping=1``), split over the factors
    with Martens & Grosse's ``pi``, so each factor is damped by ``sqrt(damping)`` times its own
    mean eigenvalue;
  * the update is ``sqrt(m) U``, where ``m`` is the mean eigenvalue over every preconditioned
    block (one scalar for the network, so the natural gradient's proportions between layers
    stay);
  * the parameters without a block take ``sqrt(m) G / (m (1 + damping))``: the same mean curvature,
    as an isotropic block (with the default ``fallback``; a user's fallback is used as given);
  * ``kl_clip`` bounds the step per parameter:
    ``lr^2 (sum_l <U_l, G_l> + <G, G> / (m (1 + damping))) / n <= kl_clip``, the sums over every
    parameter (``n`` of them). That is the squared length of the step in the Fisher metric
    rescaled to mean eigenvalue 1, per parameter: where the curvature is isotropic, the step's
    root mean square is at most ``sqrt(kl_clip)`` (``1e-6``: ``1e-3``, Adam's usual step). It does
    not change with ``c`` or with the network's size;
  * every ``m_l`` (and so ``m``) is at least ``curvature_floor`` times the largest it has been:
    once a network fits its training set the empirical Fisher vanishes with the loss, and the
    curvature stops being a measure of the loss's scale (see ``curvature_floor``).

  The update is then the same for a mean and a summed loss. ``scale_invariant=False`` is the
  paper's maths as written above: ``damping`` absolute, ``U`` as is, the fallback's update as is
  and outside the clip, and ``kl_clip`` the predicted KL divergence of the preconditioned blocks'
  step.

  The update takes the keyword-only extra argument ``stats``: the statistics of this step, or
  ``None`` to take a step with the curvature already in the state. Omitting it raises, so that
  forgetting the statistics is never silent. A layer whose batch statistics contain NaN or Inf
  keeps its previous factors, and a damped factor that cannot be inverted keeps the previous
  inverse, so bad statistics never reach the parameters.

  Statistics are folded in every ``stats_every`` updates (and on every update until each layer
  has had a batch of them). To pay for them only on those steps, pass
  ``stats_due=tkfac_jax.stats_due(opt_state)`` to the function made by
  :func:`value_grad_and_stats`: inside the one jitted train step it then computes the statistics
  under ``lax.cond`` only when they are due, and the optimizer folds them in only then. Statistics
  computed on a step where they are not due are ignored.

  Args:
    damping: the Tikhonov damping: relative to each block's mean eigenvalue when
      ``scale_invariant`` (the default), else ``lambda`` itself, split as ``sqrt(lambda)`` over
      the two factors. ``None``: ``10`` when ``scale_invariant``, else ``1e-2``.
    decay: ``eps`` of the moving averages ``X <- eps X + (1 - eps) X_batch``; the first batch
      initialises them.
    stats_every: fold in statistics every this many updates.
    inverse_every: recompute the damped inverses every this many steps.
    curvature: ``"tkfac"`` (trace-restricted factors) or ``"kfac"`` (K-FAC's ``A`` and ``G``, for
      ablations). Statistics must be captured with the same ``curvature``.
    scale_invariant: make the damping relative to the curvature and the update independent of the
      loss's scale (see above). ``False``: absolute damping, as in the paper.
    curvature_floor: with ``scale_invariant``, each block's mean eigenvalue ``m_l`` (for the
      damping) and the mean ``m`` (for the step's scale) are taken as at least ``curvature_floor``
      times the largest they have been. An empirical Fisher vanishes as the training loss reaches
      zero (a network that fits its training set): a damping relative to it alone would vanish
      with it, the inverses would grow without bound, and the next batch with a sizeable gradient
      would take a step that the KL clip does not contain (a dense layer's inverse factors grew
      past 1e6 and the MLP diverged on a training set of 1,500 examples). The floor is relative,
      so the update stays independent of the loss's scale; ``0`` follows the curvature all the
      way down.
    pi_damping: split the damping with Martens & Grosse's ``pi`` instead of evenly; ``None``
      (default): with ``pi`` when ``scale_invariant``, evenly (the paper's split) otherwise.
    conv_damping_floor: ``nu`` of TKFAC's damping for convolutions. If set, every layer whose kernel
      has more than two axes (a convolution; also a DenseGeneral that contracts several input
      axes, since the optimizer sees only the parameters) takes its own damping
      ``lambda_l = max(delta_l, nu) / (d_in d_out)``, proportional to its Fisher block's mean
      diagonal entry, instead of ``damping`` (which 2-D kernels keep). ``None``: one damping for
      all layers. The floor ``nu`` is absolute, so with ``scale_invariant`` it makes those layers'
      damping depend on the loss's scale again; the scale-invariant damping is already relative
      to each block and needs no floor.
    inverse_method: ``"newton_schulz"`` (default): matrix products from the inverse in use,
      checked by their residual, with a Cholesky inverse only where they do not converge (a
      layer's first refresh, a factor that moved far); ``"cholesky"``: a Cholesky inverse at every
      refresh. See :func:`tkfac_jax._inverses.inverse` for the measurements behind the default.
    stagger: spread the refreshes over the steps of the ``inverse_every`` period so that no step
      pays for them all. With ``"newton_schulz"``, a layer whose refresh costs more than a
      step's share is refreshed a block of rows of one matrix product per step, and the
      layers' blocks are balanced over the period (:mod:`tkfac_jax._schedule`): the inverses in
      use change on the refresh's last step, to the inverses of the factors as they were on its
      first. Such a layer holds three more arrays of each factor's size in the state (the
      factor being inverted, the iterate and their product). With ``"cholesky"`` or an
      ``inverse_axis``, the layers are split into groups of balanced cost, each refreshed on its
      own step. ``False``: every layer's refresh on the first step of the period. Under
      ``optax.inject_hyperparams``, name ``inverse_every`` in its ``static_args`` to keep this.
    kl_clip: if set, ``kappa`` of KL clipping: every preconditioned block is scaled by
      ``nu = min(1, sqrt(kappa / (lr^2 sum_l <U_l, G_l>)))``, which bounds the step's predicted KL
      divergence ``nu^2 lr^2 sum_l <U_l, G_l>`` by ``kappa``; when ``scale_invariant``, the bound
      is per parameter and covers the default fallback's parameters too (see above). Needs
      ``learning_rate``.
    learning_rate: the learning rate (or schedule) applied later in the chain; used only by
      ``kl_clip``.
    fallback: the transformation for the parameters that are not preconditioned, for example
      ``optax.scale_by_adam()``; ``None`` passes their gradient through. It is given every
      gradient (so that a layer can move between the two) and only its updates for those
      parameters are used.
    layers: paths (``"encoder/Dense_0"``) of the layers to precondition. Default: every parameter
      node with a ``kernel`` of two or more axes, or a 2-D ``embedding``.
    stacked: for layers stacked by ``nn.scan`` (a kernel with a leading layer axis), how many
      leading axes stack them, by path prefix: ``{"blocks": 1}``. Each layer of a stack gets its
      own factors, held along the stack's axes in the state and inverted together. Needed only
      where the shapes cannot tell: a stacked layer with a bias is recognised by the axes its
      bias shares with the kernel (``(L, d_in, d_out)`` and ``(L, d_out)``), but a kernel
      without a bias could as well be a convolution's. The update raises, naming the layer, when
      the statistics show a stack that the state does not have.
    dtype: dtype of the factors and inverses; ``None`` means float32. (A dtype default would be
      taken for a schedule by ``optax.inject_hyperparams``, which treats callables as schedules.)
    inverse_axis: a mesh axis (for data parallelism, the batch axis) to spread the inverse work
      over. Each layer's inverses are computed by one device along the axis (layers balanced by
      the cost of their inversions, ``d_in^3 + d_out^3``) and shared with the others by one
      ``psum``, instead of every device computing all of them. The results are the same. ``None``
      (default): every device computes every inverse. Works inside ``jax.shard_map`` over the
      axis, and under ``jax.jit`` with the mesh given by ``mesh`` or ``jax.set_mesh``.
    mesh: the :class:`jax.sharding.Mesh` that ``inverse_axis`` belongs to, when the update runs
      under plain ``jax.jit`` without ``jax.set_mesh``.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`. Its ``update`` takes ``stats=`` (required)
    and, as Optax's extra-arguments protocol asks, any other keyword argument, which it passes on
    to ``fallback`` (so ``optax.chain(tkfac_jax.tkfac(...), optax.contrib.reduce_on_plateau())``
    takes ``value=loss``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, tkfac_jax
    >>> params = {'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}
    >>> tx = optax.chain(tkfac_jax.scale_by_tkfac(damping=1e-2), optax.scale(-0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params, stats=None)

  References:
    Gao et al., `A Trace-restricted Kronecker-Factored Approximation to Natural Gradient
    <https://arxiv.org/abs/2011.10741>`_, AAAI 2021.
  """
  if curvature not in _statistics.CURVATURES:
    raise ValueError(f"curvature must be one of {_statistics.CURVATURES}, got {curvature!r}.")
  if inverse_method not in _inverses.INVERSE_METHODS:
    raise ValueError(
        f"inverse_method must be one of {_inverses.INVERSE_METHODS}, got {inverse_method!r}."
    )
  if not isinstance(scale_invariant, bool):
    raise TypeError(f"scale_invariant must be True or False, got {scale_invariant!r}.")
  if damping is None:
    damping = RELATIVE_DAMPING if scale_invariant else ABSOLUTE_DAMPING
  _check_concrete("damping", damping, lambda v: v >= 0, "non-negative")
  _check_concrete("decay", decay, lambda v: 0 <= v < 1, "in [0, 1)")
  _check_concrete("curvature_floor", curvature_floor, lambda v: 0 <= v <= 1, "in [0, 1]")
  _check_concrete(
      "inverse_every", inverse_every, lambda v: int(v) == v and v >= 1, "a positive integer"
  )
  _check_concrete(
      "stats_every", stats_every, lambda v: int(v) == v and v >= 1, "a positive integer"
  )
  _check_concrete("kl_clip", kl_clip, lambda v: v > 0, "positive (or None to disable)")
  _check_concrete(
      "conv_damping_floor", conv_damping_floor, lambda v: v > 0, "positive (or None to disable)"
  )
  if kl_clip is not None and learning_rate is None:
    raise ValueError("kl_clip needs learning_rate: pass the learning rate (or schedule) used.")
  if inverse_axis is not None and not isinstance(inverse_axis, str):
    raise TypeError(f"inverse_axis must be a mesh axis name (a str), got {inverse_axis!r}.")
  if mesh is not None and inverse_axis not in mesh.axis_names:
    raise ValueError(
        f"mesh has axes {mesh.axis_names}, without inverse_axis={inverse_axis!r}: pass "
        "inverse_axis, the mesh axis to spread the inverses over."
    )
  selected = None if layers is None else {tuple(p.split("/")): p for p in layers}
  if stacked is not None and not (
      isinstance(stacked, Mapping)
      and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in stacked.values())
  ):
    raise TypeError(
        "stacked must map layer path prefixes to how many leading axes stack the layers under "
        f"them, for example {{'blocks': 1}}; got {stacked!r}."
    )
  stacked_paths = {tuple(p.split("/")) if p else (): n for p, n in (stacked or {}).items()}
  dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
  split_by_pi = scale_invariant if pi_damping is None else pi_damping
  # Scale-invariant mode preconditions the parameters without a block by the mean curvature, which
  # it can do only for the default fallback (the plain gradient); a user's fallback is left as is.
  curvature_fallback = scale_invariant and fallback is None
  fallback = optax.with_extra_args_support(optax.identity() if fallback is None else fallback)

  def find_layers(params) -> dict[_tree.Path, _tree.LayerNode]:
    found = _tree.layer_nodes(params, stacked_paths)
    # Every kernel under a prefix of ``stacked`` must be a stack of that many axes.
    kernels = {
        path[:-1]: jnp.shape(leaf)
        for path, leaf in _tree.flatten_with_paths(params).items()
        if path and path[-1] in ("kernel", "embedding")
    }
    for prefix, lead in stacked_paths.items():
      under = [p for p in kernels if p[:len(prefix)] == prefix]
      if not under:
        raise ValueError(
            f"stacked names '{_tree.path_str(prefix)}', under which params has no layer; layers "
            f"found: {[_tree.path_str(p) for p in kernels]}."
        )
      for path in under:
        if path not in found:
          raise ValueError(
              f"stacked={{'{_tree.path_str(prefix)}': {lead}}}: the layer at "
              f"'{_tree.path_str(path)}' (kernel shape {kernels[path]}) is not a stack of "
              f"{lead} leading axes over a layer (its bias, if any, must share them)."
          )
    if selected is None:
      if not found:
        raise ValueError(
            "scale_by_tkfac found no layer to precondition in params: it looks for parameter "
            "nodes with a 'kernel' of two or more axes (Dense, Conv) or an 'embedding' (Embed)."
        )
      return found
    missing = [name for path, name in selected.items() if path not in found]
    if missing:
      raise ValueError(
          f"layers={list(selected.values())} names {missing}, which are not layers of params; "
          f"layers found: {[_tree.path_str(p) for p in found]}."
      )
    return {path: found[path] for path in selected}

  def refresh_plans(shapes: dict, copies: dict) -> dict[_tree.Path, _schedule.LayerPlan] | None:
    """Where each layer's refresh runs in the period, when the Newton-Schulz refreshes are spread
    over its steps (``stagger``, a static ``inverse_every``, no ``inverse_axis``); else ``None``.
    ``copies``: how many layers each stack has."""
    period = _static_period(inverse_every)
    if not (stagger and inverse_method == "newton_schulz" and inverse_axis is None and period):
      return None
    return _schedule.plan(shapes, period, copies) if shapes else None

  def init_fn(params):
    layer_states = {}
    nodes = find_layers(params)
    shapes = {path: _block_shape(_unstacked(n.params, n.lead)) for path, n in nodes.items()}
    stacks = {path: n.stack for path, n in nodes.items()}
    plans = refresh_plans(shapes, {p: math.prod(s) for p, s in stacks.items()}) or {}
    for path, (phi_shape, psi_shape) in shapes.items():
      eye_phi = jnp.ones(phi_shape, dtype) if len(phi_shape) == 1 else jnp.eye(*phi_shape, dtype=dtype)
      chunked = path in plans and plans[path].chunked
      layer = LayerState(
          statistics=_statistics.LayerStatistics(
              phi=jnp.zeros(phi_shape, dtype),
              psi=jnp.zeros(psi_shape, dtype),
              delta=jnp.zeros((), dtype),
          ),
          count=jnp.zeros((), jnp.int32),
          inverses=_inverses.DampedInverses(phi=eye_phi, psi=jnp.eye(*psi_shape, dtype=dtype)),
          damping=jnp.zeros((), dtype),
          peak=jnp.zeros((), dtype),
          work=_schedule.empty_work(phi_shape, psi_shape, dtype) if chunked else None,
      )
      # A stack's layers: the same state along its leading axes.
      layer_states[path] = jax.tree.map(
          lambda x, stack=stacks[path]: jnp.broadcast_to(x, stack + x.shape), layer
      )
    return ScaleByTKFACState(
        count=jnp.zeros((), jnp.int32),
        layers=_tree.nest(layer_states),
        kl_scale=jnp.ones((), jnp.float32),
        stats_due=jnp.ones((), bool),
        fallback=fallback.init(params),
    )

  def batch_statistics(
      stats, layer_states, updates
  ) -> dict[_tree.Path, _statistics.LayerStatistics]:
    """Validates this step's statistics against the state (all checks are static).

    Statistics of layers that ``optax.masked`` or ``optax.partition`` masked out of ``updates``
    (as ``optax.MaskedNode``) belong to another transformation and are ignored.
    """
    if not isinstance(stats, _capture.Statistics):
      raise TypeError(
          "stats must be the statistics returned by tkfac_jax.value_grad_and_stats (or None to "
          f"step without new statistics), got {type(stats).__name__}."
      )
    if stats.curvature != curvature:
      raise ValueError(
          f"stats were captured with curvature={stats.curvature!r} but the optimizer uses "
          f"curvature={curvature!r}; pass the same value to value_grad_and_stats."
      )
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    masked = {
        _tree.path_str(path)
        for path, leaf in _tree.flatten_with_paths(updates, is_leaf=is_masked).items()
        if is_masked(leaf)
    }

    def masked_out(name: str) -> bool:
      """Whether the layer's node, an ancestor of it, or its kernel or embedding is masked out."""
      return any(
          name == m or name.startswith(m + "/") or m in (f"{name}/kernel", f"{name}/embedding")
          for m in masked
      )

    flat = {
        p: s
        for p, s in _tree.flatten_with_paths(stats.layers, is_leaf=_is_layer_stats).items()
        if p in layer_states or not masked_out(_tree.path_str(p))
    }
    skipped = {p: reason for p, reason in stats.skipped if not masked_out(p)}
    missing = [_tree.path_str(p) for p in layer_states if p not in flat]
    unknown = [] if selected is not None else [
        _tree.path_str(p) for p in flat if p not in layer_states
    ]
    if unknown:
      also = f", and none for {missing}, which it expects" if missing else ""
      raise ValueError(
          f"Statistics for layer(s) {unknown}, which the optimizer state does not have{also}: "
          "were they captured from another model than the params given to init()?"
      )
    unexplained = [p for p in missing if p not in skipped]
    if unexplained:
      raise ValueError(
          f"No statistics for layer(s) {unexplained}, which the optimizer state expects. Layers "
          "are captured when the loss applies them to the differentiated params as it gets them; "
          "a loss that rebuilds the params tree drops the 'tkfac_statistics' entry that "
          "value_grad_and_stats adds beside each kernel, and its layers are not seen. To leave a "
          "layer out of the preconditioner (its parameters then take the fallback), pass "
          "scale_by_tkfac(layers=[...]) with the layers to keep."
      )
    # Skipped layers the state has no factors for (a bias that is not one block) warn as well.
    in_state = {_tree.path_str(p) for p in layer_states}
    not_in_state = [p for p in skipped if p not in in_state] if selected is None else []
    for path in missing + not_in_state:
      warnings.warn(
          f"Layer '{path}' is not preconditioned ({skipped[path]}); its parameters take the "
          "fallback update. Pass scale_by_tkfac(layers=[...]) without it to silence this.",
          stacklevel=4,
      )
    stacks = {}  # Layers whose statistics come from a stack that the state does not hold.
    for path, layer in layer_states.items():
      if path not in flat:
        continue
      got = tuple(tuple(jnp.shape(x)) for x in flat[path])
      want = tuple(tuple(x.shape) for x in layer.statistics)
      # delta has one entry per layer of a stack.
      if got != want and got[2] and got[2] != want[2]:
        stacks[_tree.path_str(path)] = (got[2], want)
    if stacks:
      raise ValueError(
          f"Statistics for layer(s) {list(stacks)} come from nn.scan stacks with leading axes "
          f"{[got for got, _ in stacks.values()]}, but the optimizer state was initialised for "
          f"factors of shapes {[want for _, want in stacks.values()]}: the parameters' shapes do "
          "not tell (a kernel without a bias could be a convolution's, and a stack as deep as "
          "its input is wide a layer with two output axes). Pass "
          f"stacked={ {p: len(got) for p, (got, _) in stacks.items()} } (or the path prefix of "
          "the stacked block) to tkfac_jax.tkfac or scale_by_tkfac."
      )
    for path, layer in layer_states.items():
      if path not in flat:
        continue
      got = tuple(tuple(jnp.shape(x)) for x in flat[path])
      want = tuple(tuple(x.shape) for x in layer.statistics)
      if got != want:
        raise ValueError(
            f"Statistics for layer '{_tree.path_str(path)}' have shapes {got} but the optimizer "
            f"state has {want}: they come from a layer of another size (another model?)."
        )
    return {path: flat[path] for path in layer_states if path in flat}

  def layer_damping(layer: LayerState, block: dict[str, Any], floored):
    """The layer's ``lambda``: TKFAC's trace-proportional damping for a convolution (with
    ``conv_damping_floor``), else ``damping`` times the block's mean eigenvalue (scale-invariant;
    ``floored`` is its :func:`_floored_curvature`) or ``damping`` itself."""
    if conv_damping_floor is not None and _is_conv(block):
      d_in, d_out = layer.statistics.phi.shape[-1], layer.statistics.psi.shape[-1]
      return jnp.maximum(layer.statistics.delta, conv_damping_floor) / (d_in * d_out)
    if not scale_invariant:
      return damping
    trace, size = floored
    return damping * trace / size

  def update_fn(updates, state, params=None, *, stats=_MISSING, **extra_args):
    # Optax's extra-arguments protocol: keyword arguments meant for other transformations of a
    # chain (reduce_on_plateau's value=, ...) are accepted, and passed on to the fallback.
    if stats is _MISSING:
      raise ValueError(
          "scale_by_tkfac's update needs the keyword argument stats: pass the statistics from "
          "tkfac_jax.value_grad_and_stats, or stats=None to step with the curvature already in "
          "the state."
      )
    layer_states = _tree.flatten_with_paths(state.layers, is_leaf=_is_layer_state)
    grads = _layer_blocks(updates, layer_states, "updates")
    leads = {path: _lead(layer) for path, layer in layer_states.items()}
    for path, layer in layer_states.items():
      lead = leads[path]
      got = _block_shape(_unstacked(grads[path], lead))
      want = (layer.statistics.phi.shape[lead:], layer.statistics.psi.shape[lead:])
      same_stack = all(jnp.shape(v)[:lead] == layer.count.shape for v in grads[path].values())
      if got != want or not same_stack:
        raise ValueError(
            f"The gradient of layer '{_tree.path_str(path)}' has shapes "
            f"{ {k: v.shape for k, v in grads[path].items()} }, which need factors of shapes {got}, "
            f"but the optimizer state was initialised for {want}: params do not match the state."
        )
    if params is not None:
      _layer_blocks(params, layer_states, "params")

    step = state.count
    first_seen = {path: jnp.zeros((), bool) for path in layer_states}
    offered = []
    if stats is not None:
      batch = batch_statistics(stats, layer_states, updates)
      due = state.stats_due if stats.due is None else state.stats_due & stats.due
      layer_states, first_seen = _fold_due(layer_states, batch, decay, due, curvature)
      offered = list(batch)

    # Each block's trace (floored) and size, for its damping and for the step's scale: the
    # refreshes below change neither the statistics nor their peak.
    floored = {
        path: _floored_curvature(layer, curvature, curvature_floor)
        for path, layer in layer_states.items()
    }
    dampings = {
        path: jnp.broadcast_to(  # One per layer of a stack.
            jnp.asarray(
                layer_damping(layer, _unstacked(grads[path], leads[path]), floored[path]),
                layer.damping.dtype,
            ),
            layer.damping.shape,
        )
        for path, layer in layer_states.items()
    }
    refresh = functools.partial(
        _refresh,
        dampings=dampings,
        curvature=curvature,
        pi_damping=split_by_pi,
        inverse_method=inverse_method,
        inverse_axis=inverse_axis,
        mesh=mesh,
    )
    plans = refresh_plans(
        {p: (layer.statistics.phi.shape[leads[p]:], layer.statistics.psi.shape[leads[p]:])
         for p, layer in layer_states.items()},
        {p: math.prod(layer.count.shape) for p, layer in layer_states.items()},
    )
    if plans is not None:
      slot = step % inverse_every
      for path, layer_plan in plans.items():
        layer = layer_states[path]
        one = lambda layer, path=path: refresh({path: layer})[path]  # noqa: E731
        if layer_plan.chunked:
          # A layer's first statistics are inverted at once (by Cholesky: there is no previous
          # inverse to iterate from); then its refresh runs a block per step.
          layer = jax.lax.cond(first_seen[path], one, lambda x: x, layer)
          units = functools.partial(
              _schedule.step_units, slot=slot, plan=layer_plan, curvature=curvature,
              pi_damping=split_by_pi,
          )
          layer = _per_layer(lambda l, d: units(l, damping=d), leads[path], inverts=True)(
              layer, dampings[path]
          )
        else:
          due = (slot == _schedule.whole_slot(layer_plan)) | first_seen[path]
          layer = jax.lax.cond(due, one, lambda x: x, layer)
        layer_states[path] = layer
    else:
      groups = _refresh_groups(layer_states, inverse_every if stagger else 1)
      spacing = jnp.maximum(inverse_every // len(groups), 1)
      for group, paths in enumerate(groups):
        # Group g refreshes at steps g * spacing (mod inverse_every), so no step refreshes all.
        due = (step - group * spacing) % inverse_every == 0
        for path in paths:  # A layer's first statistics refresh its group at once.
          due = due | first_seen[path]
        part = jax.lax.cond(due, refresh, dict, {p: layer_states[p] for p in paths})
        layer_states.update(part)

    grad_blocks = {path: _per_layer(_augmented, leads[path])(b) for path, b in grads.items()}
    preconditioned = {
        path: _per_layer(_inverses.precondition, leads[path])(layer.inverses, grad_blocks[path])
        for path, layer in layer_states.items()
    }
    active = {path: layer.count > 0 for path, layer in layer_states.items()}

    # Everything starts as the fallback's update; preconditioned layers then replace theirs.
    fallback_updates, fallback_state = fallback.update(
        updates, state.fallback, params, **extra_args
    )
    flat_updates = _tree.flatten_with_paths(fallback_updates)
    # Which leaves take the fallback's update: all but those of layers with curvature.
    owner = {path + (name,): path for path, block in grads.items() for name in block}
    takes_fallback = {
        key: ~active[owner[key]] if key in owner else jnp.ones((), bool) for key in flat_updates
    }

    step_scale = jnp.ones((), jnp.float32)
    if scale_invariant:
      # m, the mean eigenvalue of the preconditioned layers' blocks: the update (F + lambda)^-1 G
      # scales as 1/c when the loss is multiplied by c, sqrt(m) U does not.
      traces = [floored[p] for p in layer_states]
      total = sum(
          jnp.sum(jnp.where(active[p], t, 0.0)) for p, (t, _) in zip(layer_states, traces)
      )
      size = sum(
          jnp.sum(jnp.where(active[p], float(n), 0.0)) for p, (_, n) in zip(layer_states, traces)
      )
      mean = (total / jnp.maximum(size, 1.0)).astype(jnp.float32)
      has_curvature = mean > 0
      mean = jnp.where(has_curvature, mean, 1.0)
      step_scale = jnp.where(has_curvature, jnp.sqrt(mean), 1.0)
      if curvature_fallback:
        # The parameters without a block get the same curvature, m (1 + damping) I.
        inv = jnp.where(has_curvature, 1.0 / (mean * (1.0 + damping)), 1.0)
        flat_updates = {
            key: jnp.where(_broadcast(takes_fallback[key], u), u * inv, u).astype(u.dtype)
            for key, u in flat_updates.items()
        }

    kl_scale = jnp.ones((), jnp.float32)
    if kl_clip is not None and scale_invariant:
      # How many parameters the clip's sum runs over: all of them with the default fallback,
      # else those of the layers with curvature.
      if curvature_fallback:
        bound_size = jnp.asarray(sum(u.size for u in flat_updates.values()), jnp.float32)
      else:
        bound_size = sum(  # Per layer of a stack: its share of u.
            jnp.sum(jnp.where(active[owner[key]], float(u.size // active[owner[key]].size), 0.0))
            for key, u in flat_updates.items() if key in owner
        )
    if kl_clip is not None:
      lr = learning_rate(step) if callable(learning_rate) else learning_rate
      vg = sum(_masked_sum(active[p], u * grad_blocks[p]) for p, u in preconditioned.items())
      if curvature_fallback:  # The fallback's parameters are inside the bound too.
        flat_grads = _tree.flatten_with_paths(updates)
        vg = vg + sum(
            _masked_sum(
                takes_fallback[key],
                u.astype(jnp.float32) * flat_grads[key].astype(jnp.float32),
            )
            for key, u in flat_updates.items()
        )
      if scale_invariant:
        # Per parameter: the bound is then the same for a small and a large network.
        vg = vg / jnp.maximum(bound_size, 1)
      vg = lr**2 * vg
      ok = vg > 0
      kl_scale = jnp.where(ok, jnp.minimum(1.0, jnp.sqrt(kl_clip / jnp.where(ok, vg, 1.0))), 1.0)
    preconditioned = {p: u * (kl_scale * step_scale) for p, u in preconditioned.items()}
    if curvature_fallback:
      flat_updates = {
          key: jnp.where(
              _broadcast(takes_fallback[key], u), u * (kl_scale * step_scale), u
          ).astype(u.dtype)
          for key, u in flat_updates.items()
      }

    for path, u in preconditioned.items():
      for name, value in _per_layer(_split, leads[path])(u, grads[path]).items():
        key = path + (name,)
        flat_updates[key] = jnp.where(_broadcast(active[path], value), value, flat_updates[key])
    treedef = jax.tree.structure(updates)
    new_updates = jax.tree.unflatten(treedef, list(flat_updates.values()))
    count = optax.safe_increment(step)
    # Statistics stay due while none have been folded in at all, or while a layer that was
    # offered some has none yet (its batch was not finite); a layer that is never captured (only
    # ever skipped) does not hold the cadence back.
    counts = [layer.count for layer in layer_states.values()]
    waiting = jnp.all(jnp.asarray([jnp.all(c == 0) for c in counts] or [False]))
    for path in offered:
      waiting = waiting | jnp.any(layer_states[path].count == 0)
    new_state = ScaleByTKFACState(
        count=count,
        layers=_tree.nest(layer_states),
        kl_scale=kl_scale.astype(jnp.float32),
        stats_due=(count % stats_every == 0) | waiting,
        fallback=fallback_state,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
