"""Misuse and bad numbers: clear errors at trace time, and no NaN ever reaching the parameters."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import references
import tkfac_jax

LR = 0.1
DENSE = ("Dense_0", "Dense_1")


class MLP(nn.Module):
  """Dense_0: 4 -> 6 (phi 5 x 5, psi 6 x 6); Dense_1: 6 -> 3 (phi 7 x 7, psi 3 x 3)."""

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(6)(x))
    return nn.Dense(3)(h)


MODEL = MLP()


def _loss(params, x, y):
  return jnp.mean(jnp.sum((MODEL.apply({"params": params}, x) - y) ** 2, axis=-1))


def _batch(seed, batch=16):
  rng = np.random.default_rng(seed)
  return (
      rng.standard_normal((batch, 4)).astype(np.float32),
      rng.standard_normal((batch, 3)).astype(np.float32),
  )


def _params():
  shapes = jax.eval_shape(lambda x: MODEL.init(jax.random.key(0), x), np.zeros((1, 4), np.float32))
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: (0.5 * rng.standard_normal(s.shape)).astype(s.dtype), shapes["params"]
  )


_CAPTURE = jax.jit(tkfac_jax.value_grad_and_stats(_loss))


def _capture(params, seed=0, x=None):
  """(grads, stats) of batch ``seed`` (or of inputs ``x``)."""
  xb, y = _batch(seed)
  _, grads, stats = _CAPTURE(params, xb if x is None else x, y)
  return grads, stats


def _finite(tree):
  return all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(tree))


def _with_layer(stats, name, **fields):
  """``stats`` with some fields of one layer's LayerStatistics replaced."""
  layers = dict(stats.layers)
  layers[name] = layers[name]._replace(**fields)
  return dataclasses.replace(stats, layers=layers)


@pytest.fixture(scope="module")
def setup():
  params = _params()
  grads, stats = _capture(params)
  return params, grads, stats


# The stats argument.


def test_update_without_stats_raises(setup):
  """Forgetting stats= is never silent: a ValueError that says to pass stats."""
  params, grads, _ = setup
  tx = tkfac_jax.tkfac(LR)
  with pytest.raises(ValueError, match="stats"):
    tx.update(grads, tx.init(params), params)
  tx = tkfac_jax.scale_by_tkfac()
  with pytest.raises(ValueError, match="stats"):
    tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize(
    "wrong",
    [
        lambda stats: stats.layers,  # The nested dict instead of the Statistics.
        lambda stats: {"Dense_0": stats.layers["Dense_0"]},
        lambda stats: (stats,),
    ],
    ids=["layers-dict", "plain-dict", "tuple"],
)
def test_stats_of_the_wrong_type_raise_type_error(setup, wrong):
  """Anything but a Statistics (or None) as stats is a TypeError."""
  params, grads, stats = setup
  tx = tkfac_jax.scale_by_tkfac()
  with pytest.raises(TypeError, match="stats"):
    tx.update(grads, tx.init(params), params, stats=wrong(stats))


def test_curvature_mismatch_names_both(setup):
  """TKFAC statistics given to a K-FAC optimizer (and vice versa) raise, naming both modes."""
  params, grads, stats = setup
  tx = tkfac_jax.scale_by_tkfac(curvature="kfac")
  with pytest.raises(ValueError, match="curvature") as info:
    tx.update(grads, tx.init(params), params, stats=stats)
  assert "'tkfac'" in str(info.value) and "'kfac'" in str(info.value)
  kfac_stats = dataclasses.replace(stats, curvature="kfac")
  tx = tkfac_jax.scale_by_tkfac()
  with pytest.raises(ValueError, match="curvature") as info:
    tx.update(grads, tx.init(params), params, stats=kfac_stats)
  assert "'tkfac'" in str(info.value) and "'kfac'" in str(info.value)


def test_stats_from_another_model_name_the_unknown_layers(setup):
  """Statistics whose layers have other names raise a ValueError naming those unknown paths."""
  params, grads, stats = setup
  other = dataclasses.replace(
      stats, layers={"encoder": stats.layers["Dense_0"], "decoder": stats.layers["Dense_1"]}
  )
  tx = tkfac_jax.scale_by_tkfac()
  with pytest.raises(ValueError, match="another model") as info:
    tx.update(grads, tx.init(params), params, stats=other)
  assert "encoder" in str(info.value) and "decoder" in str(info.value)


def test_stats_with_an_extra_layer_name_it(setup):
  """A layer the state does not have (besides all it expects) is named in the ValueError."""
  params, grads, stats = setup
  extra = dataclasses.replace(
      stats, layers={**stats.layers, "head": {"proj": stats.layers["Dense_1"]}}
  )
  tx = tkfac_jax.scale_by_tkfac()
  with pytest.raises(ValueError, match="head/proj"):
    tx.update(grads, tx.init(params), params, stats=extra)


def test_stats_missing_a_layer_name_it(setup):
  """Statistics without a layer the state expects raise a ValueError naming that layer."""
  params, grads, stats = setup
  partial = dataclasses.replace(stats, layers={"Dense_0": stats.layers["Dense_0"]})
  tx = tkfac_jax.scale_by_tkfac()
  with pytest.raises(ValueError, match="Dense_1"):
    tx.update(grads, tx.init(params), params, stats=partial)


def test_stats_of_another_size_name_the_layer_and_shapes(setup):
  """Same layer names but other widths raise a ValueError naming the layer and both shapes."""
  params, grads, stats = setup
  wrong = _with_layer(stats, "Dense_1", phi=jnp.eye(8), psi=jnp.eye(2))
  tx = tkfac_jax.scale_by_tkfac()
  with pytest.raises(ValueError, match="Dense_1") as info:
    tx.update(grads, tx.init(params), params, stats=wrong)
  message = str(info.value)
  assert "(8, 8)" in message and "(7, 7)" in message
  assert "(2, 2)" in message and "(3, 3)" in message


# Updates and params that do not match the state.


def test_updates_missing_a_layer_name_it(setup):
  """Updates without a layer the state was initialised with raise a ValueError naming it."""
  params, grads, stats = setup
  tx = tkfac_jax.scale_by_tkfac()
  state = tx.init(params)
  renamed = {"Dense_0": grads["Dense_0"], "Other": grads["Dense_1"]}
  with pytest.raises(ValueError, match="Dense_1"):
    tx.update(renamed, state, params, stats=stats)
  with pytest.raises(ValueError, match="Dense_1"):
    tx.update(grads, state, {"Dense_0": params["Dense_0"]}, stats=stats)


def test_updates_of_another_size_name_the_layer(setup):
  """A gradient block of another shape than the state's raises a ValueError naming the layer."""
  params, grads, stats = setup
  tx = tkfac_jax.scale_by_tkfac()
  state = tx.init(params)
  wrong = {
      "Dense_0": grads["Dense_0"],
      "Dense_1": {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros(5)},
  }
  with pytest.raises(ValueError, match="Dense_1") as info:
    tx.update(wrong, state, params, stats=None)
  assert "(6, 5)" in str(info.value) and "(3, 3)" in str(info.value)


def test_init_rejects_params_without_dense_layers():
  """init on params with no 2-D kernel raises a ValueError instead of silently doing SGD."""
  tx = tkfac_jax.scale_by_tkfac()
  with pytest.raises(ValueError, match="kernel"):
    tx.init({"LayerNorm_0": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}})


def test_layers_option_names_unknown_layers(setup):
  """layers=[...] naming a layer that params do not have raises a ValueError naming it."""
  params, _, _ = setup
  tx = tkfac_jax.scale_by_tkfac(layers=["Dense_0", "decoder/Dense_0"])
  with pytest.raises(ValueError, match="decoder/Dense_0"):
    tx.init(params)


def test_capture_argnums_out_of_range_raises(setup):
  """value_grad_and_stats with argnums beyond the positional arguments raises a ValueError."""
  params, _, _ = setup
  with pytest.raises(ValueError, match="argnums"):
    tkfac_jax.value_grad_and_stats(_loss, argnums=3)(params, *_batch(0))


# Bad numbers.

_DECAY = 0.5
_ROBUST = tkfac_jax.scale_by_tkfac(
    1e-2, decay=_DECAY, stats_every=1, inverse_every=1, scale_invariant=False
)
_ROBUST_UPDATE = jax.jit(_ROBUST.update)


@pytest.mark.parametrize(
    "poison",
    [
        lambda layer: {"phi": layer.phi.at[1, 2].set(jnp.nan)},
        lambda layer: {"delta": jnp.asarray(jnp.inf, jnp.float32)},
        lambda layer: {"psi": layer.psi.at[0, 0].set(-jnp.inf)},
    ],
    ids=["nan-phi", "inf-delta", "inf-psi"],
)
def test_non_finite_statistics_are_skipped(setup, poison):
  """NaN/Inf in one layer's batch statistics: that layer keeps its last good running statistics
  and inverses, the other layer still updates, and the update and params stay finite."""
  params, _, _ = setup
  g1, s1 = _capture(params, 1)
  g2, s2 = _capture(params, 2)
  bad = _with_layer(s2, "Dense_0", **poison(s2.layers["Dense_0"]))
  _, state1 = _ROBUST_UPDATE(g1, _ROBUST.init(params), params, stats=s1)
  updates, state2 = _ROBUST_UPDATE(g2, state1, params, stats=bad)
  assert _finite(updates)
  assert _finite(optax.apply_updates(params, updates))
  assert _finite(state2)
  kept, moved = state2.layers["Dense_0"], state2.layers["Dense_1"]
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(state1.layers["Dense_0"])):
    np.testing.assert_array_equal(a, b)
  assert int(kept.count) == 1
  assert int(moved.count) == 2
  expected = jax.tree.map(
      lambda a, b: _DECAY * a + (1 - _DECAY) * b, s1.layers["Dense_1"], s2.layers["Dense_1"]
  )
  references.assert_trees_close(moved.statistics, expected, references.SAME_MATHS)


def test_non_finite_first_statistics_leave_identity(setup):
  """A layer whose first statistics are NaN keeps the identity preconditioner and no count."""
  params, grads, stats = setup
  bad = _with_layer(stats, "Dense_1", phi=stats.layers["Dense_1"].phi * jnp.nan)
  updates, state = _ROBUST_UPDATE(grads, _ROBUST.init(params), params, stats=bad)
  assert _finite(updates) and _finite(state)
  layer = state.layers["Dense_1"]
  assert int(layer.count) == 0
  np.testing.assert_array_equal(layer.inverses.phi, np.eye(7))
  np.testing.assert_array_equal(layer.inverses.psi, np.eye(3))
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(updates["Dense_1"][name], grads["Dense_1"][name])
  assert int(state.layers["Dense_0"].count) == 1
  # Scale-invariant: the NaN layer is left out of the mean curvature, and nothing is NaN.
  tx = tkfac_jax.scale_by_tkfac(1e-2, kl_clip=1e-6, learning_rate=0.1)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, stats=bad)
  assert _finite(updates) and _finite(state)
  assert int(state.layers["Dense_1"].count) == 0


def test_factor_not_positive_definite_keeps_previous_inverse(setup):
  """Running statistics with a negative eigenvalue (not PD after damping) keep the last inverse."""
  params, _, _ = setup
  tx = tkfac_jax.scale_by_tkfac(1e-4, decay=0.0, stats_every=1, inverse_every=1)
  update = jax.jit(tx.update)
  g1, s1 = _capture(params, 1)
  g2, s2 = _capture(params, 2)
  _, state1 = update(g1, tx.init(params), params, stats=s1)
  layer = s2.layers["Dense_0"]
  bad = _with_layer(s2, "Dense_0", phi=layer.phi - 2 * jnp.trace(layer.phi) * jnp.eye(5))
  updates, state2 = update(g2, state1, params, stats=bad)
  assert _finite(updates) and _finite(state2)
  for a, b in zip(state2.layers["Dense_0"].inverses, state1.layers["Dense_0"].inverses):
    np.testing.assert_array_equal(a, b)
  # The healthy layer refreshed its inverse from its new statistics.
  assert not np.array_equal(
      state2.layers["Dense_1"].inverses.phi, state1.layers["Dense_1"].inverses.phi
  )


def test_zero_damping_with_a_rank_deficient_batch_stays_finite(setup):
  """damping=0 and identical examples (rank-1 input factors): the singular factor is not
  inverted; the previous inverse is kept and the update is finite."""
  params, _, _ = setup
  tx = tkfac_jax.scale_by_tkfac(0.0, decay=0.0, stats_every=1, inverse_every=1)
  update = jax.jit(tx.update)
  g1, s1 = _capture(params, 1)
  _, state1 = update(g1, tx.init(params), params, stats=s1)
  assert not np.array_equal(state1.layers["Dense_0"].inverses.phi, np.eye(5))
  same = np.repeat(_batch(2)[0][:1], 16, axis=0)
  g2, s2 = _capture(params, 2, x=same)
  updates, state2 = update(g2, state1, params, stats=s2)
  assert _finite(updates) and _finite(state2)
  for name in DENSE:
    for a, b in zip(state2.layers[name].inverses, state1.layers[name].inverses):
      np.testing.assert_array_equal(a, b)


# Hyperparameters.


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"damping": -1e-3}, "damping"),
        ({"decay": 1.0}, "decay"),
        ({"decay": 1.5}, "decay"),
        ({"decay": -0.1}, "decay"),
        ({"curvature_floor": -1e-4}, "curvature_floor"),
        ({"curvature_floor": 2.0}, "curvature_floor"),
        ({"inverse_every": 0}, "inverse_every"),
        ({"inverse_every": 2.5}, "inverse_every"),
        ({"kl_clip": 1e-3}, "kl_clip"),  # Without learning_rate.
        ({"kl_clip": -1.0, "learning_rate": 0.1}, "kl_clip"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, name):
  """scale_by_tkfac rejects invalid hyperparameters with a ValueError naming the argument."""
  with pytest.raises(ValueError, match=name):
    tkfac_jax.scale_by_tkfac(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"damping": -1.0}, "damping"),
        ({"decay": 1.0}, "decay"),
        ({"curvature_floor": -1.0}, "curvature_floor"),
        ({"inverse_every": 0}, "inverse_every"),
        ({"kl_clip": 0.0}, "kl_clip"),
    ],
)
def test_tkfac_checks_its_hyperparameters_too(kwargs, name):
  """The full optimizer raises the same errors as the preconditioner it wraps."""
  with pytest.raises(ValueError, match=name):
    tkfac_jax.tkfac(LR, **kwargs)


@pytest.mark.parametrize("curvature", ["KFAC", "tkfac_nor", "", None])
def test_bad_curvature_string_raises(curvature):
  """An unknown curvature mode raises a ValueError in capture, preconditioner and optimizer."""
  with pytest.raises(ValueError, match="curvature"):
    tkfac_jax.value_grad_and_stats(_loss, curvature=curvature)
  with pytest.raises(ValueError, match="curvature"):
    tkfac_jax.scale_by_tkfac(curvature=curvature)
  with pytest.raises(ValueError, match="curvature"):
    tkfac_jax.tkfac(LR, curvature=curvature)
