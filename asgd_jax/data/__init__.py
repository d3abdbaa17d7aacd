"""Datasets and deterministic, key-driven batching for the training loops.

Loading (:func:`load`). Every dataset goes through ``tfds.data_source`` (``array_record``
files, random access, no TensorFlow) and lands in memory as a :class:`Dataset` of
``jax.Array``\\ s: images ``float32`` in ``[0, 1]`` laid out NHWC, labels ``int32``.

* ``digits`` (the default) is real data that works offline: scikit-learn's 8×8 handwritten
  digits (1,440 train / 357 test, split fixed by position), exposed as the TFDS builder
  :class:`asgd_jax.datasets.SklearnDigits` and built into the data directory on first use
  (about two seconds, once).
* ``mnist``, ``fashion_mnist`` and ``cifar10`` are read when they are already prepared in
  ``array_record`` format under the data directory. Nothing is ever downloaded: when a dataset
  is missing, :func:`load` fails at once with :class:`DatasetNotAvailableError`, whose message
  says how to prepare it and which offline dataset to use instead.

The data directory is the ``data_dir`` argument, else ``$TFDS_DATA_DIR``, else
``~/tensorflow_datasets`` (tfds's own default).

Derived datasets: :func:`subset`, :func:`replace_example`, :func:`neighbouring_pair` (the
S, S′ of uniform-stability studies).

Batching. The batch of step ``t`` is a pure function of ``(key, t)`` that can sit inside
``jit``/``lax.scan``/``vmap``: :func:`batch_indices` walks a keyed pseudorandom permutation
per epoch (:func:`epoch_permutation`); :func:`worker_batch_indices` gives each worker its own
stream over a disjoint shard or the whole set; :func:`worker_sample_indices` and
:func:`worker_batch` sample each worker's batches with replacement (the Hogwild! setting).

References:
  Niu, Recht, Ré & Wright, *Hogwild!: A Lock-Free Approach to Parallelizing Stochastic
  Gradient Descent*, NeurIPS 2011 (arXiv 1106.5730).
  Dean et al., *Large Scale Distributed Deep Networks* (Downpour SGD), NeurIPS 2012.
  Black & Rogaway, *Ciphers with Arbitrary Finite Domains* (cycle walking), CT-RSA 2002.
  Hardt, Recht & Singer, *Train faster, generalize better: Stability of stochastic gradient
  descent*, ICML 2016 (arXiv 1509.01240) — neighbouring datasets S, S′.
"""

from asgd_jax.data._batching import (
    Batch,
    batch_indices,
    epoch_permutation,
    get_batch,
    steps_per_epoch,
    worker_batch,
    worker_batch_indices,
    worker_sample_indices,
)
from asgd_jax.data._dataset import (
    Dataset,
    neighbouring_pair,
    replace_example,
    subset,
)
from asgd_jax.data._loading import (
    DATASETS,
    DEFAULT_DATASET,
    OFFLINE_DATASETS,
    DatasetNotAvailableError,
    default_data_dir,
    is_available,
    load,
    prepare_bundled,
)

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
    "worker_batch",
    "worker_batch_indices",
    "worker_sample_indices",
]
