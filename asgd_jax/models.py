"""Small Flax classifiers with plain-pytree parameters, for the experiments and examples.

Each constructor returns a :class:`Model`: ``init(key, input_shape) -> params`` and
``apply(params, x) -> logits`` are pure functions whose ``params`` are a plain nested ``dict``
of ``float32`` arrays (the ``'params'`` collection of a ``flax.linen`` module), so they feed
straight into optax, :func:`asgd_jax.stale_params`, orbax and ``jax.vmap`` over seeds. None of
the models carries state or randomness at apply time (no dropout, no batch norm), so a loss is a
pure function of ``(params, batch)``::

    model = models.get_model("mlp", hidden_sizes=(64,))
    params = model.init(jax.random.key(0), dataset.input_shape)
    grads = jax.grad(model.loss)(asgd.stale_params(state, params), batch)  # batch = (x, y)

Models:

* :func:`logistic_regression`: one dense layer on the flattened image.
* :func:`mlp`: dense layers of configurable widths with a nonlinearity, then the classifier.
* :func:`cnn`: the convolutional network of the classic Hogwild MNIST example (PyTorch's
  ``examples/mnist_hogwild``): conv 10@5×5 → max-pool 2 → ReLU → conv 20@5×5 → max-pool 2 →
  ReLU → dense 50 → ReLU → dense ``num_classes``, without its dropout layers; the pooling is
  :func:`max_pool_2x2`, whose gradient splits ties (see there). On 28×28 inputs
  with ``'VALID'`` convolutions the flattened features are 4·4·20 = 320, as in the original.
  Inputs smaller than 16×16 (the 8×8 ``digits``) cannot survive two unpadded 5×5 convolutions,
  so ``padding='auto'`` switches to ``'SAME'`` there: 8×8 → 8×8 → 4×4 → 4×4 → 2×2, 80 features.

References:
  Niu, Recht, Ré & Wright, *Hogwild!*, NeurIPS 2011 (arXiv 1106.5730); the CNN follows the
  PyTorch example ``pytorch/examples/mnist_hogwild``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from asgd_jax._validation import check_min_int

__all__ = [
    "MODELS",
    "Model",
    "accuracy",
    "cnn",
    "get_model",
    "logistic_regression",
    "loss_fn",
    "max_pool_2x2",
    "mlp",
    "num_params",
]

Params = Any  # a nested dict of arrays

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "gelu": nn.gelu,
    "sigmoid": nn.sigmoid,
}
_PADDINGS = ("auto", "SAME", "VALID")
_MIN_VALID_SIZE = 16  # smallest side that two unpadded 5×5 convs with 2×2 pools leave ≥ 1


# --------------------------------------------------------------------------------------------
# Losses and metrics.


def loss_fn(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``logits[B, C]`` against integer ``labels[B]``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of rows of ``logits[B, C]`` whose argmax equals ``labels[B]`` (float32)."""
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def num_params(params: Params) -> int:
    """Total number of scalars in a parameter pytree."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------------------------
# The model wrapper.


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params(module: nn.Module, key: chex.PRNGKey, input_shape: tuple[int, ...]) -> Params:
    # Jitted (the module and shape are static, hashable) so that repeated inits compile once.
    variables = module.init(key, jnp.zeros((1, *input_shape), jnp.float32))
    return flax.core.unfreeze(variables["params"])


@dataclasses.dataclass(frozen=True)
class Model:
    """A classifier as a pair of pure functions over a plain-dict parameter pytree.

    Attributes:
      name: a short description, e.g. ``'mlp(64,)'``.
      module: the ``flax.linen`` module; maps ``float32[B, *input_shape]`` to logits.
      num_classes: number of output logits.
    """

    name: str
    module: nn.Module
    num_classes: int

    def init(self, key: chex.PRNGKey, input_shape: Sequence[int]) -> Params:
        """Initial parameters for inputs of shape ``input_shape`` (one example, e.g. ``(8, 8, 1)``).

        Pure in ``key``; can be ``jax.vmap``-ed over keys (keep ``input_shape`` static).
        """
        return _init_params(self.module, key, _input_shape(input_shape))

    def apply(self, params: Params, x: jax.Array) -> jax.Array:
        """Logits ``float32[B, num_classes]`` for a batch ``x[B, *input_shape]``."""
        return self.module.apply({"params": params}, x)

    def loss(self, params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """Mean cross-entropy on ``batch = (x, y)`` (e.g. a :class:`asgd_jax.data.Batch`)."""
        x, y = batch
        return loss_fn(self.apply(params, x), y)

    def accuracy(self, params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """Accuracy on ``batch = (x, y)``."""
        x, y = batch
        return accuracy(self.apply(params, x), y)

    def evaluate(
        self, params: Params, x: jax.Array, y: jax.Array, *, batch_size: int | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Mean loss and accuracy over a whole split, optionally in chunks to bound memory.

        Args:
          params: the parameters.
          x: inputs ``[N, *input_shape]``.
          y: integer labels ``[N]``.
          batch_size: evaluate ``batch_size`` examples at a time (``lax.map`` over zero-padded
            chunks, padding masked out); ``None`` evaluates all at once.

        Returns:
          ``(loss, accuracy)``, float32 scalars averaged over the ``N`` examples.
        """
        num = x.shape[0]
        if batch_size is None or batch_size >= num:
            logits = self.apply(params, x)
            return loss_fn(logits, y), accuracy(logits, y)
        batch_size = check_min_int("batch_size", batch_size, 1)
        num_chunks = -(-num // batch_size)
        pad = num_chunks * batch_size - num
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        y = jnp.pad(y, (0, pad))
        mask = jnp.arange(num_chunks * batch_size) < num

        def chunk_sums(chunk: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
            xc, yc, mc = chunk
            logits = self.apply(params, xc)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, yc)
            hits = (jnp.argmax(logits, axis=-1) == yc).astype(jnp.float32)
            return jnp.stack([jnp.sum(losses * mc), jnp.sum(hits * mc)])

        def chunked(a: jax.Array) -> jax.Array:
            return a.reshape(num_chunks, batch_size, *a.shape[1:])

        sums = jax.lax.map(chunk_sums, (chunked(x), chunked(y), chunked(mask))).sum(axis=0)
        return sums[0] / num, sums[1] / num


# --------------------------------------------------------------------------------------------
# Flax modules.


class _MLP(nn.Module):
    """Flatten, then dense layers of ``hidden_sizes`` with ``activation``, then the classifier."""

    hidden_sizes: tuple[int, ...]
    num_classes: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.reshape(x, (x.shape[0], -1))
        for layer, width in enumerate(self.hidden_sizes):
            x = _ACTIVATIONS[self.activation](nn.Dense(width, name=f"hidden_{layer}")(x))
        return nn.Dense(self.num_classes, name="logits")(x)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2×2 max-pooling with stride 2 of NHWC images, as a reshape and a max.

    The same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))`` (``'VALID'``: an odd last
    row or column is dropped), computed as a max over the window axes of a reshape. The
    reason is the gradient: ``reduce_window``'s lowers to ``select_and_scatter``, which
    XLA:CPU runs as a serial scatter (measured 141 ms against 26 ms per step on a
    LeNet-sized CNN), while a reduction's gradient is an elementwise mask.

    The gradients differ only on ties: where several elements of a window share the
    maximum, this splits the window's gradient equally among them, where ``reduce_window``
    gives all of it to one. Without ties they are equal.

    Args:
      x: ``[batch, height, width, channels]``, with height and width at least 2.

    Returns:
      ``[batch, height // 2, width // 2, channels]``.
    """
    batch, height, width, channels = x.shape
    rows, cols = height // 2, width // 2
    windows = x[:, : 2 * rows, : 2 * cols].reshape(batch, rows, 2, cols, 2, channels)
    return jnp.max(windows, axis=(2, 4))


class _HogwildCNN(nn.Module):
    """The Hogwild MNIST example's CNN (see the module docstring), without dropout."""

    num_classes: int
    channels: tuple[int, int] = (10, 20)
    hidden_size: int = 50
    padding: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"cnn expects images [batch, height, width, channels], got {x.shape}")
        padding = self.padding
        if padding == "auto":
            padding = "VALID" if min(x.shape[1:3]) >= _MIN_VALID_SIZE else "SAME"
        for layer, features in enumerate(self.channels):
            x = nn.Conv(features, (5, 5), padding=padding, name=f"conv_{layer}")(x)
            if min(x.shape[1:3]) < 2:
                raise ValueError(
                    f"cnn input is too small for padding={padding!r} (feature map {x.shape[1:3]}"
                    " before pooling); use padding='SAME' or 'auto'"
                )
            x = nn.relu(max_pool_2x2(x))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden_size, name="hidden")(x))
        return nn.Dense(self.num_classes, name="logits")(x)


# --------------------------------------------------------------------------------------------
# Constructors.


def _positive_ints(name: str, values: Any) -> tuple[int, ...]:
    """``values`` as a tuple of ints ``>= 1``; a sequence, not a bare int or a string."""
    if isinstance(values, int | str) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
    return tuple(check_min_int(f"{name}[{i}]", v, 1) for i, v in enumerate(values))


def _input_shape(input_shape: Any) -> tuple[int, ...]:
    """One example's shape: at least one dimension, each ``>= 1``."""
    shape = _positive_ints("input_shape", input_shape)
    if not shape:
        raise ValueError("input_shape must have at least one dimension, got ()")
    return shape


def logistic_regression(num_classes: int = 10) -> Model:
    """Multinomial logistic regression: one dense layer on the flattened input.

    Args:
      num_classes: number of classes, ``>= 2``.

    Returns:
      A :class:`Model` with parameters ``{'logits': {'kernel', 'bias'}}``.
    """
    num_classes = check_min_int("num_classes", num_classes, 2)
    return Model("logistic_regression", _MLP((), num_classes), num_classes)


def mlp(
    hidden_sizes: Sequence[int] = (256,), num_classes: int = 10, activation: str = "relu"
) -> Model:
    """A multilayer perceptron on the flattened input.

    Args:
      hidden_sizes: widths of the hidden layers, each ``>= 1``; at least one layer
        (:func:`logistic_regression` is the model with none).
      num_classes: number of classes, ``>= 2``.
      activation: one of ``'relu'``, ``'tanh'``, ``'gelu'``, ``'sigmoid'``.

    Returns:
      A :class:`Model` with parameters ``{'hidden_0', …, 'logits'}``, each ``{'kernel', 'bias'}``.
    """
    hidden_sizes = _positive_ints("hidden_sizes", hidden_sizes)
    if not hidden_sizes:
        raise ValueError("hidden_sizes must name at least one layer; use logistic_regression")
    num_classes = check_min_int("num_classes", num_classes, 2)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    name = f"mlp({','.join(map(str, hidden_sizes))})"
    return Model(name, _MLP(hidden_sizes, num_classes, activation), num_classes)


def cnn(
    num_classes: int = 10,
    channels: Sequence[int] = (10, 20),
    hidden_size: int = 50,
    padding: str = "auto",
) -> Model:
    """The small CNN of the classic Hogwild MNIST example, without dropout.

    conv ``channels[0]``@5×5 → max-pool 2 → ReLU → conv ``channels[1]``@5×5 → max-pool 2 → ReLU
    → dense ``hidden_size`` → ReLU → dense ``num_classes``. Inputs are NHWC images. Pooling is
    :func:`max_pool_2x2`: the same forward values as ``reduce_window`` max-pooling, a gradient
    several times faster on XLA:CPU, and on tied maxima a gradient split among the tied
    elements (``reduce_window`` gives it to one of them).

    Args:
      num_classes: number of classes, ``>= 2``.
      channels: output channels of the two convolutions (default 10, 20), each ``>= 1``.
      hidden_size: width of the hidden dense layer (default 50), ``>= 1``.
      padding: ``'VALID'`` (the original; needs images at least 16×16), ``'SAME'``, or
        ``'auto'`` (``'VALID'`` from 16×16 up, else ``'SAME'``, e.g. for 8×8 ``digits``).

    Returns:
      A :class:`Model` with parameters ``{'conv_0', 'conv_1', 'hidden', 'logits'}``.

    References:
      Niu et al., *Hogwild!*, NeurIPS 2011 (arXiv 1106.5730); pytorch/examples mnist_hogwild.
    """
    num_classes = check_min_int("num_classes", num_classes, 2)
    channels = _positive_ints("channels", channels)
    if len(channels) != 2:
        raise ValueError(f"channels must have two entries (one per convolution), got {channels}")
    hidden_size = check_min_int("hidden_size", hidden_size, 1)
    if padding not in _PADDINGS:
        raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
    module = _HogwildCNN(num_classes, channels, hidden_size, padding)
    return Model(f"cnn({channels[0]},{channels[1]},{hidden_size})", module, num_classes)


_REGISTRY: dict[str, Callable[..., Model]] = {
    "logreg": logistic_regression,
    "mlp": mlp,
    "cnn": cnn,
}
_ALIASES = {"logistic_regression": "logreg", "hogwild_cnn": "cnn"}

MODELS: tuple[str, ...] = tuple(_REGISTRY)
"""Names :func:`get_model` accepts (plus aliases ``logistic_regression`` and ``hogwild_cnn``)."""


def get_model(name: str, **kwargs: Any) -> Model:
    """Builds a model by name, for configuration files and the command line.

    Args:
      name: one of :data:`MODELS` (``'logreg'``, ``'mlp'``, ``'cnn'``) or an alias.
      **kwargs: passed to the constructor (e.g. ``hidden_sizes``, ``num_classes``).

    Returns:
      The :class:`Model`.

    Raises:
      ValueError: unknown name or bad argument values; TypeError: unknown keyword arguments.
    """
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    try:
        return _REGISTRY[key](**kwargs)
    except TypeError as error:
        if "unexpected keyword argument" in str(error):
            raise TypeError(f"model {key!r} got an unknown argument: {error}") from None
        raise
