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


# --- Text, for the language-model task. ---------------------------------------------------------

TEXT_DIR_ENV = "TKFAC_TEXT_DIR"
# English text shipped by the Debian package ``fortunes`` (about 2.6 MB): one file per
# collection, beside its ``.dat`` index and ``.u8`` link.
DEFAULT_TEXT_DIR = "/usr/share/games/fortunes"
VOCAB = 128  # Bytes of ASCII; any other character is read as "?".
SEQUENCE = 32  # Tokens a model sees per example; it predicts each next one.
_TEXT_TEST_SHARE = 0.1  # The end of the text, held out.
_STDLIB_BYTES = 3_000_000  # The fallback corpus: as much of the standard library's source.
VALIDATION_WINDOWS = 2000


def _ascii_ids(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("ascii", errors="replace"), np.uint8).astype(np.int32)


def _windows(ids: np.ndarray, name: str) -> Dataset:
  """Non-overlapping windows of ``SEQUENCE + 1`` tokens: inputs and next tokens; the last 10% of
  the text (whole windows) is the test set."""
  count = len(ids) // (SEQUENCE + 1)
  windows = ids[: count * (SEQUENCE + 1)].reshape(count, SEQUENCE + 1)
  test = max(1, int(count * _TEXT_TEST_SHARE))
  train, held = windows[:-test], windows[-test:]
  return Dataset(name, train[:, :-1], train[:, 1:], held[:, :-1], held[:, 1:])


def load_text(text_dir: str | os.PathLike | None = None) -> Dataset:
  """A character-level corpus: the Debian package ``fortunes``' English text if it is in
  ``text_dir`` (default ``$TKFAC_TEXT_DIR``, then ``/usr/share/games/fortunes``), else the
  first 3 MB of this Python's standard library source (always there), with a notice.

  Returns a :class:`Dataset` whose ``x`` are ``[N, 32]`` token ids (ASCII bytes) and whose ``y``
  are the next tokens, ``[N, 32]``.
  """
  if text_dir is None:
    text_dir = os.environ.get(TEXT_DIR_ENV) or DEFAULT_TEXT_DIR
  directory = pathlib.Path(text_dir)
  files = sorted(p for p in directory.iterdir() if p.is_file() and not p.suffix) if (
      directory.is_dir()) else []
  if files:
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    return _windows(_ascii_ids(text), "fortunes")
  import sysconfig  # noqa: PLC0415

  print(
      f"No text corpus in {text_dir}; using this Python's standard library source as a "
      "character-level corpus instead. For English text: sudo apt-get install fortunes, or pass "
      "--text-dir.",
      file=sys.stderr,
  )
  parts, size = [], 0
  for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
    parts.append(path.read_text(encoding="utf-8", errors="replace"))
    size += len(parts[-1])
    if size >= _STDLIB_BYTES:
      break
  return _windows(_ascii_ids("\n".join(parts))[:_STDLIB_BYTES], "python-stdlib")
