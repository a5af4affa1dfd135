"""tkfac_jax: TKFAC, a trace-restricted Kronecker-factored natural-gradient optimizer for Flax.

The optimizer is :func:`tkfac` (or :func:`scale_by_tkfac` for ``optax.chain``); the statistics
come from :func:`value_grad_and_stats` (linen) or :func:`tkfac_jax.nnx.value_grad_and_stats`
(NNX) inside the user's jitted train step. Each has its arguments in its docstring.

Which layers are preconditioned, and the shape of each one's Fisher block:

- ``nn.Dense`` / ``nnx.Linear``: ``[W; b]``, ``(d_in + 1) x d_out``. Inputs with extra axes
  (``[B, T, d]``) give one location per position.
- ``nn.DenseGeneral`` / ``nnx.LinearGeneral`` (attention's query, key, value and output
  projections): the input axes flattened by the output axes flattened, one block over all heads.
  Several output axes need a bias, which tells the optimizer which kernel axes are outputs; no
  ``batch_dims``.
- ``nn.Conv`` / ``nnx.Conv`` (1-D, 2-D, 3-D): ``(taps * c_in + 1) x c_out``, any padding,
  strides and dilation; one location per output position (K-FAC's KFC).
- ``nn.Embed`` / ``nnx.Embed``: a diagonal input factor (the per-token count, kept as a vector)
  by ``features``.
- Stacks: ``nn.scan`` (and ``nnx.vmap``-made layers applied with ``nnx.scan``) get one set of
  factors per layer; ``nn.remat`` / ``jax.checkpoint`` blocks are captured as without remat. A
  stack without biases needs ``stacked={"<its path in params>": 1}``.

Every other parameter (norms; grouped, depthwise or masked convolutions, ``nn.ConvTranspose``,
``Embed.attend``, stacks applied with ``nn.vmap``, custom modules) takes the fallback update; a
layer that the loss applies but that cannot be captured is listed in ``Statistics.skipped``, with
one warning. A model called under ``jax.vmap`` one example at a time raises.

Recipes:

- Tuning: with the defaults the KL clip sets the step; tune ``kl_clip`` (1e-6 per parameter) and
  ``damping`` (relative to each block's mean eigenvalue, 10) before ``learning_rate``. The paper's
  configuration: ``tkfac(lr, damping=1e-2, conv_damping_floor=nu, scale_invariant=False,
  kl_clip=1e-4, stats_every=1, inverse_every=10)``. Under ``optax.inject_hyperparams``, pass
  ``static_args=("inverse_every",)``.
- The loss given to :func:`value_grad_and_stats` is the batch mean (or any constant multiple, such
  as a sum over positions). With BatchNorm, return ``(loss, new_batch_stats)`` with
  ``has_aux=True``. For the sampled Fisher (``fisher="sampled"``), compute the loss with
  :func:`softmax_cross_entropy`, :func:`sigmoid_binary_cross_entropy` or :func:`squared_error`
  and pass a new ``fisher_key=`` every step.
- :func:`scale_by_tkfac` is the preconditioner alone, for ``optax.chain``; its ``update(...,
  stats=None)`` steps with the curvature already in the state.
- Gradient accumulation: :func:`multi_steps` replaces ``optax.MultiSteps`` (which keeps only the
  last micro-batch's statistics). :class:`TrainState` steps with ``state.apply_gradients(grads=...,
  stats=...)``. Under ``optax.partition`` / ``optax.masked``, TKFAC uses only its part's
  statistics.
- Several devices: shard the batch over a mesh axis and replicate the parameters and the state;
  the train step is unchanged, and its statistics, factors and updates equal one device's on the
  whole batch. ``tkfac(..., inverse_axis="data", mesh=mesh)`` spreads the inverses: each device
  inverts its share of the layers and one ``psum`` shares them. Under ``jax.shard_map``,
  ``value_grad_and_stats(loss_fn, axis_name="data")`` gives the global batch's loss, gradient and
  statistics (one ``lax.pmean``); without ``axis_name``, the shard's own. Several hosts:
  ``jax.distributed.initialize`` in each process, and global arrays from
  ``jax.make_array_from_process_local_data``.
- The state is a pytree of arrays: Orbax and ``flax.serialization`` restore it and the run
  continues exactly. :func:`diagnostics` gives per-layer traces, damping and condition numbers.
  Factors are float32 unless ``dtype=`` says otherwise.
- Statistics with NaN or Inf are skipped, and a factor that is not positive definite keeps its
  previous inverse; for a non-finite *gradient*, wrap the optimizer in ``optax.apply_if_finite``.
"""

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
