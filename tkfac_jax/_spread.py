"""Spreading the layers' inverses over the devices of a mesh axis.

Replicated, every device of a data-parallel mesh inverts every layer's factors: the same work,
repeated on each device. Spread, each layer is assigned to one device along a mesh axis (balanced
by the cost of its inversions), each device computes only its own layers, and one ``psum`` (zeros
from the devices that do not own a layer) gives every device all the results. Plain JAX:
``jax.shard_map``, ``lax.axis_index``, ``lax.switch`` and ``lax.psum``.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


def assign(costs: Sequence[float], num_devices: int) -> list[int]:
  """Device index for each task: longest first, each to the least loaded device (ties: lowest)."""
  loads = [0.0] * num_devices
  owners = [0] * len(costs)
  for task in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
    device = min(range(num_devices), key=lambda d: (loads[d], d))
    owners[task] = device
    loads[device] += costs[task]
  return owners


def _mesh_for(axis: str, mesh) -> tuple[Any, bool]:
  """The mesh to spread over, and whether the step already runs inside ``shard_map`` over it."""
  context = jax.sharding.get_abstract_mesh()
  if axis in context.manual_axes:
    return context, True
  if mesh is None and axis in context.axis_names:
    return context, False
  if mesh is None:
    raise ValueError(
        f"inverse_axis={axis!r} needs a mesh with that axis: pass scale_by_tkfac(..., mesh=...), "
        "or run the step under jax.set_mesh(mesh), or inside jax.shard_map over that axis."
    )
  return mesh, False


def spread(
    compute: Callable[[Any], Any],
    inputs: Mapping[Hashable, Any],
    costs: Mapping[Hashable, float],
    axis: str,
    mesh=None,
) -> dict[Hashable, Any]:
  """``{key: compute(inputs[key])}``, each computed on one device along ``axis`` only.

  ``inputs`` must be the same on every device along ``axis`` (replicated), as the optimizer state
  is. Boolean outputs are shared as integers.
  """
  keys = list(inputs)
  mesh, inside = _mesh_for(axis, mesh)
  num_devices = mesh.shape[axis]
  owners = dict(zip(keys, assign([costs[k] for k in keys], num_devices)))

  def own_share(inputs):
    shapes = {k: jax.eval_shape(compute, inputs[k]) for k in keys}

    def branch(device):
      def run(inputs):
        return {
            k: jax.tree.map(
                lambda x: x.astype(jnp.int32) if x.dtype == bool else x, compute(inputs[k])
            )
            if owners[k] == device
            else jax.tree.map(
                lambda s: jnp.zeros(s.shape, jnp.int32 if s.dtype == bool else s.dtype), shapes[k]
            )
            for k in keys
        }

      return run

    share = jax.lax.switch(
        jax.lax.axis_index(axis), [branch(d) for d in range(num_devices)], inputs
    )
    # Every entry is nonzero on its owner only, so the sum is the owner's result exactly.
    shared = jax.lax.psum(share, axis)
    return {
        k: jax.tree.map(lambda x, s: x.astype(s.dtype), shared[k], shapes[k]) for k in keys
    }

  if inside:
    return own_share(dict(inputs))
  return jax.shard_map(
      own_share,
      mesh=mesh,
      in_specs=PartitionSpec(),
      out_specs=PartitionSpec(),
      axis_names=frozenset({axis}),
  )(dict(inputs))
