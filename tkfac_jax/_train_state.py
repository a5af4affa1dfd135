"""A ``flax.training.train_state.TrainState`` whose ``apply_gradients`` passes the statistics."""

from __future__ import annotations

from typing import Any

import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """Flax's ``TrainState``, with ``apply_gradients(grads=..., stats=...)``.

  Flax's own ``apply_gradients`` calls ``tx.update(grads, opt_state, params)`` with no extra
  arguments, which :func:`scale_by_tkfac` refuses (a missing ``stats`` is never silent). This
  subclass takes ``stats`` (or ``stats=None``) and forwards it; everything else is unchanged.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, tkfac_jax
    >>> model = nn.Dense(2)
    >>> x = jnp.ones((4, 3))
    >>> state = tkfac_jax.TrainState.create(
    ...     apply_fn=model.apply,
    ...     params=model.init(jax.random.key(0), x)['params'],
    ...     tx=tkfac_jax.tkfac(learning_rate=0.1),
    ... )
    >>> loss_fn = lambda p: jnp.mean(state.apply_fn({'params': p}, x) ** 2)
    >>> loss, grads, stats = tkfac_jax.value_grad_and_stats(loss_fn)(state.params)
    >>> state = state.apply_gradients(grads=grads, stats=stats)
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads: Any, stats: Any, **kwargs) -> "TrainState":
    """Like Flax's, with this step's statistics (or ``None``) passed to the optimizer."""
    updates, new_opt_state = self.tx.update(grads, self.opt_state, self.params, stats=stats)
    return self.replace(
        step=self.step + 1,
        params=optax.apply_updates(self.params, updates),
        opt_state=new_opt_state,
        **kwargs,
    )
