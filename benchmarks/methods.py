"""The optimizers the benchmark compares, behind one small interface.

``create(name, task, hparams, dropout_key)`` returns a :class:`Runner`: ``start`` compiles (and
initialises the optimizer state), ``step`` runs one training step. TKFAC, K-FAC (this library's
mode), Muon, Adam and SGD are Optax transformations in one jitted step; kfac-jax is its own
``kfac_jax.Optimizer``, which jits itself.

Settings shared by all: momentum 0.9 (TKFAC, K-FAC, kfac-jax, SGD), no weight decay. TKFAC and
K-FAC: factor decay 0.95, inverses every 10 steps, KL clipping ``hparams["kl_clip"]`` (by
default 1e-4, ``tkfac_jax.tkfac``'s default), the empirical Fisher (statistics from the labels'
gradients). kfac-jax: the same decay (``curvature_ema=0.95``) and inverse period
(``inverse_update_period=10``), a fixed learning rate, momentum and damping (from its own grid: it
has no KL clip), no burn-in steps (it needs a data iterator), and its own default curvature
estimator (``ggn_curvature_prop``: the generalised Gauss-Newton,
which for these losses is the true Fisher) and pi-adjusted factored damping.
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

import tkfac_jax
from benchmarks import tasks

# TKFAC as tuned (``tkfac``) and, only beside it when tuning, with the library's defaults untouched
# (``tkfac_defaults``, never tuned: it has no grid): what a user who does not tune gets.
OPTIMIZERS = ("tkfac", "kfac", "kfac_jax", "muon", "adam", "sgd", "tkfac_defaults")
SECOND_ORDER = ("tkfac", "kfac", "kfac_jax", "tkfac_defaults")
MOMENTUM = 0.9
INVERSE_EVERY = 10  # kfac-jax's inverse period (TKFAC's cadence is in its hparams).
DECAY = 0.95
# kfac-jax 0.0.8, its latest release, fails inside its graph matcher on jax >= 0.9.2 (ValueError:
# too many values to unpack); the [bench] extra pins jax 0.9.1 for it.
KFAC_JAX_MAX_JAX = (0, 9, 1)


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def import_kfac_jax():
  """``import kfac_jax``, without the DeprecationWarning it raises on import with jax 0.9."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # jax_pmap_shmap_merge, set by kfac-jax.
    import kfac_jax

  return kfac_jax


def kfac_jax_unavailable() -> str | None:
  """Why kfac-jax cannot run here (one line saying what to do), or None when it can."""
  try:
    kfac_jax = import_kfac_jax()
  except ImportError as error:
    return (
        f"kfac-jax is not installed ({error}); pip install -e \".[bench]\" installs it with the "
        "jax it works with."
    )
  except Exception as error:  # noqa: BLE001  Its dependencies can break on import, e.g. an old
    # tensorflow-probability that reaches into jax internals removed since.
    return (
        f"kfac-jax fails on import ({type(error).__name__}: {error}); pip install -e \".[bench]\" "
        "in a fresh environment installs versions that work together."
    )
  if _version(jax.__version__) > KFAC_JAX_MAX_JAX:
    return (
        f"kfac-jax {kfac_jax.__version__} fails on jax {jax.__version__} (it works up to jax "
        f"{'.'.join(map(str, KFAC_JAX_MAX_JAX))}); pip install -e \".[bench]\" in a fresh "
        "environment installs jax 0.9.1."
    )
  return None


def _peak_bytes(compiled: Any) -> int | None:
  """XLA's estimate of one call's peak: arguments + outputs + temporaries - aliased buffers."""
  try:
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
  except Exception:  # noqa: BLE001  Not every backend or jax version reports it.
    return None


class Runner:
  """One optimizer on one task: ``start`` compiles and initialises, ``step`` trains.

  The training state is ``(params, model_state, opt_state)``. Attributes set by ``start``:
  ``start_seconds`` (initialising, compiling and running one step that is thrown away; the
  memory analysis excluded) and ``peak_bytes`` (XLA's memory estimate of one step, or None).
  """

  start_seconds: float = 0.0
  peak_bytes: int | None = None

  def start(self, params, model_state, x, y):
    raise NotImplementedError

  def step(self, state, x, y, i: int):
    raise NotImplementedError


class OptaxRunner(Runner):
  """An Optax transformation in one jitted step; with ``curvature``, TKFAC's statistics too.

  Step ``i`` draws its dropout masks from ``fold_in(dropout_key, i)``, so every Optax optimizer
  sees the same masks.
  """

  def __init__(self, task: tasks.Task, tx: optax.GradientTransformation, curvature: str | None,
               dropout_key: jax.Array):
    self.tx = tx

    def loss_fn(params, model_state, x, y, rng):
      logits, new_state = task.model.apply(
          {"params": params, **model_state}, x, train=True, rngs={"dropout": rng},
          mutable=list(model_state),
      )
      return task.loss(logits, x, y), new_state

    def train_step(params, model_state, opt_state, x, y, i):
      rng = jax.random.fold_in(dropout_key, i)
      if curvature is None:
        (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, model_state, x, y, rng
        )
        updates, opt_state = tx.update(grads, opt_state, params)
      else:  # Statistics computed only on the steps where the optimizer uses them.
        (loss, model_state), grads, stats = tkfac_jax.value_grad_and_stats(
            loss_fn, has_aux=True, curvature=curvature
        )(params, model_state, x, y, rng, stats_due=tkfac_jax.stats_due(opt_state))
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      return (optax.apply_updates(params, updates), model_state, opt_state), loss

    # The step donates its state, as a training loop should (and as kfac-jax's does): XLA then
    # updates it in place rather than copying every array of it on every step.
    self._jitted = jax.jit(train_step, donate_argnums=(0, 1, 2))

  def start(self, params, model_state, x, y):
    start = time.perf_counter()
    params, model_state = jax.tree.map(jnp.copy, (params, model_state))  # The caller's stay.
    opt_state = self.tx.init(params)
    self._compiled = self._jitted.lower(params, model_state, opt_state, x, y, 0).compile()
    # One step on copies, thrown away, as kfac-jax's start needs: one-time costs of the first
    # execution (allocations, thread pools) then stay out of every optimizer's training time.
    copies = jax.tree.map(jnp.copy, (params, model_state, opt_state))
    jax.block_until_ready(self._compiled(*copies, x, y, 0))
    self.start_seconds = time.perf_counter() - start
    self.peak_bytes = _peak_bytes(self._compiled)
    return params, model_state, opt_state

  def step(self, state, x, y, i):
    return self._compiled(*state, x, y, i)


class KfacJaxRunner(Runner):
  """``kfac_jax.Optimizer`` with a fixed learning rate, momentum and damping.

  kfac-jax compiles on its first step, so ``start`` runs one step on copies of the state (and
  throws it away); the compile time is that call less one median step. kfac-jax promotes ranks
  implicitly, so it runs with ``jax.numpy_rank_promotion("allow")`` whatever the caller's setting.
  """

  def __init__(self, task: tasks.Task, learning_rate: float, damping: float,
               dropout_key: jax.Array):
    kfac_jax = import_kfac_jax()
    self._dropout_key = dropout_key

    def loss_fn(params, model_state, rng, batch):
      x, y = batch
      logits, new_state = task.model.apply(
          {"params": params, **model_state}, x, train=True, rngs={"dropout": rng},
          mutable=list(model_state),
      )
      task.register_kfac_jax_loss(kfac_jax, logits, x, y)
      return task.loss(logits, x, y), new_state

    self.optimizer = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn, has_aux=True),
        l2_reg=0.0,
        value_func_has_state=True,
        value_func_has_rng=True,
        learning_rate_schedule=lambda _: learning_rate,
        momentum_schedule=lambda _: MOMENTUM,
        damping_schedule=lambda _: damping,
        num_burnin_steps=0,
        curvature_ema=DECAY,
        inverse_update_period=INVERSE_EVERY,
        multi_device=False,
    )

  def start(self, params, model_state, x, y):
    opt = self.optimizer
    # kfac-jax's step donates (deletes) its inputs: it trains, and compiles, on copies.
    params, model_state = opt.copy_obj(params), opt.copy_obj(model_state)
    rng = jax.random.fold_in(self._dropout_key, 0)
    with jax.numpy_rank_promotion("allow"):
      start = time.perf_counter()
      opt_state = opt.init(params, rng, (x, y), model_state)
      out = opt.step(opt.copy_obj(params), opt.copy_obj(opt_state), rng, batch=(x, y),
                     func_state=opt.copy_obj(model_state), global_step_int=0)
      jax.block_until_ready(out)
      self.start_seconds = time.perf_counter() - start
      self.peak_bytes = self._peak_bytes(params, opt_state, rng, (x, y), model_state)
    return params, model_state, opt_state

  def _peak_bytes(self, params, opt_state, rng, batch, model_state) -> int | None:
    # The same analysis as the Optax steps', of kfac-jax's step function compiled once more.
    step = functools.partial(self.optimizer._step, learning_rate=None, momentum=None,  # noqa: SLF001
                             damping=None, should_update_estimate_curvature=True,
                             should_update_damping=False)
    try:
      return _peak_bytes(jax.jit(step).lower(params, opt_state, rng, batch, model_state).compile())
    except Exception:  # noqa: BLE001  A private function: report no figure rather than fail.
      return None

  def step(self, state, x, y, i):
    params, model_state, opt_state = state
    rng = jax.random.fold_in(self._dropout_key, i)
    with jax.numpy_rank_promotion("allow"):
      params, opt_state, model_state, stats = self.optimizer.step(
          params, opt_state, rng, batch=(x, y), func_state=model_state, global_step_int=i
      )
    return (params, model_state, opt_state), stats["loss"]


def muon_unavailable() -> str | None:
  """Why Muon cannot run here (its Optax is too old), or None when it can."""
  if not hasattr(getattr(optax, "contrib", None), "MuonDimensionNumbers"):
    return (f"optax {optax.__version__} has no optax.contrib.muon with MuonDimensionNumbers; "
            "pip install -U optax to race Muon too")
  return None


def _muon_dimensions(params):
  """Muon's matrix view of each parameter: a kernel's last axis is its output, the others are
  reduced over; biases and norms (None) take Adam."""
  from optax.contrib import MuonDimensionNumbers  # noqa: PLC0415  (newer optax only)

  def dims(path, leaf):
    name = getattr(path[-1], "key", None)
    if name == "kernel" and leaf.ndim >= 2:
      return MuonDimensionNumbers(tuple(range(leaf.ndim - 1)), leaf.ndim - 1)
    return None

  return jax.tree_util.tree_map_with_path(dims, params)


def create(name: str, task: tasks.Task, hparams: dict[str, Any],
           dropout_key: jax.Array) -> Runner:
  """The runner for the optimizer called ``name`` with ``hparams`` (learning_rate, damping)."""
  lr = hparams["learning_rate"]
  if name in ("tkfac", "kfac", "tkfac_defaults"):
    curvature = "kfac" if name == "kfac" else "tkfac"
    scale_invariant = hparams.get("scale_invariant", True)
    # The paper's convolution damping has an absolute floor; the scale-invariant damping is
    # already relative to each block, so it takes no floor unless one is asked for.
    floor = hparams.get("conv_damping_floor", None if scale_invariant else task.conv_damping_floor)
    # Settings the hparams leave out take tkfac_jax.tkfac's defaults.
    given = {k: hparams[k] for k in ("damping", "kl_clip", "stats_every", "inverse_every")
             if k in hparams}
    tx = tkfac_jax.tkfac(lr, conv_damping_floor=floor, momentum=MOMENTUM,
                         decay=hparams.get("decay", DECAY),
                         curvature=curvature, scale_invariant=scale_invariant, **given)
    return OptaxRunner(task, tx, curvature, dropout_key)
  if name == "kfac_jax":
    return KfacJaxRunner(task, lr, hparams["damping"], dropout_key)
  if name == "muon":
    # Muon orthogonalises the momentum of every kernel (a convolution's over its spatial and
    # input axes together, as its users reshape it), and gives the other parameters (biases,
    # BatchNorm) Adam at their own learning rate.
    tx = optax.contrib.muon(
        lr, adam_learning_rate=hparams.get("adam_learning_rate"),
        muon_weight_dimension_numbers=_muon_dimensions,
    )
    return OptaxRunner(task, tx, None, dropout_key)
  if name == "adam":
    return OptaxRunner(task, optax.adam(lr), None, dropout_key)
  if name == "sgd":
    return OptaxRunner(task, optax.sgd(lr, momentum=MOMENTUM), None, dropout_key)
  raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")


