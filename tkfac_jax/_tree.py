"""Layer paths: how statistics, optimizer state and parameters are matched to each other."""

from __future__ import annotations

from typing import Any, Callable, Hashable, NamedTuple

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


def _import_nnx():
  """``flax.nnx``, or None where it does not import (some flax releases' NNX needs a newer jax
  than their linen does)."""
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return nnx


NNX = _import_nnx()
_BOXES = (meta.AxisMetadata,) if NNX is None else (meta.AxisMetadata, NNX.Variable)


def is_box(x: Any) -> bool:
  """A Flax box around a parameter: linen's metadata (``nn.with_partitioning`` gives
  ``nn.Partitioned``), or an NNX variable (``nnx.Optimizer`` initialises its transformation with
  the model's ``nnx.State`` of ``nnx.Param``)."""
  return isinstance(x, _BOXES)


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


class LayerNode(NamedTuple):
  """A parameter node that TKFAC can precondition.

  Attributes:
    params: ``{'kernel'|'embedding': ..., 'bias': ...}``.
    lead: how many leading axes stack copies of the layer (``nn.scan``): each copy has its own
      factors.
  """

  params: dict[str, Any]
  lead: int = 0

  @property
  def stack(self) -> tuple[int, ...]:
    """The stack's shape: the leading ``lead`` axes of the layer's parameters."""
    return tuple(jnp.shape(next(iter(self.params.values())))[:self.lead])


def _matches(path: Path, prefix: Path) -> bool:
  return path[:len(prefix)] == prefix


def layer_nodes(params: Any, stacked: dict[Path, int] | None = None) -> dict[Path, LayerNode]:
  """Finds the parameter nodes that look like a layer TKFAC can precondition.

  A node with a ``kernel`` of two or more dimensions (a dense layer, a convolution: its input
  side is every axis but the last) and maybe a ``bias``, or a node with a 2-D ``embedding``. The
  bias tells the output axes: they are the kernel's last ``bias.ndim`` axes (one for Dense and
  Conv; two for the query, key and value projections of attention, a DenseGeneral with
  ``features=(heads, head_dim)``). It also tells a stack of layers (``nn.scan`` over a Dense:
  kernel ``(L, d_in, d_out)``, bias ``(L, d_out)``): leading axes that the bias shares with the
  kernel. Where both readings fit (``L == d_in``) the layer is read as not stacked. A bias of
  another shape (a ConvLocal's) means the layer is not one block. ``stacked`` maps path prefixes
  to the number of leading layer axes of the layers under them, for stacks the shapes cannot tell
  (kernels without a bias); a 3-D embedding is a stack of one axis.

  Returns:
    A mapping from the node's path to its :class:`LayerNode`.
  """
  nodes: dict[Path, dict[str, Any]] = {}
  for path, leaf in flatten_with_paths(params).items():
    if path and path[-1] in ("kernel", "bias", "embedding"):
      nodes.setdefault(path[:-1], {})[path[-1]] = leaf

  def hinted(path: Path) -> int | None:
    hits = [(len(p), n) for p, n in (stacked or {}).items() if _matches(path, p)]
    return max(hits)[1] if hits else None

  def lead_axes(path: Path, node) -> int | None:
    """The node's stacked axes, or ``None`` if it is not a layer."""
    hint = hinted(path)
    if "kernel" not in node:
      if "embedding" not in node:
        return None
      lead = jnp.ndim(node["embedding"]) - 2
      return lead if lead >= 0 and hint in (None, lead) else None
    kernel = tuple(jnp.shape(node["kernel"]))
    leads = [hint] if hint is not None else list(range(len(kernel) - 1))
    if "bias" not in node:
      lead = leads[0]
      return lead if len(kernel) - lead >= 2 else None
    bias = tuple(jnp.shape(node["bias"]))
    for lead in leads:
      out = len(bias) - lead
      if out >= 1 and len(kernel) - lead - out >= 1 and (
          bias == kernel[:lead] + kernel[len(kernel) - out:]
      ):
        return lead
    return None

  found = {}
  for path, node in nodes.items():
    lead = lead_axes(path, node)
    if lead is not None:
      found[path] = LayerNode(node, lead)
  return found
