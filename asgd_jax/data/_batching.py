"""All batching: which training examples each step (or each worker's step) reads.

The batch of step ``t`` is a pure function of ``(key, t)``, computed in a handful of integer
operations per index so that it can sit inside ``jit``/``lax.scan``/``vmap``: epoch
``e = t // steps_per_epoch`` visits the training set in the order of a pseudorandom
permutation ``π_e`` (a keyed Feistel network on the next power of four, cycle-walked into
``[0, N)``, so no ``O(N log N)`` shuffle per step), and step ``t`` takes the
``t mod steps_per_epoch``-th block of ``batch_size`` entries of ``π_e``. The last
``N mod batch_size`` entries of each epoch's order are skipped; they differ from epoch to epoch.

Per-worker streams, without replacement (:func:`worker_batch_indices`): worker ``w`` of ``n``
reads its own stream, indexed by its own step count. With ``disjoint=True`` (Downpour and the
parameter-server papers) worker ``w`` owns the contiguous shard ``[w·⌊N/n⌋, (w+1)·⌊N/n⌋)``
and shuffles it each epoch; with ``disjoint=False`` each worker permutes the full training set
with its own permutation. With a single worker both reduce to :func:`batch_indices`.

Per-worker streams, with replacement (:func:`worker_sample_indices`, :func:`worker_batch`):
the Hogwild! setting, where every thread samples the whole set independently. Index ``i`` of
worker ``w``'s ``s``-th batch is ``⌊N·u⌋`` for ``u`` the counter hash of
``(key folded with w, s·batch_size + i)``, so any batch of a run can be regenerated.

References:
  Niu, Recht, Ré & Wright, *Hogwild!: A Lock-Free Approach to Parallelizing Stochastic
  Gradient Descent*, NeurIPS 2011 (arXiv 1106.5730).
  Dean et al., *Large Scale Distributed Deep Networks* (Downpour SGD), NeurIPS 2012.
  Black & Rogaway, *Ciphers with Arbitrary Finite Domains* (cycle walking), CT-RSA 2002.
"""

from __future__ import annotations

import functools
import numbers
from typing import TYPE_CHECKING, Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax._counter_rng import key_words, mix32, uniform01
from asgd_jax._validation import check_index, check_min_int

if TYPE_CHECKING:
    from asgd_jax.data._dataset import Dataset

_FEISTEL_ROUNDS = 8
_MAX_EXAMPLES = 2**31  # indices are int32


class Batch(NamedTuple):
    """A batch of examples: images ``x`` (float32, NHWC) and integer labels ``y`` (int32)."""

    x: jax.Array
    y: jax.Array


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
    base = mix32(seed[0] ^ mix32(epoch * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15)))
    base = mix32(base ^ seed[1] ^ mix32(stream * jnp.uint32(0x85EBCA6B) + jnp.uint32(0x632BE5AB)))
    round_keys = [
        mix32(base + jnp.uint32((r + 1) * 0x9E3779B9 & 0xFFFFFFFF)) for r in range(_FEISTEL_ROUNDS)
    ]

    def feistel(x: jax.Array) -> jax.Array:
        left, right = x >> half_bits, x & mask
        for round_key in round_keys:
            left, right = right, left ^ (mix32(right ^ round_key) & mask)
        return (left << half_bits) | right

    def walk(x: jax.Array) -> jax.Array:
        return jnp.where(x >= size, feistel(x), x)

    start = feistel(jnp.asarray(position).astype(jnp.uint32))
    out = jax.lax.while_loop(lambda x: jnp.any(x >= size), walk, start)
    return out.astype(jnp.int32)


def _sizes(num_examples: Any, batch_size: Any) -> tuple[int, int]:
    """``(N, batch_size)`` as ints with ``1 ≤ batch_size ≤ N < 2^31``."""
    num_examples = check_index("num_examples", num_examples, 1, _MAX_EXAMPLES)
    batch_size = check_index("batch_size", batch_size, 1, num_examples + 1)
    return num_examples, batch_size


def _concrete_step(step: Any) -> None:
    """A step given as a Python/NumPy integer must be ``≥ 0``; traced steps pass unchecked."""
    if isinstance(step, int | np.integer):
        check_min_int("step", step, 0)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch, ``num_examples // batch_size`` (the remainder is skipped)."""
    num_examples, batch_size = _sizes(num_examples, batch_size)
    return num_examples // batch_size


def epoch_permutation(key: chex.PRNGKey, num_examples: int, epoch: int | jax.Array) -> jax.Array:
    """The order in which epoch ``epoch`` visits ``[0, num_examples)``: an int32 permutation.

    A pure function of ``(key, epoch)``, traceable (``epoch`` may be a tracer); the same order
    :func:`batch_indices` walks through.
    """
    num_examples = check_index("num_examples", num_examples, 1, _MAX_EXAMPLES)
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
    num_examples, batch_size = _sizes(num_examples, batch_size)
    _concrete_step(step)
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

    References:
      Dean et al., *Large Scale Distributed Deep Networks*, NeurIPS 2012.
    """
    num_examples = check_index("num_examples", num_examples, 1, _MAX_EXAMPLES)
    num_workers = check_index("num_workers", num_workers, 1, num_examples + 1)
    if isinstance(worker, int | np.integer):
        worker = check_index("worker", worker, 0, num_workers)
    _concrete_step(step)
    if not disjoint:
        num_examples, batch_size = _sizes(num_examples, batch_size)
        return _stream_indices(key, num_examples, batch_size, step, worker)
    shard_size = num_examples // num_workers
    if not 1 <= check_min_int("batch_size", batch_size, 1) <= shard_size:
        raise ValueError(
            f"batch_size must be in [1, {shard_size}] (the shard size N // num_workers = "
            f"{num_examples} // {num_workers}) with disjoint shards, got {batch_size}"
        )
    local = _stream_indices(key, shard_size, batch_size, step, worker)
    return local + jnp.asarray(worker, dtype=jnp.int32) * shard_size


def worker_sample_indices(
    key: int | chex.PRNGKey,
    num_examples: int,
    batch_size: int,
    step: int | jax.Array,
    worker: int | jax.Array,
) -> jax.Array:
    """Indices of worker ``worker``'s ``step``-th batch, sampled with replacement (Hogwild!).

    Each worker has its own stream (``key`` folded with the worker id); index ``i`` is
    ``min(⌊N·u_i⌋, N − 1)`` with ``u_i`` the counter hash of (stream, ``step·batch_size + i``),
    so a batch is a pure function of ``(key, worker, step)`` and any batch of a run can be
    regenerated. Traceable in ``key``, ``worker`` and ``step``.

    Args:
      key: the run's PRNG key, or an int seed (made into ``jax.random.key(seed)``).
      num_examples: size ``N`` of the set sampled from (static).
      batch_size: examples per batch, ``≥ 1`` (static; may exceed ``N``).
      step: the worker's own gradient index; may be traced.
      worker: the worker id; may be traced.

    Returns:
      ``int32[batch_size]`` indices in ``[0, N)``.

    References:
      Niu, Recht, Ré & Wright, *Hogwild!*, NeurIPS 2011 (arXiv 1106.5730).
    """
    num_examples = check_index("num_examples", num_examples, 1, _MAX_EXAMPLES)
    batch_size = check_min_int("batch_size", batch_size, 1)
    _concrete_step(step)
    if isinstance(key, numbers.Integral):
        key = jax.random.key(key)
    words = key_words(jax.random.fold_in(key, worker))
    counter = jnp.asarray(step, jnp.uint32) * jnp.uint32(batch_size) + jnp.arange(
        batch_size, dtype=jnp.uint32
    )
    u = uniform01(words, counter)
    return jnp.minimum((u * num_examples).astype(jnp.int32), num_examples - 1)


def worker_batch(
    data: Any,
    batch_size: int,
    key: int | chex.PRNGKey,
    worker: int | jax.Array,
    step: int | jax.Array,
) -> Any:
    """The batch worker ``worker`` uses for its ``step``-th gradient (sampled with replacement).

    The examples at :func:`worker_sample_indices` ``(key, N, batch_size, step, worker)`` of
    every leaf of ``data``; e.g. to replay a recorded hogwild trace through
    :func:`asgd_jax.stale` on the same batches.

    Args:
      data: a pytree of arrays sharing a leading (example) axis of size ``N``.
      batch_size: examples per batch.
      key: the run's key or int seed.
      worker: the worker id.
      step: the worker's gradient index.

    Returns:
      The pytree of ``data`` indexed by ``batch_size`` example indices.
    """
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data must hold at least one array, got an empty pytree")
    indices = worker_sample_indices(key, leaves[0].shape[0], batch_size, step, worker)
    return jax.tree.map(lambda x: jnp.take(x, indices, axis=0), data)


def get_batch(dataset: Dataset, indices: jax.Array) -> Batch:
    """The training examples at ``indices`` as a :class:`Batch` (a gather; jit-friendly).

    Inside a jitted loop, pass the :class:`Dataset` in as an argument (it is a pytree) rather
    than closing over it: a closed-over array becomes a constant baked into the compiled
    program, which for MNIST-sized data makes compilation slow and memory-hungry.
    """
    return Batch(x=dataset.x_train[indices], y=dataset.y_train[indices])
