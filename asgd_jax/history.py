"""A circular buffer of parameter snapshots.

The buffer is a pytree shaped like the parameters whose leaves carry a leading axis of length
``K``: snapshot ``W_s`` lives in slot ``s mod K``. Writes are a single
``lax.dynamic_update_slice`` per leaf, so with the buffer donated XLA updates it in place and
a step costs the same for any ``K``; reads are one ``lax.dynamic_slice`` per leaf.

All slots start as copies of ``W_0``, so reading a lag larger than the number of snapshots
written so far returns ``W_0`` -- every worker starts from the initial parameters.

Every index is ``int32`` (also under ``jax_enable_x64``), so reads and writes batch under
``jax.vmap`` the same way in both modes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["init", "write", "read", "read_lagged", "size"]


def _zeros(n: int) -> tuple[jax.Array, ...]:
    """``n`` int32 zeros: start indices of one dtype with an int32 slot, x64 or not."""
    return (jnp.zeros((), jnp.int32),) * n


def _stack(leaf: jax.Array, num_slots: int, dtype: Any) -> jax.Array:
    # A storage dtype applies to real floating leaves; integer and complex ones keep theirs.
    floating = jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
    target = jnp.dtype(dtype) if dtype is not None and floating else jnp.result_type(leaf)
    # broadcast_to keeps the parameter's sharding on the trailing axes and always allocates
    # fresh buffers, so the state never aliases the caller's params (safe to donate both).
    return jnp.broadcast_to(jnp.asarray(leaf, target)[None], (num_slots, *jnp.shape(leaf)))


def init(params: optax.Params, num_slots: int, dtype: Any = None) -> optax.Params:
    """A buffer of ``num_slots`` snapshots, every slot holding ``params``.

    Args:
      params: a pytree of arrays (or ``jax.ShapeDtypeStruct`` under ``jax.eval_shape``).
      num_slots: ``K``, the number of snapshots kept (≥ 1).
      dtype: storage dtype of the real floating snapshots; ``None`` keeps each leaf's own
        dtype (integer and complex leaves always keep theirs).

    Returns:
      A pytree like ``params`` with leaves of shape ``(K, *leaf.shape)``.
    """
    if num_slots < 1:
        raise ValueError(f"`num_slots` must be ≥ 1, got {num_slots}.")
    return jax.tree.map(lambda p: _stack(p, num_slots, dtype), params)


def size(buffer: optax.Params) -> int:
    """The number of slots ``K`` of a buffer."""
    leaves = jax.tree.leaves(buffer)
    return int(leaves[0].shape[0]) if leaves else 0


@jax.custom_batching.custom_vmap
def _write_leaf(buf: jax.Array, leaf: jax.Array, slot: jax.Array) -> jax.Array:
    start = (slot, *_zeros(leaf.ndim))
    return jax.lax.dynamic_update_slice(buf, leaf.astype(buf.dtype)[None], start)


@_write_leaf.def_vmap
def _write_leaf_batched(axis_size, in_batched, buf, leaf, slot):
    # Under vmap (e.g. many seeds) the default rule turns a write at a per-run slot into a
    # scatter, which XLA:CPU runs element by element. Write each run's slot with its own
    # in-place dynamic-update-slice instead.
    buf_batched, leaf_batched, slot_batched = in_batched
    if not buf_batched:
        buf = jnp.broadcast_to(buf, (axis_size, *buf.shape))
    if not leaf_batched:
        leaf = jnp.broadcast_to(leaf, (axis_size, *leaf.shape))
    leaf = leaf.astype(buf.dtype)
    rest = _zeros(leaf.ndim - 1)
    zero = jnp.zeros((), jnp.int32)
    if not slot_batched:
        return jax.lax.dynamic_update_slice(buf, leaf[:, None], (zero, slot, *rest)), True

    def body(run, buf):
        update = jax.lax.dynamic_index_in_dim(leaf, run, keepdims=True)[:, None]
        return jax.lax.dynamic_update_slice(buf, update, (run, slot[run], *rest))

    # int32 bounds give an int32 run index, like the slots (also under x64).
    return jax.lax.fori_loop(zero, jnp.int32(axis_size), body, buf), True


def write(buffer: optax.Params, params: optax.Params, step: jax.Array) -> optax.Params:
    """Stores ``params`` as snapshot ``step`` (slot ``step mod K``), in place under donation.

    Under ``jax.vmap`` with a per-run ``step`` the write stays one in-place update per run
    (a custom batching rule), not a scatter.
    """
    num_slots = size(buffer)
    slot = jnp.asarray(step, jnp.int32) % num_slots
    return jax.tree.map(lambda buf, leaf: _write_leaf(buf, leaf, slot), buffer, params)


def read(buffer: optax.Params, step: jax.Array) -> optax.Params:
    """Snapshot ``step`` (slot ``step mod K``), in the buffer's storage dtype."""
    num_slots = size(buffer)
    slot = jnp.asarray(step, jnp.int32) % num_slots

    def get(buf: jax.Array) -> jax.Array:
        start = (slot, *_zeros(buf.ndim - 1))
        return jax.lax.dynamic_slice(buf, start, (1, *buf.shape[1:]))[0]

    return jax.tree.map(get, buffer)


def read_lagged(buffer: optax.Params, last_step: jax.Array, lag: jax.Array) -> optax.Params:
    """Snapshot ``last_step − lag``, where ``last_step`` is the newest snapshot written.

    Lags reaching before snapshot 0 return snapshot 0; lags must be ≤ ``K − 1`` to be exact
    once the buffer has wrapped (the caller sizes ``K`` from the delay model's ``max_delay``).
    """
    target = jnp.maximum(jnp.asarray(last_step, jnp.int32) - jnp.asarray(lag, jnp.int32), 0)
    return read(buffer, target)
