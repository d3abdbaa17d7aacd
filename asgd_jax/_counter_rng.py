"""The one counter-based hash behind every random draw of delays, workers and batches.

A key is turned into two ``uint32`` words once (:func:`key_words`, one ``jax.random.bits``
call); every later draw is a pure integer hash of (those words, a counter, a stream id). The
per-draw cost is a handful of integer ops (a threefry draw per step costs ~25 % of a small
model's step on CPU), the result is the same under ``jit``, ``vmap``, ``pmap`` and
``shard_map`` on every backend, and the same key always gives the same sequence.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

__all__ = ["key_words", "mix32", "uniform01"]


def mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of a ``uint32``."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def key_words(key: chex.PRNGKey) -> jax.Array:
    """Two ``uint32`` words drawn from ``key`` (typed or raw); the seed of a counter stream."""
    return jax.random.bits(key, (2,), jnp.uint32)


def uniform01(seed: jax.Array, counter: jax.Array, stream: int = 0) -> jax.Array:
    """A float32 in ``[0, 1)`` from a counter-based hash of ``(seed, counter, stream)``.

    Pure and stateless: the same arguments always give the same value. Two rounds of the
    Murmur3 finaliser over the counter keyed by both seed words; 24 bits of the result form
    the mantissa. ``stream`` separates independent streams that share a seed.
    """
    c = jnp.asarray(counter).astype(jnp.uint32)
    x = c * jnp.uint32(0x9E3779B9) + seed[0] + jnp.uint32((stream * 0x632BE5AB) & 0xFFFFFFFF)
    x = mix32(x)
    x = mix32(x ^ seed[1])
    x = mix32(x + jnp.uint32(0x7F4A7C15))
    return (x >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
