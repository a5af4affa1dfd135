"""Specifications for the layers beyond nn.Dense: Conv, DenseGeneral, Embed, skipped, fallback.

TKFAC.md's truths (1-6), "Locations" and "Convolution damping", checked against references that do
not use the library. A layer's inputs ``a_nt`` are rebuilt by hand in float64 NumPy: a
convolution's patches by a loop over output positions and kernel taps (after the padding and input
dilation that Flax documents), a DenseGeneral's contracted axes in kernel order, an embedding's
one-hot vectors. The layer's output is then ``a_nt @ [W; b]``, which must equal Flax's, and the
per-example output gradients ``g_nt = B dL/dy_nt`` come from a zero perturbation added to that
output. ``vec`` is column-major: ``vec(a g^T) = kron(g, a)``.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import references
import tkfac_jax

# Float32 library against float64 references: 1e-4 of the largest entry (references.py says why);
# the sanity checks below show that plausible mistakes fail it.
RTOL = references.REFERENCE
CURVATURES = ("tkfac", "kfac")
_relative_error = references.relative_error


def _assert_close(actual, expected, rtol=RTOL, err_msg=""):
  references.assert_close(actual, expected, rtol, err_msg)


def _vec(matrix):
  """Column-major ``vec``."""
  return matrix.T.reshape(-1)


def _unvec(vector, rows):
  return vector.reshape(-1, rows).T


def _homogeneous(a):
  return np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)


def _block(node):
  """``[W; b]`` as float64: the kernel as ``(prod(shape[:-1]), shape[-1])``, the bias last."""
  if "embedding" in node:
    return np.asarray(node["embedding"], np.float64)
  kernel = np.asarray(node["kernel"], np.float64)
  kernel = kernel.reshape(-1, kernel.shape[-1])
  if "bias" not in node:
    return kernel
  return np.concatenate([kernel, np.asarray(node["bias"], np.float64)[None]], axis=0)


def _fill(shapes, seed):
  """Parameters shaped like ``shapes``, NumPy normal draws (biases too, and no compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype), shapes)


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --- Brute-force statistics, loops over examples n and locations t. -------------------------------


def _brute(a, g, curvature):
  phi, psi, delta = references.brute_tkfac(a, g)
  if curvature == "kfac":
    phi, psi = references.brute_kfac(a, g)
  return phi, psi, delta


def _damped(a, g, curvature, damping):
  """``Phi_hat`` and ``Psi_hat`` from TKFAC.md's formulas: ``sqrt(delta) Phi + sqrt(lam) I``."""
  phi, psi, delta = _brute(a, g, curvature)
  if curvature == "tkfac":
    phi, psi = phi / np.sqrt(delta), psi / np.sqrt(delta)
  root = np.sqrt(damping)
  return phi + root * np.eye(len(phi)), psi + root * np.eye(len(psi))


def _solve(phi_hat, psi_hat, grad):
  """``solve(kron(Psi_hat, Phi_hat), vec(G))`` with the explicit Kronecker matrix."""
  return _unvec(np.linalg.solve(np.kron(psi_hat, phi_hat), _vec(grad)), len(grad))


def _exact_fisher(blocks):
  """``E_n vec(grad_n) vec(grad_n)^T`` from per-example ``[W; b]`` gradients."""
  vecs = np.stack([_vec(block) for block in blocks])
  return vecs.T @ vecs / len(blocks)


# --- Convolution patches, by hand. ----------------------------------------------------------------


def _per_axis(value, rank):
  return (value,) * rank if isinstance(value, int) else tuple(value)


def _patches(x, kernel_size, strides, padding, input_dilation, kernel_dilation):
  """``[B, T, taps * C]`` patches (taps in kernel order, then channels) and the output shape.

  Flax pads CIRCULAR, REFLECT and CAUSAL itself, before any input dilation, and convolves VALID;
  other paddings are lax's, applied to the input dilated by ``input_dilation - 1`` zeros between
  entries. Output position ``o`` and tap ``k`` read the padded input at ``o * stride + k * dil``.
  """
  rank = len(kernel_size)
  strides, input_dilation, kernel_dilation = (
      _per_axis(v, rank) for v in (strides, input_dilation, kernel_dilation)
  )
  spans = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
  x = np.asarray(x, np.float64)
  pads = [(0, 0)] * rank
  if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
    if padding == "CAUSAL":
      mode, sides = "constant", [(s - 1, 0) for s in spans]
    else:
      mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
      sides = [((s - 1) // 2, s // 2) for s in spans]
    x = np.pad(x, [(0, 0)] + sides + [(0, 0)], mode=mode)
  elif padding == "SAME":  # Output ceil(size / stride); an odd total puts the extra at the end.
    pads = []
    for size, span, stride in zip(x.shape[1:-1], spans, strides):
      total = max((-(-size // stride) - 1) * stride + span - size, 0)
      pads.append((total // 2, total - total // 2))
  elif isinstance(padding, int):
    pads = [(padding, padding)] * rank
  elif padding != "VALID":
    pads = [tuple(p) for p in padding]
  dilated_shape = [(s - 1) * d + 1 for s, d in zip(x.shape[1:-1], input_dilation)]
  dilated = np.zeros((x.shape[0], *dilated_shape, x.shape[-1]))
  dilated[(slice(None),) + tuple(slice(None, None, d) for d in input_dilation)] = x
  padded = np.pad(dilated, [(0, 0)] + pads + [(0, 0)])
  out_shape = tuple(
      (size - span) // stride + 1 for size, span, stride in zip(padded.shape[1:-1], spans, strides)
  )
  locations = []
  for o in np.ndindex(*out_shape):
    taps = [
        padded[(slice(None),) + tuple(
            oi * s + ki * d for oi, s, ki, d in zip(o, strides, k, kernel_dilation)
        )]
        for k in np.ndindex(*kernel_size)
    ]
    locations.append(np.stack(taps, axis=1).reshape(len(x), -1))
  return np.stack(locations, axis=1), out_shape


# --- One-layer models: the Flax layer, then a squared error on tanh of its output. ---------------


def _example_loss(y, target):
  return 0.5 * jnp.sum((jnp.tanh(y) - target) ** 2)


def _mean_loss(y, target):
  return jnp.mean(jax.vmap(_example_loss)(y, target))


class _Wrap(nn.Module):
  """Holds one layer, so that its parameters sit at ``params['layer']``."""

  layer: nn.Module

  def __call__(self, x):
    return self.layer(x)


class _OneLayer:
  """A one-layer model, its batch, and the reference pairs built by hand from ``a``.

  Attributes:
    a: ``[B, T, d_in (+1)]`` reference inputs (with the homogeneous 1 if the layer has a bias).
    g: ``[B, T, d_out]`` per-example output gradients of the hand-written model.
    y: the hand-written output ``a @ [W; b]``, shaped like Flax's.
    grad: ``sum_nt a g^T / B``, the ``[dW; db]`` that the patches and ``g`` rebuild.
  """

  def __init__(self, layer, x, inputs_by_hand, seed=0):
    self.model = _Wrap(layer)
    self.x = x
    shapes = jax.eval_shape(self.model.init, jax.random.key(0), x)["params"]
    self.params = _fill(shapes, seed)
    out = jax.eval_shape(self.model.apply, {"params": self.params}, x)
    self.target = _normal(seed + 1, out.shape, 0.5)
    node = self.params["layer"]
    a = inputs_by_hand(np.asarray(x))
    if "bias" in node:
      a = _homogeneous(a)
    block = _block(node)
    self.y = (a @ block).reshape(out.shape)
    size = len(a)
    # The perturbation sits on the layer output; dL/dy carries the 1/B of the mean loss.
    dy = jax.jit(jax.grad(lambda eps, y: _mean_loss(y + eps, self.target)))(
        jnp.zeros(out.shape, jnp.float32), jnp.asarray(self.y, jnp.float32)
    )
    self.a = a
    self.g = size * np.asarray(dy, np.float64).reshape(size, a.shape[1], -1)
    self.grad = np.einsum("nti,nto->io", self.a, self.g) / size

  def loss(self, params, x, target):
    return _mean_loss(self.model.apply({"params": params}, x), target)

  @functools.cached_property
  def library(self):
    """Flax's output, ``jax.value_and_grad`` and the library's capture in both modes, one jit."""

    def run(params, x, target):
      captures = {
          c: tkfac_jax.value_grad_and_stats(self.loss, curvature=c)(params, x, target)
          for c in CURVATURES
      }
      plain = jax.value_and_grad(self.loss)(params, x, target)
      return self.model.apply({"params": params}, x), plain, captures

    return jax.jit(run)(self.params, self.x, self.target)

  def stats(self, curvature):
    return self.library[2][curvature][2].layers["layer"]


# --- Convolutions. --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Conv:
  """One nn.Conv configuration; ``B`` examples of ``spatial`` inputs with 2 channels."""

  kernel_size: tuple
  spatial: tuple
  padding: object = "SAME"
  strides: object = 1
  input_dilation: object = 1
  kernel_dilation: object = 1
  use_bias: bool = True
  batch: int = 3

  def __str__(self):
    fields = [f"{len(self.kernel_size)}d", str(self.padding).replace(" ", "")]
    for name in ("strides", "input_dilation", "kernel_dilation"):
      if getattr(self, name) != 1:
        fields.append(f"{name}={getattr(self, name)}".replace(" ", ""))
    if not self.use_bias:
      fields.append("no_bias")
    if self.batch != 3:
      fields.append(f"B={self.batch}")
    return "-".join(fields)


_ALL_CONVS = (
    _Conv((3,), (7,)),
    _Conv((3,), (7,), "VALID", strides=2),
    _Conv((3,), (7,), "CIRCULAR", kernel_dilation=2),
    _Conv((3,), (7,), "REFLECT", strides=2, use_bias=False),
    _Conv((3,), (7,), "CAUSAL", kernel_dilation=2),
    _Conv((2,), (6,), ((1, 2),), input_dilation=2),
    _Conv((3,), (7,), 1, strides=3),
    _Conv((3, 2), (6, 5), "SAME", strides=(2, 1)),
    _Conv((3, 3), (6, 5), "SAME", kernel_dilation=(1, 2)),
    _Conv((3, 2), (6, 5), "VALID", kernel_dilation=(2, 1), use_bias=False),
    _Conv((3, 3), (6, 5), "CIRCULAR", strides=2),
    _Conv((2, 3), (6, 5), "REFLECT", kernel_dilation=2),
    _Conv((3, 2), (5, 4), ((1, 2), (0, 1)), input_dilation=(2, 1)),
    _Conv((2, 2), (5, 5), ((2, 0), (1, 1)), strides=2, input_dilation=2, kernel_dilation=2),
    _Conv((2, 3, 2), (4, 5, 3), "SAME", strides=(1, 2, 1)),
    _Conv((2, 2, 2), (4, 3, 3), "VALID", kernel_dilation=(2, 1, 1)),
    _Conv((2, 2, 3), (3, 4, 3), ((1, 0), (0, 1), (1, 1)), input_dilation=(1, 1, 2), use_bias=False),
    _Conv((3, 2, 2), (4, 4, 3), "CIRCULAR", strides=(2, 1, 2)),
)


def _flax_pads(padding) -> bool:
  """Whether the installed Flax knows this padding (REFLECT came in a later release)."""
  try:
    nn.Conv(1, (1,), padding=padding).init(jax.random.key(0), jnp.ones((1, 2, 1)))
  except (KeyError, ValueError, TypeError, RuntimeError, NotImplementedError):
    return False
  return True


# Every case whose padding the installed Flax supports: the capture runs Flax's own convolution.
_CONVS = tuple(
    case for case in _ALL_CONVS if not isinstance(case.padding, str) or _flax_pads(case.padding)
)

# A 1 x 1 output map (T = 1): the kernel covers the input, or the stride leaves one position.
_SINGLE_LOCATION = (
    _Conv((3, 3), (3, 3), "VALID", batch=5),
    _Conv((2,), (5,), "VALID", strides=4, kernel_dilation=2, batch=5),
)


@functools.cache
def _conv_case(spec: _Conv) -> _OneLayer:
  layer = nn.Conv(
      3,
      spec.kernel_size,
      strides=spec.strides,
      padding=spec.padding,
      input_dilation=spec.input_dilation,
      kernel_dilation=spec.kernel_dilation,
      use_bias=spec.use_bias,
  )
  x = _normal(7, (spec.batch, *spec.spatial, 2))
  args = (spec.strides, spec.padding, spec.input_dilation, spec.kernel_dilation)
  return _OneLayer(layer, x, lambda x: _patches(x, spec.kernel_size, *args)[0])


@pytest.mark.parametrize("spec", _CONVS, ids=str)
def test_conv_patches_rebuild_gradient(spec):
  """Truth 6: hand-built patches reproduce Conv's output, and sum_nt a g^T / B is jax.grad."""
  case = _conv_case(spec)
  outputs, (plain_loss, plain_grads), captures = case.library
  _assert_close(outputs, case.y, err_msg="patches @ [W; b] is not the convolution")
  assert case.a.shape[1] > 1  # Several locations per example.
  _assert_close(case.grad, _block(plain_grads["layer"]), err_msg="sum_nt a g^T / B")
  for curvature, (loss, grads, stats) in captures.items():
    _assert_close(loss, plain_loss, err_msg=curvature)
    jax.tree.map(functools.partial(_assert_close, err_msg=curvature), grads, plain_grads)
    assert stats.skipped == ()


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("spec", _CONVS, ids=str)
def test_conv_statistics_equal_brute_force(spec, curvature):
  """Truths 5 and 6: a Conv's phi, psi, delta equal loops over examples and output positions."""
  case = _conv_case(spec)
  phi, psi, delta = _brute(case.a, case.g, curvature)
  got = case.stats(curvature)
  _assert_close(got.phi, phi, err_msg="phi")
  _assert_close(got.psi, psi, err_msg="psi")
  _assert_close(got.delta, delta, err_msg="delta")
  # Sanity: the tolerance catches a factor off by 1%, one output position dropped, and the
  # bias's homogeneous coordinate left out.
  expected = (phi, psi, delta)
  references.assert_detects((phi, 1.01 * psi, delta), expected, RTOL, "psi off by 1%")
  if case.a.shape[1] > 1:
    dropped = _brute(case.a[:, 1:], case.g[:, 1:], curvature)
    references.assert_detects(dropped, expected, RTOL, "a location dropped")
  if spec.use_bias:
    no_bias = case.a.copy()
    no_bias[..., -1] = 0.0
    references.assert_detects(_brute(no_bias, case.g, curvature), expected, RTOL, "no bias row")


@functools.cache
def _per_example_blocks(spec: _Conv):
  """Per-example ``[W; b]`` gradients by ``jax.vmap(jax.grad(...))`` over single examples."""
  case = _conv_case(spec)

  def example_loss(params, x, target):
    return _example_loss(case.model.apply({"params": params}, x[None])[0], target)

  grads = jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0)))(
      case.params, case.x, case.target
  )["layer"]
  kernel = np.asarray(grads["kernel"], np.float64)
  blocks = kernel.reshape(len(kernel), -1, kernel.shape[-1])
  return np.concatenate([blocks, np.asarray(grads["bias"], np.float64)[:, None]], axis=1)


@pytest.mark.parametrize("spec", _SINGLE_LOCATION, ids=str)
def test_conv_with_one_output_position_obeys_trace_truth(spec):
  """Truths 2 and 6: for T = 1, delta = tr(Phi) delta = tr(Psi) delta = tr(exact Fisher block)."""
  case = _conv_case(spec)
  assert case.a.shape[1] == 1
  exact = _exact_fisher(_per_example_blocks(spec))
  phi, psi, delta = (np.asarray(x, np.float64) for x in case.stats("tkfac"))
  _assert_close(delta, np.trace(exact))
  _assert_close(np.trace(phi), delta)
  _assert_close(np.trace(psi), delta)
  _assert_close(np.trace(np.kron(psi, phi) / delta), np.trace(exact))
  # Sanity: with B = 5 the block is not exact, so the trace is a real restriction.
  assert _relative_error(np.kron(psi, phi) / delta, exact) > 1e-3


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("spec", _SINGLE_LOCATION, ids=str)
def test_conv_with_one_example_and_position_is_exact(spec, curvature):
  """Truths 3 and 5: B = 1, T = 1: delta Psi kron Phi (and G kron A) is the exact conv block."""
  spec = dataclasses.replace(spec, batch=1)
  case = _conv_case(spec)
  phi, psi, delta = (np.asarray(x, np.float64) for x in case.stats(curvature))
  block = np.kron(psi, phi) / (delta if curvature == "tkfac" else 1.0)
  _assert_close(block, _exact_fisher(_per_example_blocks(spec)))


# --- The preconditioned conv update, and convolution damping. -------------------------------------


class _ConvNet(nn.Module):
  """A strided SAME conv (3 x 3 output positions), tanh, and a dense head on the flattened map."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(3, (3, 3), strides=2, padding="SAME", name="conv")(x))
    return nn.Dense(3, name="dense")(h.reshape(h.shape[0], -1))


def _cross_entropy(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


class _ConvNetCase:
  """The conv net, its batch, and reference pairs for both layers from a hand-written forward."""

  def __init__(self, batch=5, seed=3):
    self.model = _ConvNet()
    self.x = _normal(seed, (batch, 5, 5, 2))
    self.labels = jnp.asarray(np.random.default_rng(seed).integers(0, 3, batch), jnp.int32)
    shapes = jax.eval_shape(self.model.init, jax.random.key(0), self.x)["params"]
    self.params = _fill(shapes, seed)
    patches, out_shape = _patches(np.asarray(self.x), (3, 3), 2, "SAME", 1, 1)
    conv_a = _homogeneous(patches)
    conv_block = jnp.asarray(_block(self.params["conv"]), jnp.float32)
    dense_block = jnp.asarray(_block(self.params["dense"]), jnp.float32)

    def forward(eps):
      conv_y = jnp.asarray(conv_a, jnp.float32) @ conv_block + eps[0]
      h = jnp.tanh(conv_y).reshape(batch, -1)  # Positions row-major, then channels: Flax's order.
      dense_a = jnp.concatenate([h, jnp.ones((batch, 1))], axis=1)
      return _cross_entropy(dense_a @ dense_block + eps[1], self.labels), dense_a

    eps = (jnp.zeros((batch, math.prod(out_shape), 3)), jnp.zeros((batch, 3)))
    (_, dense_a), dy = jax.jit(jax.value_and_grad(forward, has_aux=True))(eps)
    self.a = {"conv": conv_a, "dense": np.asarray(dense_a, np.float64)[:, None]}
    self.g = {
        "conv": batch * np.asarray(dy[0], np.float64),
        "dense": batch * np.asarray(dy[1], np.float64)[:, None],
    }
    self.grad = {k: np.einsum("nti,nto->io", a, self.g[k]) / batch for k, a in self.a.items()}

  def loss(self, params, x, labels):
    return _cross_entropy(self.model.apply({"params": params}, x), labels)

  @functools.cached_property
  def captured(self):
    capture = {c: tkfac_jax.value_grad_and_stats(self.loss, curvature=c) for c in CURVATURES}
    return jax.jit(lambda *args: {c: f(*args) for c, f in capture.items()})(
        self.params, self.x, self.labels
    )


@functools.cache
def _conv_net():
  return _ConvNetCase()


@functools.partial(jax.jit, static_argnames=("curvature", "floor"))
def _first_update(grads, params, stats, damping, nu, curvature, floor):
  """``scale_by_tkfac``'s first update; traced ``damping`` and ``nu`` share one compile."""
  # The paper's damping; the scale-invariant mode is checked against the same solves in
  # test_truths.py.
  tx = tkfac_jax.scale_by_tkfac(
      damping, curvature=curvature, conv_damping_floor=nu if floor else None,
      scale_invariant=False,
  )
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  return updates


@pytest.mark.parametrize("floor", [None, "delta", "nu"])
@pytest.mark.parametrize("curvature", CURVATURES)
def test_conv_update_solves_damped_kronecker_system(curvature, floor):
  """Truth 4 and conv damping: U = solve(kron(Psi_hat, Phi_hat), vec(G)), lam_l for the conv."""
  case = _conv_net()
  _, grads, stats = case.captured[curvature]
  damping = 1e-2
  delta = references.brute_tkfac(case.a["conv"], case.g["conv"])[2]
  # The floor nu either lies below the conv's delta, or above it and then binds.
  nu = {None: 1.0, "delta": 0.1 * delta, "nu": 10.0 * delta}[floor]
  updates = _first_update(
      grads, case.params, stats, damping, nu, curvature=curvature, floor=floor is not None
  )
  d_in, d_out = case.a["conv"].shape[-1], case.g["conv"].shape[-1]
  assert (d_in, d_out) == (19, 3)
  conv_damping = {None: damping, "delta": delta / (d_in * d_out), "nu": nu / (d_in * d_out)}
  for layer, lam in (("conv", conv_damping[floor]), ("dense", damping)):
    _assert_close(case.grad[layer], _block(grads[layer]), err_msg=layer)  # The reference's G.
    expected = _solve(*_damped(case.a[layer], case.g[layer], curvature, lam), case.grad[layer])
    got = _block(updates[layer])
    assert _relative_error(got, expected) < RTOL, (layer, _relative_error(got, expected))
    # Sanity: the update is far from the gradient, and from the one with the other damping.
    assert _relative_error(case.grad[layer], expected) > 1e-2, layer
    others = {damping, *conv_damping.values()} - {lam}
    for other in others if layer == "conv" else ():
      wrong = _solve(*_damped(case.a[layer], case.g[layer], curvature, other), case.grad[layer])
      assert _relative_error(wrong, expected) > 1e-3, (layer, other)


# --- DenseGeneral. --------------------------------------------------------------------------------


# name: (layer, input shape, a_nt from x by hand: the contracted axes in kernel order).
_DENSE_GENERAL = {
    "axes_-2_-1": (
        nn.DenseGeneral(4, axis=(-2, -1)),
        (3, 2, 3, 2),
        lambda x: x.reshape(x.shape[0], x.shape[1], -1),
    ),
    "axes_-1_-2": (  # Flax sorts `axis`: the kernel's axes follow the input's, (h, d).
        nn.DenseGeneral(4, axis=(-1, -2)),
        (3, 2, 3, 2),
        lambda x: x.reshape(x.shape[0], x.shape[1], -1),
    ),
    "axes_1_3_no_bias": (  # Locations on axis 2, between the contracted axes.
        nn.DenseGeneral(4, axis=(1, 3), use_bias=False),
        (3, 3, 2, 2),
        lambda x: np.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], x.shape[2], -1),
    ),
    "axis_-1": (nn.DenseGeneral(4, axis=-1), (3, 5), lambda x: x[:, None, :]),
}


@functools.cache
def _dense_general_case(name) -> _OneLayer:
  layer, shape, inputs_by_hand = _DENSE_GENERAL[name]
  return _OneLayer(layer.clone(), _normal(11, shape), inputs_by_hand, seed=5)


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize(
    "name",
    list(_DENSE_GENERAL),
)
def test_dense_general_statistics_and_gradient(name, curvature):
  """Truths 1 and 5: DenseGeneral's grads are jax.grad's; phi, psi, delta equal brute force."""
  case = _dense_general_case(name)
  outputs, (plain_loss, plain_grads), captures = case.library
  _assert_close(outputs, case.y, err_msg="a @ [W; b] is not the layer")
  _assert_close(case.grad, _block(plain_grads["layer"]), err_msg="sum_nt a g^T / B")
  loss, grads, stats = captures[curvature]
  _assert_close(loss, plain_loss)
  jax.tree.map(_assert_close, grads, plain_grads)
  phi, psi, delta = _brute(case.a, case.g, curvature)
  got = stats.layers["layer"]
  _assert_close(got.phi, phi, err_msg="phi")
  _assert_close(got.psi, psi, err_msg="psi")
  _assert_close(got.delta, delta, err_msg="delta")


def _first_fallback_update(params, layers=None):
  """``scale_by_tkfac`` with the fallback ``optax.scale(-7.0)``, initialised: its first update."""
  tx = tkfac_jax.scale_by_tkfac(fallback=optax.scale(-7.0), layers=layers)
  state = jax.jit(tx.init)(params)
  return jax.jit(lambda grads, stats: tx.update(grads, state, params, stats=stats)[0])


class _MultiOutput(nn.Module):
  """A DenseGeneral with two output axes (or the same map as a Dense of 6), then a dense head."""

  use_bias: bool
  as_dense: bool = False

  @nn.compact
  def __call__(self, x):
    if self.as_dense:
      h = nn.Dense(6, use_bias=self.use_bias, name="multi")(x)
    else:
      h = nn.DenseGeneral((2, 3), use_bias=self.use_bias, name="multi")(x)
    h = h.reshape(h.shape[:x.ndim - 1] + (6,))
    return nn.Dense(3, name="head")(jnp.tanh(h))


def test_dense_general_with_several_outputs_equals_the_flat_dense():
  """An attention-style projection, features=(2, 3) with a (2, 3) bias, is one block over its 6
  outputs: its statistics and its update are those of the Dense(6) with the same weights (whose
  statistics are checked against brute force above), reshaped."""
  x = _normal(13, (4, 3, 5))  # Three positions per example, as in a sequence model.
  labels = jnp.asarray([0, 1, 2, 1], jnp.int32)

  def run(model, params):
    def loss(params):
      logits = model.apply({"params": params}, x)
      return _cross_entropy(logits.reshape(-1, 3), jnp.repeat(labels, 3))

    _, grads, stats = tkfac_jax.value_grad_and_stats(loss)(params)
    assert stats.skipped == ()
    tx = tkfac_jax.scale_by_tkfac()
    updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
    return stats.layers, updates

  general = _MultiOutput(use_bias=True)
  params = _fill(jax.eval_shape(general.init, jax.random.key(0), x)["params"], 6)
  flat = dict(params, multi={
      "kernel": params["multi"]["kernel"].reshape(5, 6),
      "bias": params["multi"]["bias"].reshape(6),
  })
  stats, updates = run(general, params)
  expected_stats, expected_updates = run(_MultiOutput(use_bias=True, as_dense=True), flat)
  for name in ("multi", "head"):
    for got, want in zip(stats[name], expected_stats[name]):
      _assert_close(got, want)
  _assert_close(updates["multi"]["kernel"], expected_updates["multi"]["kernel"].reshape(5, 2, 3))
  _assert_close(updates["multi"]["bias"], expected_updates["multi"]["bias"].reshape(2, 3))
  _assert_close(updates["head"]["kernel"], expected_updates["head"]["kernel"])
  # Preconditioned, not the gradient passed through.
  plain = jax.grad(
      lambda p: _cross_entropy(general.apply({"params": p}, x).reshape(-1, 3), jnp.repeat(labels, 3))
  )(params)
  assert _relative_error(updates["multi"]["kernel"], plain["multi"]["kernel"]) > 1e-2


def test_dense_general_with_several_outputs_and_no_bias_is_skipped():
  """Capture contract: without a bias the optimizer cannot tell a (5, 2, 3) kernel's output axes
  from a 1-D convolution's, so the layer is skipped, warned, and falls back."""
  model = _MultiOutput(use_bias=False)
  x = _normal(13, (4, 5))
  labels = jnp.asarray([0, 1, 2, 1], jnp.int32)
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), x)["params"], 6)

  def loss(params, x, labels):
    return _cross_entropy(model.apply({"params": params}, x), labels)

  _, grads, stats = jax.jit(tkfac_jax.value_grad_and_stats(loss))(params, x, labels)
  assert [path for path, _ in stats.skipped] == ["multi"]
  assert "several output axes and no bias" in stats.skipped[0][1]
  assert set(stats.layers) == {"head"}
  update = _first_fallback_update(params)
  with pytest.warns(UserWarning, match="Layer 'multi' is not preconditioned"):
    updates = update(grads, stats)
  for name, value in updates["multi"].items():
    np.testing.assert_array_equal(value, -7.0 * grads["multi"][name])
  assert _relative_error(updates["head"]["kernel"], -7.0 * grads["head"]["kernel"]) > 1e-2


# --- Embed. ---------------------------------------------------------------------------------------

_VOCABULARY = 8


@functools.cache
def _embed_case() -> _OneLayer:
  # Tokens 6 and 7 never occur: their phi is 0 and their update must be 0.
  tokens = jnp.asarray(np.random.default_rng(17).integers(0, 6, (4, 5)), jnp.int32)
  return _OneLayer(
      nn.Embed(_VOCABULARY, 4), tokens, lambda x: np.eye(_VOCABULARY)[x], seed=9
  )


@pytest.mark.parametrize("curvature", CURVATURES)
def test_embed_statistics_equal_brute_force(curvature):
  """Truths 1 and 5: Embed's phi is the diagonal of the one-hot brute force; psi, delta equal it."""
  case = _embed_case()
  outputs, (plain_loss, plain_grads), captures = case.library
  _assert_close(outputs, case.y, err_msg="onehot @ E is not the lookup")
  _assert_close(case.grad, _block(plain_grads["layer"]), err_msg="sum_nt a g^T / B")
  loss, grads, stats = captures[curvature]
  _assert_close(loss, plain_loss)
  jax.tree.map(_assert_close, grads, plain_grads)
  phi, psi, delta = _brute(case.a, case.g, curvature)
  np.testing.assert_array_equal(phi, np.diag(np.diag(phi)))  # One-hot inputs: phi is diagonal.
  got = stats.layers["layer"]
  _assert_close(got.phi, np.diag(phi), err_msg="phi")
  _assert_close(got.psi, psi, err_msg="psi")
  _assert_close(got.delta, delta, err_msg="delta")
  assert np.all(np.asarray(got.phi)[6:] == 0.0)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_embed_update_solves_damped_kronecker_system(curvature):
  """Truth 4 for Embed: U = solve(kron(Psi_hat, diag(phi_hat)), vec(G)): G_v Psi_hat^-1 / phi_v."""
  case = _embed_case()
  _, grads, stats = case.library[2][curvature]
  damping = 1e-2
  updates = _first_update(
      grads, case.params, stats, damping, 1.0, curvature=curvature, floor=False
  )
  phi_hat, psi_hat = _damped(case.a, case.g, curvature, damping)
  expected = _solve(phi_hat, psi_hat, case.grad)
  rows = case.grad @ np.linalg.inv(psi_hat) / np.diag(phi_hat)[:, None]
  _assert_close(rows, expected)
  got = np.asarray(updates["layer"]["embedding"], np.float64)
  assert _relative_error(got, expected) < RTOL, _relative_error(got, expected)
  np.testing.assert_array_equal(got[6:], 0.0)
  assert _relative_error(case.grad, expected) > 1e-2


# --- Layers that cannot be captured, and the fallback. --------------------------------------------


class _Body(nn.Module):
  """The convolutions named in ``kinds``, each followed by tanh."""

  kinds: tuple

  @nn.compact
  def __call__(self, x):
    layers = {
        "grouped": lambda: nn.Conv(4, (3, 3), feature_group_count=2, name="grouped"),
        # After the grouped conv: 4 input channels.
        "masked": lambda: nn.Conv(4, (1, 1), mask=np.tril(np.ones((1, 1, 4, 4))), name="masked"),
        "local": lambda: nn.ConvLocal(4, (2, 2), name="local"),
        "transposed": lambda: nn.ConvTranspose(3, (2, 2), strides=(2, 2), name="transposed"),
    }
    for kind in self.kinds:
      x = jnp.tanh(layers[kind]()(x))
    return x


class _Unsupported(nn.Module):
  """Convolutions that cannot be captured, in ``body``, then a captured dense head."""

  kinds: tuple

  @nn.compact
  def __call__(self, x):
    h = _Body(self.kinds, name="body")(x)
    return nn.Dense(3, name="head")(h.reshape(h.shape[0], -1))


class _Tied(nn.Module):
  """An embedding used for the lookup and again, through ``attend``, as the output layer."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(6, 4, name="embed")
    h = nn.Dense(4, name="mix")(jnp.tanh(embed(tokens)).mean(axis=1))
    return embed.attend(h)


# Each layer that cannot be captured, and what its reason in stats.skipped must say.
_REASONS = {
    "grouped": "grouped convolution",
    "masked": "masked convolution",
    "local": "ConvLocal is not a layer type",
    "transposed": "ConvTranspose is not a layer type",
}

def _unsupported_setup(name):
  rng = np.random.default_rng(19)
  if name == "tied_embedding":
    model, x = _Tied(), jnp.asarray(rng.integers(0, 6, (3, 4)), jnp.int32)
    skipped = {"embed": "Embed.attend"}
  else:
    kinds = tuple(name.split("+"))
    model, x = _Unsupported(kinds), _normal(19, (3, 4, 4, 2))
    skipped = {f"body/{kind}": _REASONS[kind] for kind in kinds}
  labels = jnp.asarray(rng.integers(0, 3, 3), jnp.int32)
  params = _fill(jax.eval_shape(model.init, jax.random.key(0), x)["params"], 8)

  def loss(params, x, labels):
    return _cross_entropy(model.apply({"params": params}, x), labels)

  return loss, params, x, labels, skipped


def _node(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


@pytest.mark.parametrize(
    "name",
    [
        "grouped+masked+transposed",
        "local",
        "tied_embedding",
    ],
)
def test_unsupported_layers_are_skipped_warned_and_fall_back(name):
  """Capture contract: uncapturable layers are in stats.skipped, warned about, and fall back."""
  loss, params, x, labels, skipped = _unsupported_setup(name)
  _, grads, stats = jax.jit(tkfac_jax.value_grad_and_stats(loss))(params, x, labels)
  assert {path for path, _ in stats.skipped} == set(skipped)
  for path, reason in stats.skipped:
    assert skipped[path] in reason, (path, reason)
  update = _first_fallback_update(params)
  with pytest.warns(UserWarning) as record:
    updates = update(grads, stats)
  messages = [str(w.message) for w in record]
  for path in skipped:
    assert any(f"Layer '{path}' is not preconditioned" in m for m in messages), (path, messages)
  captured = [p for p in ("head", "mix") if p in params]
  for path in skipped:
    for key, value in _node(updates, path).items():
      np.testing.assert_array_equal(value, -7.0 * _node(grads, path)[key], err_msg=path)
  # The captured layer is preconditioned exactly as when the optimizer is told only about it.
  expected = _first_fallback_update(params, layers=captured)(grads, stats)
  for path in captured:
    jax.tree.map(np.testing.assert_array_equal, updates[path], expected[path])
    assert _relative_error(updates[path]["kernel"], -7.0 * grads[path]["kernel"]) > 1e-2


class _Mixed(nn.Module):
  """Conv, LayerNorm, BatchNorm and Dense: only the conv and the dense are captured."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="layer_norm")(nn.Conv(3, (2, 2), name="conv")(x))
    h = nn.BatchNorm(use_running_average=False, name="batch_norm")(jnp.tanh(h))
    return nn.Dense(3, name="dense")(h.reshape(h.shape[0], -1))


def test_fallback_updates_exactly_the_parameters_no_captured_layer_owns():
  """Fallback: it updates the parameters outside captured layers, and all before any statistics."""
  model = _Mixed()
  rng = np.random.default_rng(23)
  batches = [
      (_normal(23 + i, (4, 3, 3, 2)), jnp.asarray(rng.integers(0, 3, 4), jnp.int32))
      for i in range(2)
  ]
  shapes = jax.eval_shape(model.init, jax.random.key(0), batches[0][0])
  params = _fill(shapes["params"], 10)
  batch_stats = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes["batch_stats"])

  def loss(params, batch_stats, x, labels):
    logits, new = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"]
    )
    return _cross_entropy(logits, labels), new["batch_stats"]

  capture = jax.jit(tkfac_jax.value_grad_and_stats(loss, has_aux=True))
  transforms = {
      "adam_fallback": tkfac_jax.scale_by_tkfac(1e-2, fallback=optax.scale_by_adam()),
      "no_fallback": tkfac_jax.scale_by_tkfac(1e-2),
      "adam": optax.scale_by_adam(),
  }
  states = jax.jit(lambda p: {k: tx.init(p) for k, tx in transforms.items()})(params)

  @jax.jit
  def step(states, grads, stats):
    out = {}
    for key, tx in transforms.items():
      extra = {} if key == "adam" else {"stats": stats}
      out[key] = tx.update(grads, states[key], params, **extra)
    return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}

  captured = {"conv", "dense"}
  for i, (x, labels) in enumerate(batches):
    (_, batch_stats), grads, stats = capture(params, batch_stats, x, labels)
    assert set(stats.layers) == captured and stats.skipped == ()
    # Step 0 has no statistics yet (as on a step that skips them): everything takes the fallback.
    updates, states = step(states, grads, None if i == 0 else stats)
    for key in params:
      fallback_owns = i == 0 or key not in captured
      reference = updates["adam" if fallback_owns else "no_fallback"][key]
      jax.tree.map(
          functools.partial(_assert_close, rtol=references.SAME_MATHS, err_msg=f"step {i} {key}"),
          updates["adam_fallback"][key],
          reference,
      )
      # Sanity: the two candidates differ, so the check above picks the right one.
      other = updates["no_fallback" if fallback_owns else "adam"][key]
      assert _relative_error(other["bias"], reference["bias"]) > 1e-2, (i, key)
