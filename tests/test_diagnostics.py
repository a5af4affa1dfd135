"""tkfac_jax.diagnostics reports the curvature the optimizer is using, checked by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import references
import tkfac_jax


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), padding="VALID")(x)
    return nn.Dense(2)(x.reshape(x.shape[0], -1))


def _setup():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 5, 5, 2)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
  model = _Net()
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  _, grads, stats = jax.jit(tkfac_jax.value_grad_and_stats(loss_fn))(params)
  return params, grads, stats


def _damped(stats, damping):
  """Phi_hat and Psi_hat of TKFAC's normal damping (Eqs. 5.14-5.15), built by hand."""
  phi = np.asarray(stats.phi, np.float64) / np.sqrt(float(stats.delta))
  psi = np.asarray(stats.psi, np.float64) / np.sqrt(float(stats.delta))
  root = np.sqrt(damping)
  return phi + root * np.eye(len(phi)), psi + root * np.eye(len(psi))


@pytest.mark.parametrize("wrap", ["plain", "inject_hyperparams"])
def test_diagnostics_match_hand_built_damped_factors(wrap):
  """delta, damping (global for dense, trace-based for conv) and condition numbers are right."""
  params, grads, stats = _setup()
  damping, floor = 1e-2, 1e-6
  if wrap == "plain":
    tx = tkfac_jax.tkfac(0.1, damping, conv_damping_floor=floor, scale_invariant=False)
  else:
    tx = optax.inject_hyperparams(tkfac_jax.tkfac)(
        learning_rate=0.1, damping=damping, conv_damping_floor=floor, scale_invariant=False
    )
  state = tx.init(params)
  before = tkfac_jax.diagnostics(state)
  assert float(before["layers"]["Dense_0"]["damping"]) == 0.0
  assert int(before["layers"]["Dense_0"]["count"]) == 0
  _, state = jax.jit(lambda g, s: tx.update(g, s, params, stats=stats))(grads, state)
  report = jax.jit(tkfac_jax.diagnostics)(state)

  conv, dense = stats.layers["Conv_0"], stats.layers["Dense_0"]
  d_in, d_out = conv.phi.shape[0], conv.psi.shape[0]
  conv_lambda = max(float(conv.delta), floor) / (d_in * d_out)
  for name, layer_stats, lam in [("Conv_0", conv, conv_lambda), ("Dense_0", dense, damping)]:
    got = report["layers"][name]
    # Scalars, each relative to itself. The first batch's delta is stored as it came.
    references.assert_trees_equal(got["delta"], layer_stats.delta)
    references.assert_close(got["damping"], lam, references.SAME_MATHS, name)
    # Condition numbers (below 100 here) from float32 eigenvalues of the float32 inverses,
    # against float64: errors of about cond * 1e-7.
    phi_hat, psi_hat = _damped(layer_stats, lam)
    for key, factor in (("phi_condition", phi_hat), ("psi_condition", psi_hat)):
      references.assert_close(got[key], np.linalg.cond(factor), references.REFERENCE, key)
    assert int(got["count"]) == 1
  assert 0.0 < float(report["kl_scale"]) <= 1.0
  assert conv_lambda != pytest.approx(damping)  # The two layers really use different damping.


def test_diagnostics_needs_a_tkfac_state():
  """A state without scale_by_tkfac in it raises a ValueError that says so."""
  with pytest.raises(ValueError, match="scale_by_tkfac"):
    tkfac_jax.diagnostics(optax.adam(1e-3).init({"w": jnp.ones(3)}))
