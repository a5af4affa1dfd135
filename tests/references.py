"""Independent brute-force references shared by the truth tests (loops over examples and
locations, in float64 NumPy, written from TKFAC.md and never from the library), and the
comparisons every test uses.

Comparisons and float32. XLA's CPU code differs between processors (vector width, fused
multiply-add, threading), so two machines round the same float32 program differently in the last
bits, and an entry that is small beside the rest of its array (a near-zero entry of an inverse, a
gradient entry that cancels) can differ by a large multiple of itself. Every tolerance here is
therefore relative to the largest entry of the reference array: ``|actual - expected| <= rtol *
max|expected|`` entry by entry. Never an element-wise relative tolerance.

The tolerances the suite uses, by what is compared (float32's unit roundoff is 6e-8):

- ``SAME_MATHS`` (1e-5): the same quantity from two float32 programs that differ only in the order
  of their operations (losses, gradients, statistics, updates through another route, another batch
  split or device count): a few hundred roundings of sums of products, far below 1e-5 of the
  largest entry.
- ``REFERENCE`` (1e-4): the library in float32 against a float64 reference written out by hand
  (brute-force loops, ``np.linalg.solve``, explicit Kronecker products), and anything that has
  gone through a damped inverse, whose rounding error is the condition number (up to about 1e2 to
  1e3 in these tests, with the dampings they use) times the factors'.
- Training trajectories: bit for bit (:func:`assert_trees_equal`) where the same program runs on
  the same machine (a checkpoint restored, a wrapper around the same step); ``TRAJECTORY`` (1e-4
  of the largest entry, on the parameters' displacement from their start) where the programs
  differ, over a few steps, each of which goes through a damped inverse.

Each kind of comparison also checks that its tolerance still fails on a plausible mistake (a
factor off by 1%, a location dropped, the bias row missing, a shard or micro-batch counted twice):
see :func:`assert_detects`.
"""

import jax
import numpy as np
import pytest

SAME_MATHS = 1e-5
REFERENCE = 1e-4
TRAJECTORY = 1e-4


def brute_tkfac(a, g):
  """TKFAC.md's numerators ``E_n sum_t |g|^2 a a^T``, ``E_n sum_t |a|^2 g g^T`` and delta."""
  size, locations = a.shape[:2]
  phi = np.zeros((a.shape[-1],) * 2)
  psi = np.zeros((g.shape[-1],) * 2)
  delta = 0.0
  for n in range(size):
    for t in range(locations):
      a_sq, g_sq = a[n, t] @ a[n, t], g[n, t] @ g[n, t]
      phi += g_sq * np.outer(a[n, t], a[n, t])
      psi += a_sq * np.outer(g[n, t], g[n, t])
      delta += a_sq * g_sq
  return phi / size, psi / size, delta / size


def brute_kfac(a, g):
  """K-FAC's ``A = E_n sum_t a a^T`` and ``G = (1/T) E_n sum_t g g^T``."""
  size, locations = a.shape[:2]
  big_a = np.zeros((a.shape[-1],) * 2)
  big_g = np.zeros((g.shape[-1],) * 2)
  for n in range(size):
    for t in range(locations):
      big_a += np.outer(a[n, t], a[n, t])
      big_g += np.outer(g[n, t], g[n, t])
  return big_a / size, big_g / (size * locations)


def max_error(actual, expected) -> float:
  """The largest entry-wise error relative to the reference's largest entry (inf on a shape
  mismatch; 0 for two zero arrays, inf for a nonzero one against zeros)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  if actual.shape != expected.shape:
    return float("inf")
  error = float(np.max(np.abs(actual - expected), initial=0.0))
  scale = float(np.max(np.abs(expected), initial=0.0))
  if error == 0.0:
    return 0.0
  return error / scale if scale > 0 else float("inf")


def relative_error(actual, expected) -> float:
  """Norm-wise relative error ``|actual - expected|_F / |expected|_F``."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def assert_close(actual, expected, rtol, err_msg=""):
  """Every entry within ``rtol`` of the reference's largest entry (NaNs never pass)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
  error = max_error(actual, expected)
  assert error <= rtol, (
      f"{err_msg}: largest error {error:.3g} of the reference's largest entry "
      f"{np.max(np.abs(expected), initial=0.0):.3g}, above the tolerance {rtol:.3g}"
  )


def _leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def assert_trees_close(actual, expected, rtol, err_msg=""):
  """:func:`assert_close` leaf by leaf (each leaf relative to its own largest entry), on trees of
  the same structure; integer and boolean leaves (counts, flags) must be equal."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected), err_msg
  for (path, a), (_, e) in zip(_leaves(actual), _leaves(expected)):
    where = f"{err_msg}{jax.tree_util.keystr(path)}"
    if not np.issubdtype(np.asarray(e).dtype, np.inexact):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=where)
    else:
      assert_close(a, e, rtol, where)


def assert_trees_equal(actual, expected, err_msg=""):
  """Same structure, and every leaf of the same dtype and bit for bit equal."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected), err_msg
  for (path, a), (_, e) in zip(_leaves(actual), _leaves(expected)):
    where = f"{err_msg}{jax.tree_util.keystr(path)}"
    assert np.asarray(a).dtype == np.asarray(e).dtype, where
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=where)


def assert_detects(mistake, expected, rtol, what):
  """The tolerance ``rtol`` is tight enough: ``mistake``, the reference as a plausible bug would
  make it (``what``), fails :func:`assert_trees_close` against ``expected``."""
  # By its values, not by accident of a structure or a shape.
  assert jax.tree.structure(mistake) == jax.tree.structure(expected), what
  for (path, m), (_, e) in zip(_leaves(mistake), _leaves(expected)):
    assert np.shape(m) == np.shape(e), (what, jax.tree_util.keystr(path))
  with pytest.raises(AssertionError):
    assert_trees_close(mistake, expected, rtol, what)
