"""The in-memory :class:`Dataset` pytree and the datasets derived from one.

Derivations (a subset, one example replaced, a neighbouring pair S, S′) return new
:class:`Dataset`\\ s and never touch the one they come from; the name records the derivation.

References:
  Hardt, Recht & Singer, *Train faster, generalize better: Stability of stochastic gradient
  descent*, ICML 2016 (arXiv 1509.01240) — neighbouring datasets S, S′.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp

from asgd_jax._validation import check_index
from asgd_jax.data._batching import epoch_permutation


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
    train_size = check_index("train_size", train_size, 1, dataset.num_train + 1)
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
    """The dataset with training example ``index`` replaced by ``(x, y)``.

    Args:
      dataset: the dataset.
      index: the training example to replace, in ``[0, num_train)``.
      x: the new image, of shape ``input_shape`` (cast to the images' dtype).
      y: the new label.

    Returns:
      A :class:`Dataset` named ``'<name>[<index><-replaced]'``.
    """
    index = check_index("index", index, 0, dataset.num_train)
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
    train_size = check_index("train_size", train_size, 1, dataset.num_train)
    index = check_index("index", index, 0, train_size)
    first = subset(dataset, train_size)
    second = replace_example(first, index, dataset.x_train[train_size], dataset.y_train[train_size])
    return first, second
