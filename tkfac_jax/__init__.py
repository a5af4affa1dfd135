"""tkfac_jax: TKFAC, a trace-restricted Kronecker-factored natural-gradient optimizer for Flax."""

from tkfac_jax._alias import tkfac
from tkfac_jax._capture import Statistics
from tkfac_jax._capture import value_grad_and_stats
from tkfac_jax._diagnostics import diagnostics
from tkfac_jax._inverses import DampedInverses
from tkfac_jax._multi_steps import MultiStepsState
from tkfac_jax._multi_steps import multi_steps
from tkfac_jax._losses import sigmoid_binary_cross_entropy
from tkfac_jax._losses import softmax_cross_entropy
from tkfac_jax._losses import squared_error
from tkfac_jax._statistics import LayerStatistics
from tkfac_jax._train_state import TrainState
from tkfac_jax._transform import LayerState
from tkfac_jax._transform import ScaleByTKFACState
from tkfac_jax._transform import scale_by_tkfac
from tkfac_jax._transform import stats_due

__version__ = "0.1.0"


def __getattr__(name):
  # tkfac_jax.nnx imports flax.nnx, which some flax releases cannot import with an older jax:
  # loaded on first use, so that the linen API never depends on it.
  if name == "nnx":
    import importlib  # pylint: disable=g-import-not-at-top

    return importlib.import_module("tkfac_jax.nnx")
  raise AttributeError(f"module 'tkfac_jax' has no attribute {name!r}")


__all__ = (
    "DampedInverses",
    "LayerState",
    "LayerStatistics",
    "MultiStepsState",
    "ScaleByTKFACState",
    "Statistics",
    "TrainState",
    "diagnostics",
    "multi_steps",
    "nnx",
    "scale_by_tkfac",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "squared_error",
    "stats_due",
    "tkfac",
    "value_grad_and_stats",
)
