"""Test configuration: several CPU devices and strict numerics, set before JAX starts."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Most of the suite's time is XLA compiling small programs once each; LLVM's optimisation of the
# CPU code is a third of it. Without it the suite runs about 30% faster and computes the same
# numbers (floating-point semantics do not depend on it: fast math is off either way).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_platforms", "cpu")
