"""Test configuration: several CPU devices and strict numerics, set before JAX starts."""

import atexit
import os
import shutil
import tempfile

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

# Many tests compile the same programs again (the same model and optimizer, other assertions; a
# jitted closure made anew is a new function to jit's own cache). XLA's persistent cache, in a
# directory of this session only, compiles each once: about 11% off the suite's time.
_CACHE = tempfile.mkdtemp(prefix="tkfac-tests-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
