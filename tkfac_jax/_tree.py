"""Layer paths: how statistics, optimizer state and parameters are matched to each other."""

from __future__ import annotations

from typing import Any, Callable, Hashable

from flax.core import meta
import jax
import jax.numpy as jnp

Path = tuple[Hashable, ...]


def plain_key(entry: Any) -> Hashable:
  """The dict key, sequence index or attribute name of one jax key-path entry."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return str(entry)


def plain_path(keypath) -> Path:
  return tuple(plain_key(k) for k in keypath)


def path_str(path: Path) -> str:
  return "/".join(str(k) for k in path) or "<root>"


def is_box(x: Any) -> bool:
  """A Flax metadata box around a parameter (``nn.with_partitioning`` gives ``nn.Partitioned``)."""
  return isinstance(x, meta.AxisMetadata)


def flatten_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[Path, Any]:
  """``{path: leaf}`` in the order of ``jax.tree.leaves``.

  A boxed parameter (``kernel: Partitioned(value=...)``) keeps the box's path (``.../kernel``,
  not ``.../kernel/value``), so that boxed and plain parameter trees match the same layers.
  """
  user_leaf = is_leaf or (lambda x: False)
  leaves, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: user_leaf(x) or is_box(x)
  )
  flat = {}
  for keypath, leaf in leaves:
    path = plain_path(keypath)
    if not is_box(leaf) or user_leaf(leaf):
      flat[path] = leaf
      continue
    inner, _ = jax.tree_util.tree_flatten_with_path(leaf, is_leaf=is_leaf)
    for inner_keypath, inner_leaf in inner:
      flat[path if len(inner) == 1 else path + plain_path(inner_keypath)] = inner_leaf
  return flat


def nest(flat: dict[Path, Any]) -> Any:
  """Builds the nested dict whose leaf at ``path`` is ``flat[path]``.

  The empty path is the root: ``{(): x}`` nests to ``x`` itself, as a params tree that is one
  layer's own node has that layer's entry at its root.
  """
  if () in flat:
    return flat[()]
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def layer_nodes(params: Any) -> dict[Path, dict[str, Any]]:
  """Finds the parameter nodes that look like a layer TKFAC can precondition.

  A node with a ``kernel`` of two or more dimensions (a dense layer, a convolution: its input
  side is every axis but the last) and maybe a ``bias``, or a node with a 2-D ``embedding``. The
  bias tells the output axes: they are the kernel's last ``bias.ndim`` axes (one for Dense and
  Conv; two for the query, key and value projections of attention, a DenseGeneral with
  ``features=(heads, head_dim)``). A bias of another shape (a ConvLocal's) means the layer is not
  one block.
  Returns a mapping from the node's path to its ``{'kernel'|'embedding': ..., 'bias': ...}``.
  """
  nodes: dict[Path, dict[str, Any]] = {}
  for path, leaf in flatten_with_paths(params).items():
    if path and path[-1] in ("kernel", "bias", "embedding"):
      nodes.setdefault(path[:-1], {})[path[-1]] = leaf


  def is_layer(node) -> bool:
    if "kernel" in node:
      kernel = node["kernel"]
      bias = tuple(jnp.shape(node["bias"])) if "bias" in node else None
      bias_ok = bias is None or (
          0 < len(bias) < jnp.ndim(kernel) and bias == tuple(kernel.shape[-len(bias):])
      )
      return jnp.ndim(kernel) >= 2 and bias_ok
    return "embedding" in node and jnp.ndim(node["embedding"]) == 2

  return {path: node for path, node in nodes.items() if is_layer(node)}
