"""Values a user can log: per-layer trace, damping, condition numbers, and the KL-clip factor."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tkfac_jax import _transform
from tkfac_jax import _tree


def _condition_number(inverse: jax.Array) -> jax.Array:
  """``cond(X) = cond(X^-1)``: the damped factor's condition number from the inverse in use."""
  if inverse.ndim == 1:
    magnitudes = jnp.abs(inverse)
  else:
    magnitudes = jnp.abs(jnp.linalg.eigvalsh(0.5 * (inverse + inverse.T)))
  return jnp.max(magnitudes) / jnp.min(magnitudes)


def _per_layer(layer):
  return lambda fn: _transform._per_layer(fn, _transform._lead(layer))  # pylint: disable=protected-access


def diagnostics(opt_state: Any) -> dict[str, Any]:
  """Per-layer curvature diagnostics from an optimizer state, as arrays (log them outside jit).

  Finds the :func:`scale_by_tkfac` state anywhere inside ``opt_state`` (a chain,
  ``optax.inject_hyperparams``, ...). Condition numbers come from an eigendecomposition of each
  inverse in use, so call this when you log, not every step, for large layers.

  Args:
    opt_state: the state of :func:`tkfac`, of :func:`scale_by_tkfac`, or of a chain holding one.

  Returns:
    ``{"kl_scale": ..., "layers": {path: {"delta", "damping", "phi_condition",
    "psi_condition", "count"}}}``: ``delta`` is the running trace of the layer's Fisher block,
    ``damping`` the ``lambda`` of the inverses in use (0 before the first), the condition numbers
    those of the damped factors ``Phi_hat`` and ``Psi_hat``, ``count`` how many batches of
    statistics were averaged.

  Examples:
    >>> import jax.numpy as jnp, tkfac_jax
    >>> tx = tkfac_jax.tkfac(learning_rate=0.1)
    >>> state = tx.init({'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}})
    >>> sorted(tkfac_jax.diagnostics(state)['layers']['dense'])
    ['count', 'damping', 'delta', 'phi_condition', 'psi_condition']
  """
  states = _transform.find_states(opt_state)
  if len(states) != 1:
    raise ValueError(
        f"diagnostics needs an optimizer state holding exactly one scale_by_tkfac state; found "
        f"{len(states)}."
    )
  state = states[0]
  layers = _tree.flatten_with_paths(
      state.layers, is_leaf=lambda x: isinstance(x, _transform.LayerState)
  )
  return {
      "kl_scale": state.kl_scale,
      "layers": {
          _tree.path_str(path): {
              "delta": layer.statistics.delta,
              "damping": layer.damping,
              # One per layer of a stack (nn.scan).
              "phi_condition": _per_layer(layer)(_condition_number)(layer.inverses.phi),
              "psi_condition": _per_layer(layer)(_condition_number)(layer.inverses.psi),
              "count": layer.count,
          }
          for path, layer in layers.items()
      },
  }
