"""The simulated clock: absolute double-float times (an unevaluated float32 pair hi + lo).

Every worker's finish times are the running sums of its own float32 cycle times, each
formed by the same :func:`add` of the previous finish time and the next cycle: no other
worker's events touch them. The event loop (one arrival at a time) and the sorted path
(all arrivals at once, ``_sorted``) therefore compute bitwise the same times, and which
arrival comes next is decided by comparing (hi, lo) pairs, ties to the lowest worker id.

A pair carries about 48 bits, so the order is that of the float32 cycle times summed in
float64 up to pairs closer than ~2⁻⁴⁸ relative, and it does not degrade as the clock grows
(a float32 clock at t = 10⁵ would round every time to ~0.008). Only IEEE additions are used
(no FMA, no reassociation: XLA keeps floating-point sums as written), so every backend
gives the same pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Pair = tuple[jax.Array, jax.Array]


def two_sum(a: jax.Array, b: jax.Array) -> Pair:
    """s + e = a + b exactly, s = fl(a + b) (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def add(x: Pair, y: Pair) -> Pair:
    """Double-float addition of (hi, lo) pairs; the result is normalised (|lo| ≤ ulp(hi)/2)."""
    s, e = two_sum(x[0], y[0])
    e = e + (x[1] + y[1])
    hi = s + e
    return hi, e - (hi - s)


def advance(now: Pair, cycle: jax.Array) -> Pair:
    """The finish time of a cycle of length ``cycle`` (float32) started at ``now``."""
    return add(now, (cycle, jnp.zeros_like(cycle)))


def less(a: Pair, b: Pair) -> jax.Array:
    """Whether pair ``a`` is strictly earlier than pair ``b``."""
    return (a[0] < b[0]) | ((a[0] == b[0]) & (a[1] < b[1]))


def running_sums(cycles: jax.Array, start: Pair | None = None) -> Pair:
    """Each column's finish times: row c is ``advance`` applied to rows 0..c in order.

    A sequential scan over the rows (vectorised over the columns), so row c holds exactly
    what the event loop's c-th ``advance`` of that worker holds; ``start`` continues the
    sums from given pairs (default: time 0).
    """

    def body(carry, row):
        carry = advance(carry, row)
        return carry, carry

    if start is None:
        zero = jnp.zeros_like(cycles[0])
        start = (zero, zero)
    return jax.lax.scan(body, start, cycles)[1]
