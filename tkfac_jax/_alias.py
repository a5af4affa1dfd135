"""``tkfac``: the complete optimizer, the way Optax's aliases are built."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import chex
import jax
import optax

from tkfac_jax import _statistics
from tkfac_jax import _transform


def tkfac(
    learning_rate: optax.ScalarOrSchedule,
    damping: chex.Numeric | None = None,
    *,
    decay: chex.Numeric = 0.95,
    stats_every: chex.Numeric = 10,
    inverse_every: chex.Numeric = 100,
    curvature: _statistics.Curvature = "tkfac",
    scale_invariant: bool = True,
    curvature_floor: chex.Numeric = _transform.CURVATURE_FLOOR,
    pi_damping: bool | None = None,
    conv_damping_floor: chex.Numeric | None = None,
    inverse_method: str = "newton_schulz",
    stagger: bool = True,
    kl_clip: chex.Numeric | None = 1e-6,
    momentum: chex.Numeric | None = 0.9,
    nesterov: bool = False,
    weight_decay: chex.Numeric | None = None,
    fallback: optax.GradientTransformation | None = None,
    layers: Sequence[str] | None = None,
    stacked: Mapping[str, int] | None = None,
    dtype: Any = None,
    inverse_axis: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
  """TKFAC with KL clipping, momentum, weight decay and a learning rate (or schedule).

  The chain is ``scale_by_tkfac`` (with KL clipping) -> ``add_decayed_weights`` -> ``trace``
  (heavy-ball momentum) -> ``scale_by_learning_rate``. Weight decay is added after
  preconditioning, as in SGD, and momentum accumulates the clipped updates.

  The paper's configuration for CNNs is normal damping for dense layers and the trace-based damping
  for convolutions: ``tkfac(lr, damping=..., conv_damping_floor=nu)``.

  The defaults (statistics every 10 steps, inverses every 100, a relative ``damping`` of 10,
  ``kl_clip=1e-6`` per parameter, scale-invariant) come from a sweep scored on the wall-clock time
  to Adam's best held-out value, on an MLP, a CNN and an autoencoder at batch sizes 128 and 1024
  (``benchmarks/defaults.py``; ``benchmarks/README.md`` gives the figures, including where Adam
  stays ahead). The step does not depend on the loss's scale: a loss summed over pixels, tokens or
  the batch trains as its mean does. At the learning rate the benchmark uses (0.3) the clip binds
  on most steps, so the step is set by ``kl_clip`` more than by the learning rate:
  ``sqrt(kl_clip)`` is the root mean square of a step where the curvature is isotropic. The
  paper's maths, with its absolute damping, is ``scale_invariant=False``; its former defaults here
  were ``damping=1e-2``, ``kl_clip=1e-4``, ``stats_every=1`` and ``inverse_every=10``.

  Args:
    learning_rate: a float or an Optax schedule.
    damping: relative to each block's mean eigenvalue (scale-invariant), else ``lambda``;
      ``None``: 10 (scale-invariant) or ``1e-2``. See :func:`scale_by_tkfac`.
    decay: moving-average decay of the curvature statistics.
    stats_every: fold in statistics every this many steps; with
      ``value_grad_and_stats(...)(..., stats_due=tkfac_jax.stats_due(opt_state))`` the other
      steps do not compute them. See :func:`scale_by_tkfac`.
    inverse_every: recompute the damped inverses every this many steps.
    curvature: ``"tkfac"`` or ``"kfac"``.
    scale_invariant: damping relative to the curvature and an update that does not change when
      the loss is multiplied by a constant; ``False`` for the paper's absolute damping. See
      :func:`scale_by_tkfac`.
    curvature_floor: with ``scale_invariant``, the curvature the damping and the step are relative
      to is at least this share of the largest it has been; see :func:`scale_by_tkfac`.
    pi_damping: split the damping with the ``pi`` heuristic; ``None``: when ``scale_invariant``.
    conv_damping_floor: ``nu`` of TKFAC's damping for convolutions,
      ``lambda_l = max(delta_l, nu) / (d_in d_out)``; ``None`` uses ``damping`` everywhere.
    inverse_method: ``"newton_schulz"`` or ``"cholesky"``; see :func:`scale_by_tkfac`.
    stagger: refresh the layers' inverses on different steps of the period; see
      :func:`scale_by_tkfac`.
    kl_clip: ``kappa`` of KL clipping (per parameter when ``scale_invariant``), or ``None`` for
      no clipping; see :func:`scale_by_tkfac`.
    momentum: heavy-ball momentum, or ``None`` for none.
    nesterov: Nesterov momentum.
    weight_decay: coefficient of ``wd * params`` added to the update, or ``None``.
    fallback: transformation for the parameters that are not preconditioned (norm layers, and
      layers that cannot be captured), for example ``optax.scale_by_adam()``; momentum, weight
      decay and the learning rate still apply after it. ``None``: their plain gradient.
    layers: which layers to precondition; see :func:`scale_by_tkfac`.
    stacked: leading layer axes of ``nn.scan`` stacks without a bias, by path prefix
      (``{"blocks": 1}``); see :func:`scale_by_tkfac`.
    dtype: dtype of the factors and inverses; ``None`` means float32.
    inverse_axis: a mesh axis to spread the inverse work over; see :func:`scale_by_tkfac`.
    mesh: the mesh of ``inverse_axis`` under plain ``jax.jit``; see :func:`scale_by_tkfac`.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes ``stats=``.

  Examples:
    >>> import jax.numpy as jnp, optax, tkfac_jax
    >>> tx = tkfac_jax.tkfac(learning_rate=optax.cosine_decay_schedule(0.1, 1000))
    >>> state = tx.init({'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}})
  """
  parts = [
      _transform.scale_by_tkfac(
          damping,
          decay=decay,
          stats_every=stats_every,
          inverse_every=inverse_every,
          curvature=curvature,
          scale_invariant=scale_invariant,
          curvature_floor=curvature_floor,
          pi_damping=pi_damping,
          conv_damping_floor=conv_damping_floor,
          inverse_method=inverse_method,
          stagger=stagger,
          kl_clip=kl_clip,
          learning_rate=learning_rate if kl_clip is not None else None,
          fallback=fallback,
          layers=layers,
          stacked=stacked,
          dtype=dtype,
          inverse_axis=inverse_axis,
          mesh=mesh,
      )
  ]
  if weight_decay is not None:
    parts.append(optax.add_decayed_weights(weight_decay))
  if momentum is not None:
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
