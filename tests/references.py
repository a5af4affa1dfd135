"""Independent brute-force references shared by the truth tests: loops over examples and
locations, in float64 NumPy, written from TKFAC.md and never from the library."""

import numpy as np


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


def assert_close(actual, expected, rtol, err_msg=""):
  """Entry-wise closeness, up to ``rtol`` of the reference's largest entry."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
  scale = float(np.max(np.abs(expected), initial=0.0))
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=err_msg)
