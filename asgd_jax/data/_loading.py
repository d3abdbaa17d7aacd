"""Loading: every dataset through ``tfds.data_source``, offline, into a :class:`Dataset`.

``tfds.data_source`` reads ``array_record`` files with random access and needs no TensorFlow.
The bundled ``digits`` (scikit-learn's 8×8 handwritten digits, the TFDS builder
:class:`asgd_jax.datasets.SklearnDigits`) is built into the data directory on first use; any
other dataset must already be prepared there, else :func:`load` fails at once with
:class:`DatasetNotAvailableError` (``tfds.load`` is never called: offline it retries for
minutes before failing). Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from asgd_jax._logging import quiet
from asgd_jax.data._dataset import Dataset, subset

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

    from asgd_jax.datasets import SklearnDigits

    if not _spec(name).bundled:
        raise ValueError(
            f"name must be one of the bundled datasets {OFFLINE_DATASETS}, got {name!r}"
        )
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    with _quiet_tfds():
        builder = SklearnDigits(data_dir=data_dir)
        prepared = builder.is_prepared()
    if prepared:
        return os.fspath(builder.data_dir)
    # Several processes (test workers, worker actors) may load it at once: one builds it.
    with _build_lock(data_dir, builder.name):
        with _quiet_tfds():
            builder = SklearnDigits(data_dir=data_dir)
            prepared = builder.is_prepared()
        if not prepared:
            _build(name, data_dir, builder)
    return os.fspath(builder.data_dir)


@contextlib.contextmanager
def _build_lock(data_dir: str, builder_name: str):
    """An exclusive lock file beside the dataset while it is built (POSIX; else no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: builds in parallel processes may race
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{builder_name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(name: str, data_dir: str, builder: Any) -> None:
    """Builds the bundled dataset quietly (tfds prints banners and progress bars)."""
    import tensorflow_datasets as tfds

    _logger.info("building the bundled dataset %r into %s", name, data_dir)
    tqdm_utils = tfds.core.utils.tqdm_utils
    bars_were_on = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:  # tfds prints build banners; keep stdout for the caller's own output
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(file_format="array_record")
    finally:
        tfds.display_progress_bar(bars_were_on)


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
