"""Fashion-MNIST from local IDX files, with scikit-learn's bundled digits as a fallback.

Nothing is ever downloaded. Fashion-MNIST is read from ``data_dir``, else from the directory in the
``TKFAC_DATA_DIR`` environment variable, else from where the Debian package
``dataset-fashion-mnist`` installs it. When the files are not there, scikit-learn's 8x8 digits
(shipped with scikit-learn) are used instead, with a one-line notice.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import sys
from typing import NamedTuple

import numpy as np

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "TKFAC_DATA_DIR"

# File name -> (IDX magic number, expected shape). The Debian package recompresses the original
# archives, so the files are checked by their headers and shapes, not by checksums.
_FASHION_MNIST = {
    "x_train": ("train-images-idx3-ubyte.gz", 2051, (60000, 28, 28)),
    "y_train": ("train-labels-idx1-ubyte.gz", 2049, (60000,)),
    "x_test": ("t10k-images-idx3-ubyte.gz", 2051, (10000, 28, 28)),
    "y_test": ("t10k-labels-idx1-ubyte.gz", 2049, (10000,)),
}
_DIGITS_TEST_SIZE = 297  # 1797 digits: 1500 to train on, 297 to test on.
# Height, width and channels of each data set's images, for models that take images.
IMAGE_SHAPES = {"fashion-mnist": (28, 28, 1), "digits": (8, 8, 1)}


class Dataset(NamedTuple):
  """A classification data set held in memory.

  Attributes:
    name: ``"fashion-mnist"`` or ``"digits"``.
    x_train: ``[N, D]`` float32 images, flattened, scaled to [0, 1] (``[N, H, W, C]`` after
      :meth:`as_images`).
    y_train: ``[N]`` int32 labels.
    x_test: ``[M, D]`` float32 images, flattened, scaled to [0, 1] (or ``[M, H, W, C]``).
    y_test: ``[M]`` int32 labels.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def num_classes(self) -> int:
    return int(self.y_train.max()) + 1

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(height, width, channels)`` of one image: ``x_train[i]`` reshaped to it."""
    return IMAGE_SHAPES[self.name]

  def as_images(self) -> Dataset:
    """The same data with the images as ``[N, height, width, channels]``."""
    return self._replace(
        x_train=self.x_train.reshape(-1, *self.image_shape),
        x_test=self.x_test.reshape(-1, *self.image_shape),
    )


def read_idx(path: str | os.PathLike, magic: int, shape: tuple[int, ...]) -> np.ndarray:
  """Reads a gzipped IDX file of unsigned bytes and checks its magic number and shape.

  Args:
    path: the ``.gz`` file.
    magic: expected magic number (2049 for label files, 2051 for image files).
    shape: expected array shape.

  Returns:
    The uint8 array.

  Raises:
    ValueError: if the header or the size does not match.
  """
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = len(shape)
  header = 4 * (1 + ndim)
  got_magic = int.from_bytes(raw[:4], "big")
  got_shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  if got_magic != magic or got_shape != shape or len(raw) != header + int(np.prod(shape)):
    raise ValueError(
        f"{path} is not the expected IDX file: magic {got_magic} and shape {got_shape} "
        f"({len(raw)} bytes), expected magic {magic} and shape {shape}."
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(data_dir: str | os.PathLike) -> Dataset:
  """Loads the four Fashion-MNIST IDX files from ``data_dir``."""
  arrays = {
      key: read_idx(pathlib.Path(data_dir) / name, magic, shape)
      for key, (name, magic, shape) in _FASHION_MNIST.items()
  }
  return Dataset(
      name="fashion-mnist",
      x_train=(arrays["x_train"].reshape(60000, -1) / np.float32(255)).astype(np.float32),
      y_train=arrays["y_train"].astype(np.int32),
      x_test=(arrays["x_test"].reshape(10000, -1) / np.float32(255)).astype(np.float32),
      y_test=arrays["y_test"].astype(np.int32),
  )


def load_digits() -> Dataset:
  """scikit-learn's bundled 8x8 digits, split into train and test by a fixed permutation."""
  from sklearn import datasets  # Imported here: only the fallback needs scikit-learn.

  digits = datasets.load_digits()
  x = (digits.data / np.float32(16)).astype(np.float32)  # Pixels are 0..16.
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  test, train = order[:_DIGITS_TEST_SIZE], order[_DIGITS_TEST_SIZE:]
  return Dataset("digits", x[train], y[train], x[test], y[test])


def load(data_dir: str | os.PathLike | None = None) -> Dataset:
  """Fashion-MNIST if its files are in ``data_dir`` (or the default places), else digits.

  Args:
    data_dir: directory holding the four ``*-ubyte.gz`` files. Defaults to ``$TKFAC_DATA_DIR``,
      then to ``/usr/share/datasets/fashion-mnist``.

  Returns:
    The :class:`Dataset`.

  Raises:
    ValueError: if some of the files are missing or are not Fashion-MNIST (a broken copy is
      reported, not silently replaced by another data set).
  """
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
  files = [pathlib.Path(data_dir) / name for name, _, _ in _FASHION_MNIST.values()]
  missing = [f.name for f in files if not f.is_file()]
  if not missing:
    return load_fashion_mnist(data_dir)
  if len(missing) < len(files):
    raise ValueError(f"{data_dir} holds only part of Fashion-MNIST: {missing} are missing.")
  print(
      f"Fashion-MNIST not found in {data_dir}; using scikit-learn's 8x8 digits instead. For "
      "Fashion-MNIST: sudo apt-get install dataset-fashion-mnist, or pass --data-dir.",
      file=sys.stderr,
  )
  return load_digits()
