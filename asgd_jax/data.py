"""Datasets and deterministic, key-driven batching for the training loops.

Loading. Every dataset goes through ``tfds.data_source`` (``array_record`` files, random
access, no TensorFlow) and lands in memory as a :class:`Dataset` of ``jax.Array``s: images
``float32`` in ``[0, 1]`` laid out NHWC, labels ``int32``.

* ``digits`` (the default) is real data that works offline: scikit-learn's 8×8 handwritten
  digits (1,440 train / 357 test, split fixed by position), exposed as the TFDS builder
  :class:`asgd_jax.datasets.SklearnDigits` and built into the data directory on first use
  (about two seconds, once).
* ``mnist``, ``fashion_mnist`` and ``cifar10`` are read when they are already prepared in
  ``array_record`` format under the data directory. Nothing is ever downloaded: when a dataset
  is missing, :func:`load` fails at once with :class:`DatasetNotAvailableError`, whose message
  says how to prepare it and which offline dataset to use instead (``tfds.load`` is never
  called: offline it retries for minutes before failing).

The data directory is the ``data_dir`` argument, else ``$TFDS_DATA_DIR``, else
``~/tensorflow_datasets`` (tfds's own default).

Batching. The batch of step ``t`` is a pure function of ``(key, t)``, computed in a handful of
integer operations per index so that it can sit inside ``jit``/``lax.scan``/``vmap``:
epoch ``e = t // steps_per_epoch`` visits the training set in the order of a pseudorandom
permutation ``π_e`` (a keyed Feistel network on the next power of four, cycle-walked into
``[0, N)``, so no ``O(N log N)`` shuffle per step), and step ``t`` takes the
``t mod steps_per_epoch``-th block of ``batch_size`` entries of ``π_e``. The last
``N mod batch_size`` entries of each epoch's order are skipped; they differ from epoch to epoch.

Per-worker streams (:func:`worker_batch_indices`): worker ``w`` of ``n`` reads its own stream,
indexed by its own step count. With ``disjoint=True`` (the data-parallel setting of Downpour
and the parameter-server papers) worker ``w`` owns the contiguous shard
``[w·⌊N/n⌋, (w+1)·⌊N/n⌋)`` (the last ``N mod n`` examples are unused) and shuffles it each
epoch; with ``disjoint=False`` (the Hogwild! setting, every thread samples the whole set) each
worker permutes the full training set with its own permutation. With a single worker both
reduce to :func:`batch_indices` of the same key.

References:
  Niu, Recht, Ré & Wright, *Hogwild!: A Lock-Free Approach to Parallelizing Stochastic
  Gradient Descent*, NeurIPS 2011 (arXiv 1106.5730).
  Dean et al., *Large Scale Distributed Deep Networks* (Downpour SGD), NeurIPS 2012.
  Black & Rogaway, *Ciphers with Arbitrary Finite Domains* (cycle walking), CT-RSA 2002.
  Hardt, Recht & Singer, *Train faster, generalize better: Stability of stochastic gradient
  descent*, ICML 2016 (arXiv 1509.01240) — neighbouring datasets S, S′.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import operator
import os
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax._counter_rng import key_words
from asgd_jax._counter_rng import mix32 as _mix32
from asgd_jax._logging import quiet

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "OFFLINE_DATASETS",
    "Batch",
    "Dataset",
    "DatasetNotAvailableError",
    "batch_indices",
    "default_data_dir",
    "epoch_permutation",
    "get_batch",
    "is_available",
    "load",
    "neighbouring_pair",
    "prepare_bundled",
    "replace_example",
    "steps_per_epoch",
    "subset",
    "worker_batch_indices",
]

_logger = logging.getLogger(__name__)


class _Spec(NamedTuple):
    builder_name: str  # the tfds builder's registered name
    pixel_max: int  # largest pixel value stored on disk; images are divided by it
    bundled: bool  # ships with an installed package; built offline on first use


_SPECS: dict[str, _Spec] = {
    "digits": _Spec("sklearn_digits", 16, True),
    "mnist": _Spec("mnist", 255, False),
    "fashion_mnist": _Spec("fashion_mnist", 255, False),
    "cifar10": _Spec("cifar10", 255, False),
}

DATASETS: tuple[str, ...] = tuple(_SPECS)
"""Names :func:`load` accepts."""
OFFLINE_DATASETS: tuple[str, ...] = tuple(n for n, s in _SPECS.items() if s.bundled)
"""Datasets that need no preparation and work without network access."""
DEFAULT_DATASET = "digits"


class DatasetNotAvailableError(FileNotFoundError):
    """A dataset is not prepared under the data directory, and nothing will be downloaded."""


class Batch(NamedTuple):
    """A batch of examples: images ``x`` (float32, NHWC) and integer labels ``y`` (int32)."""

    x: jax.Array
    y: jax.Array


@dataclasses.dataclass(frozen=True, repr=False)
class Dataset:
    """An image-classification dataset held in memory.

    A pytree: the four arrays are leaves, ``num_classes``, ``name`` and ``input_shape`` are
    static metadata, so a ``Dataset`` can be passed to jitted functions.

    Attributes:
      x_train: ``float32[num_train, *input_shape]`` images in ``[0, 1]`` (NHWC).
      y_train: ``int32[num_train]`` labels in ``[0, num_classes)``.
      x_test: ``float32[num_test, *input_shape]``.
      y_test: ``int32[num_test]``.
      num_classes: number of classes.
      name: dataset name (as given to :func:`load`, plus any derivation such as a subset).
      input_shape: shape of one image, ``(height, width, channels)``.
    """

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    num_classes: int
    name: str
    input_shape: tuple[int, ...]

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, num_train={self.num_train}, num_test={self.num_test}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


jax.tree_util.register_dataclass(
    Dataset,
    data_fields=["x_train", "y_train", "x_test", "y_test"],
    meta_fields=["num_classes", "name", "input_shape"],
)


# --------------------------------------------------------------------------------------------
# Loading.


def default_data_dir() -> str:
    """The data directory when none is given: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _quiet_tfds():
    """Silences tfds's absl warnings about absent variant folders while we probe for data."""
    return quiet("absl", logging.ERROR)


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return _SPECS[name]


def _not_available_message(name: str, data_dir: str, reason: str) -> str:
    return (
        f"dataset {name!r} is not available offline: {reason}. Nothing is downloaded at run "
        f"time. To prepare it, on a machine with internet access run "
        f"`tfds build {name} --file_format=array_record --data_dir={data_dir}` (or in Python "
        f"`tfds.data_source({name!r}, data_dir={data_dir!r})`), then pass that directory as "
        f"data_dir or set TFDS_DATA_DIR to it. Offline, use the bundled dataset instead: "
        f"{DEFAULT_DATASET!r} (scikit-learn's 8x8 handwritten digits)."
    )


def prepare_bundled(name: str = DEFAULT_DATASET, data_dir: str | os.PathLike | None = None) -> str:
    """Builds a bundled dataset into ``data_dir`` unless it is already there; offline.

    Idempotent and quick (about two seconds for ``digits``); :func:`load` calls it.

    Args:
      name: a name in :data:`OFFLINE_DATASETS`.
      data_dir: the data directory (default :func:`default_data_dir`).

    Returns:
      The directory holding the prepared version, ``<data_dir>/<builder>/<version>``.
    """
    import tensorflow_datasets as tfds

    from asgd_jax.datasets import SklearnDigits

    if not _spec(name).bundled:
        raise ValueError(
            f"name must be one of the bundled datasets {OFFLINE_DATASETS}, got {name!r}"
        )
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    with _quiet_tfds():
        builder = SklearnDigits(data_dir=data_dir)
        prepared = builder.is_prepared()
    if not prepared:
        _logger.info("building the bundled dataset %r into %s", name, data_dir)
        tqdm_utils = tfds.core.utils.tqdm_utils
        bars_were_on = getattr(tqdm_utils, "_active", True)
        tfds.display_progress_bar(False)
        try:  # tfds prints build banners; keep stdout for the caller's own output
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare(file_format="array_record")
        finally:
            tfds.display_progress_bar(bars_were_on)
    return os.fspath(builder.data_dir)


def is_available(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether :func:`load` can read ``name`` without network access.

    Bundled datasets are always available (they are built on first use). Others must be
    prepared under ``data_dir``; this only looks at the local directory.
    """
    import tensorflow_datasets as tfds

    spec = _spec(name)
    if spec.bundled:
        return True
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    with _quiet_tfds():
        return bool(tfds.builder(spec.builder_name, data_dir=data_dir, try_gcs=False).is_prepared())


def _read_split(source: Any, pixel_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads every record of a tfds data source into (float32 images, int32 labels)."""
    num = len(source)
    images = np.empty((num, *np.shape(source[0]["image"])), np.float32)
    labels = np.empty((num,), np.int32)
    for index in range(num):  # record by record: the random-access API tfds documents
        record = source[index]
        images[index] = record["image"]
        labels[index] = record["label"]
    images /= np.float32(pixel_max)
    if images.ndim == 3:  # grayscale stored without a channel axis
        images = images[..., None]
    return images, labels


def load(
    name: str = DEFAULT_DATASET,
    *,
    data_dir: str | os.PathLike | None = None,
    train_size: int | None = None,
) -> Dataset:
    """Loads a dataset's train and test splits into memory through ``tfds.data_source``.

    Never downloads and never calls ``tfds.load``. A bundled dataset is built into the data
    directory on first use; any other must already be prepared there in ``array_record``
    format, else this raises at once (it checks the directory before reading).

    Args:
      name: one of :data:`DATASETS`; default ``'digits'`` (bundled, offline).
      data_dir: the TFDS data directory (default :func:`default_data_dir`).
      train_size: keep only the first ``train_size`` training examples (see :func:`subset`).

    Returns:
      A :class:`Dataset` with float32 NHWC images in ``[0, 1]`` and int32 labels.

    Raises:
      ValueError: unknown ``name`` or bad ``train_size``.
      DatasetNotAvailableError: ``name`` is not prepared (in ``array_record``) under
        ``data_dir``; the message says how to prepare it and which dataset works offline.
    """
    import tensorflow_datasets as tfds

    spec = _spec(name)
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    if spec.bundled:
        prepare_bundled(name, data_dir)
    else:
        with _quiet_tfds():
            builder = tfds.builder(spec.builder_name, data_dir=data_dir, try_gcs=False)
            prepared = builder.is_prepared()
        if not prepared:
            raise DatasetNotAvailableError(
                _not_available_message(name, data_dir, f"no prepared copy in {builder.data_dir}")
            )
    try:
        train_source, test_source = tfds.data_source(
            spec.builder_name,
            split=["train", "test"],
            data_dir=data_dir,
            download=False,
            try_gcs=False,
        )
    except NotImplementedError as error:  # prepared, but not in a random-access format
        raise DatasetNotAvailableError(
            _not_available_message(name, data_dir, "it is prepared, but not as array_record")
        ) from error
    num_classes = int(train_source.dataset_info.features["label"].num_classes)
    x_train, y_train = _read_split(train_source, spec.pixel_max)
    x_test, y_test = _read_split(test_source, spec.pixel_max)
    dataset = Dataset(
        x_train=jnp.asarray(x_train),
        y_train=jnp.asarray(y_train),
        x_test=jnp.asarray(x_test),
        y_test=jnp.asarray(y_test),
        num_classes=num_classes,
        name=name,
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
    )
    return dataset if train_size is None else subset(dataset, train_size)


# --------------------------------------------------------------------------------------------
# Deriving datasets: subsets and neighbouring pairs.


def _check_index(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as a Python int in ``[low, high)``, else TypeError / ValueError."""
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return value


def subset(dataset: Dataset, train_size: int, *, key: chex.PRNGKey | None = None) -> Dataset:
    """The dataset with ``train_size`` of its training examples (the test split is kept).

    Args:
      dataset: the full dataset.
      train_size: number of training examples to keep, in ``[1, num_train]``.
      key: if ``None``, keep the first ``train_size`` examples (for ``digits`` these are
        class-balanced); else keep those at the first ``train_size`` positions of
        :func:`epoch_permutation` ``(key, num_train, 0)``.

    Returns:
      A :class:`Dataset` named ``'<name>[:train_size]'``.
    """
    train_size = _check_index("train_size", train_size, 1, dataset.num_train + 1)
    if key is None:
        indices = jnp.arange(train_size)
    else:
        indices = epoch_permutation(key, dataset.num_train, 0)[:train_size]
    return dataclasses.replace(
        dataset,
        x_train=dataset.x_train[indices],
        y_train=dataset.y_train[indices],
        name=f"{dataset.name}[:{train_size}]",
    )


def replace_example(dataset: Dataset, index: int, x: jax.Array, y: int | jax.Array) -> Dataset:
    """The dataset with training example ``index`` replaced by ``(x, y)``."""
    index = _check_index("index", index, 0, dataset.num_train)
    x = jnp.asarray(x, dtype=dataset.x_train.dtype)
    if x.shape != dataset.x_train.shape[1:]:
        raise ValueError(f"x must have shape {dataset.x_train.shape[1:]}, got {x.shape}")
    y = jnp.asarray(y, dtype=dataset.y_train.dtype)
    return dataclasses.replace(
        dataset,
        x_train=dataset.x_train.at[index].set(x),
        y_train=dataset.y_train.at[index].set(y),
        name=f"{dataset.name}[{index}<-replaced]",
    )


def neighbouring_pair(
    dataset: Dataset, index: int = 0, *, train_size: int | None = None
) -> tuple[Dataset, Dataset]:
    """Two training sets S and S′ that differ in exactly one example, for stability studies.

    S is the first ``train_size`` training examples; S′ equals S except that example
    ``index`` is replaced by training example ``train_size``, an example from the same
    distribution that S does not contain (the uniform-stability setting of Hardt et al.
    2016). Both keep the full test split.

    Args:
      dataset: the full dataset.
      index: position in S of the example that differs, in ``[0, train_size)``.
      train_size: size of S and S′, in ``[1, num_train)``; default ``num_train - 1``.

    Returns:
      ``(S, S′)``.

    References:
      Hardt, Recht & Singer, ICML 2016 (arXiv 1509.01240); Regatti et al., Allerton 2019
      (arXiv 1909.13391).
    """
    if train_size is None:
        train_size = dataset.num_train - 1
    train_size = _check_index("train_size", train_size, 1, dataset.num_train)
    index = _check_index("index", index, 0, train_size)
    first = subset(dataset, train_size)
    second = replace_example(first, index, dataset.x_train[train_size], dataset.y_train[train_size])
    return first, second


# --------------------------------------------------------------------------------------------
# Deterministic batching from a key.


_FEISTEL_ROUNDS = 8


@functools.partial(jax.jit, static_argnames="size")
def _permute(
    key: chex.PRNGKey, epoch: jax.Array, stream: jax.Array, position: jax.Array, size: int
) -> jax.Array:
    """π(position) for a pseudorandom permutation π of ``[0, size)`` keyed by (key, epoch, stream).

    A balanced Feistel network on ``[0, 4^h)`` (``4^h`` the least power of four ≥ ``size``,
    so under four times ``size``) is a bijection; cycle walking (apply it again while the
    value is ``≥ size``) restricts it to a bijection of ``[0, size)``. Expected walks per
    index: under four.
    """
    seed = key_words(key)
    half_bits = max(1, ((size - 1).bit_length() + 1) // 2)
    mask = jnp.uint32((1 << half_bits) - 1)
    epoch = jnp.asarray(epoch).astype(jnp.uint32)
    stream = jnp.asarray(stream).astype(jnp.uint32)
    base = _mix32(seed[0] ^ _mix32(epoch * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15)))
    base = _mix32(base ^ seed[1] ^ _mix32(stream * jnp.uint32(0x85EBCA6B) + jnp.uint32(0x632BE5AB)))
    round_keys = [
        _mix32(base + jnp.uint32((r + 1) * 0x9E3779B9 & 0xFFFFFFFF)) for r in range(_FEISTEL_ROUNDS)
    ]

    def feistel(x: jax.Array) -> jax.Array:
        left, right = x >> half_bits, x & mask
        for round_key in round_keys:
            left, right = right, left ^ (_mix32(right ^ round_key) & mask)
        return (left << half_bits) | right

    def walk(x: jax.Array) -> jax.Array:
        return jnp.where(x >= size, feistel(x), x)

    start = feistel(jnp.asarray(position).astype(jnp.uint32))
    out = jax.lax.while_loop(lambda x: jnp.any(x >= size), walk, start)
    return out.astype(jnp.int32)


def _check_sizes(num_examples: Any, batch_size: Any) -> tuple[int, int]:
    num_examples = _check_index("num_examples", num_examples, 1, 2**31)
    batch_size = _check_index("batch_size", batch_size, 1, num_examples + 1)
    return num_examples, batch_size


def _check_step(step: Any) -> None:
    if isinstance(step, int | np.integer) and step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch, ``num_examples // batch_size`` (the remainder is skipped)."""
    num_examples, batch_size = _check_sizes(num_examples, batch_size)
    return num_examples // batch_size


def epoch_permutation(key: chex.PRNGKey, num_examples: int, epoch: int | jax.Array) -> jax.Array:
    """The order in which epoch ``epoch`` visits ``[0, num_examples)``: an int32 permutation.

    A pure function of ``(key, epoch)``, traceable (``epoch`` may be a tracer); the same order
    :func:`batch_indices` walks through.
    """
    num_examples = _check_index("num_examples", num_examples, 1, 2**31)
    positions = jnp.arange(num_examples, dtype=jnp.uint32)
    return _permute(key, epoch, 0, positions, num_examples)


@functools.partial(jax.jit, static_argnames=("size", "batch_size"))
def _stream_indices(
    key: chex.PRNGKey, size: int, batch_size: int, step: Any, stream: Any
) -> jax.Array:
    per_epoch = size // batch_size
    step = jnp.asarray(step, dtype=jnp.int32)
    epoch = step // per_epoch
    positions = (step % per_epoch) * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
    return _permute(key, epoch, stream, positions, size)


def batch_indices(
    key: chex.PRNGKey, num_examples: int, batch_size: int, step: int | jax.Array
) -> jax.Array:
    """Indices of the training examples in the batch of step ``step``.

    Epoch ``e = step // steps_per_epoch`` visits the examples in the order
    :func:`epoch_permutation` ``(key, num_examples, e)``; step ``step`` takes the next
    ``batch_size`` of them. Within an epoch no index repeats. Pure in ``(key, step)``:
    usable inside ``jit``, ``lax.scan`` (``step`` traced) and ``vmap`` (over keys or steps).

    Args:
      key: a PRNG key (typed or raw); the stream's seed.
      num_examples: size ``N`` of the training set (static).
      batch_size: examples per batch, in ``[1, N]`` (static).
      step: the step ``t ≥ 0``; a Python int or an int32 scalar (traced is fine).

    Returns:
      ``int32[batch_size]`` indices in ``[0, N)``.
    """
    num_examples, batch_size = _check_sizes(num_examples, batch_size)
    _check_step(step)
    return _stream_indices(key, num_examples, batch_size, step, 0)


def worker_batch_indices(
    key: chex.PRNGKey,
    num_examples: int,
    batch_size: int,
    step: int | jax.Array,
    worker: int | jax.Array,
    num_workers: int,
    *,
    disjoint: bool = True,
) -> jax.Array:
    """Indices of worker ``worker``'s batch number ``step`` in its own data stream.

    With ``disjoint=True`` the workers own disjoint contiguous shards of ``⌊N/n⌋`` examples
    (shard ``w`` is ``[w·⌊N/n⌋, (w+1)·⌊N/n⌋)``; the last ``N mod n`` examples go unused) and
    each walks its shard like :func:`batch_indices`, with its own permutation per epoch.
    With ``disjoint=False`` every worker walks the whole set with its own permutations.
    For one worker both equal :func:`batch_indices` ``(key, N, batch_size, step)``.

    Args:
      key: the run's PRNG key, shared by all workers (the worker index separates streams).
      num_examples: size ``N`` of the training set (static).
      batch_size: examples per batch (static); at most the shard size when ``disjoint``.
      step: the worker's own step count (how many batches it has read before); may be traced.
      worker: the worker ``w`` in ``[0, num_workers)``; may be traced (e.g. the worker that the
        timing simulation says finishes next). Traced values are not range-checked.
      num_workers: the number of workers ``n`` (static).
      disjoint: shard the data (True) or give each worker the full set (False).

    Returns:
      ``int32[batch_size]`` indices into the full training set.
    """
    num_examples = _check_index("num_examples", num_examples, 1, 2**31)
    num_workers = _check_index("num_workers", num_workers, 1, num_examples + 1)
    if isinstance(worker, int | np.integer):
        worker = _check_index("worker", worker, 0, num_workers)
    _check_step(step)
    if not disjoint:
        num_examples, batch_size = _check_sizes(num_examples, batch_size)
        return _stream_indices(key, num_examples, batch_size, step, worker)
    shard_size = num_examples // num_workers
    if not 1 <= operator.index(batch_size) <= shard_size:
        raise ValueError(
            f"batch_size must be in [1, {shard_size}] (the shard size N // num_workers = "
            f"{num_examples} // {num_workers}) with disjoint shards, got {batch_size}"
        )
    local = _stream_indices(key, shard_size, batch_size, step, worker)
    return local + jnp.asarray(worker, dtype=jnp.int32) * shard_size


def get_batch(dataset: Dataset, indices: jax.Array) -> Batch:
    """The training examples at ``indices`` as a :class:`Batch` (a gather; jit-friendly).

    Inside a jitted loop, pass the :class:`Dataset` in as an argument (it is a pytree) rather
    than closing over it: a closed-over array becomes a constant baked into the compiled
    program, which for MNIST-sized data makes compilation slow and memory-hungry.
    """
    return Batch(x=dataset.x_train[indices], y=dataset.y_train[indices])
