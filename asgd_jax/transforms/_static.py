"""The static part of a stale state and the checks at its boundary.

``_Static`` carries the delay model and ``history_dtype`` as pytree metadata that compares and
hashes by value and that flax serialization skips; :func:`check_params` compares parameters
with the history a state was built for; ``_as_arrays`` unwraps Flax NNX variables.
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__: list[str] = []


@jax.tree_util.register_pytree_node_class
class _Static:
    """The static part of a stale state (no leaves): the delay model and ``history_dtype``.

    Compares and hashes by value (the delay model's own value key), like equinox's
    ``Static``: two identical builds of :func:`asgd_jax.stale` give equal tree structures.
    """

    __slots__ = ("value", "history_dtype")

    def __init__(self, value: Any, history_dtype: Any = None):
        self.value = value
        self.history_dtype = history_dtype

    def tree_flatten(self):
        return (), (self.value, self.history_dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        del children
        return cls(*aux)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Static):
            return NotImplemented
        return (self.value, self.history_dtype) == (other.value, other.history_dtype)

    def __hash__(self) -> int:
        return hash((self.value, self.history_dtype))

    def __repr__(self) -> str:
        return repr(self.value)


_FLAX_REGISTERED = False


def _register_flax_serialization() -> None:
    """Makes the static part invisible to ``flax.serialization`` (msgpack checkpoints).

    ``to_state_dict`` writes ``{}`` for it and ``from_state_dict`` keeps the target's, so
    ``to_bytes`` / ``from_bytes`` of a state (or a flax ``TrainState``) round-trip. Called
    when a :func:`asgd_jax.stale` is built, so ``import asgd_jax`` does not import flax.
    """
    global _FLAX_REGISTERED
    if _FLAX_REGISTERED:
        return
    try:
        from flax import serialization
    except ImportError:  # pragma: no cover - flax is a dependency
        return
    serialization.register_serialization_state(
        _Static, lambda static: {}, lambda target, state: target, override=True
    )
    _FLAX_REGISTERED = True


def _as_arrays(tree: Any) -> Any:
    """Flax NNX variables (``nnx.Param``, an ``nnx.Optimizer``'s state) unwrapped to arrays.

    Any other pytree is returned unchanged; flax is not imported when it is not in use.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return tree
    # ``VariableState`` was folded into ``Variable`` (flax 0.11+ keeps a deprecated alias);
    # read it from the module dict so the alias's warning is never triggered.
    names = ("Variable", "VariableState")
    kinds = tuple(dict.fromkeys(k for k in (vars(nnx).get(n) for n in names) if k))
    if not kinds:
        return tree
    is_variable = lambda x: isinstance(x, kinds)  # noqa: E731
    if not any(is_variable(x) for x in jax.tree.leaves(tree, is_leaf=is_variable)):
        return tree
    return jax.tree.map(
        lambda x: _variable_value(x) if is_variable(x) else x, tree, is_leaf=is_variable
    )


def _variable_value(x: Any) -> Any:
    # flax 0.12 deprecates ``.value`` in favour of ``get_value()``; older releases lack it.
    get_value = getattr(x, "get_value", None)
    return get_value() if callable(get_value) else x.value


def check_params(s: Any, params: optax.Params, who: str) -> None:
    """Raises a ``ValueError`` naming the leaf when ``params`` do not fit the history.

    Structure, shapes and dtypes are compared with the history the state was built with
    (trace-time only: no runtime cost). With ``max_delay = 0`` there is no history and
    nothing to compare.
    """
    if isinstance(s.history, tuple) and not s.history:
        return
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    built, built_def = jax.tree_util.tree_flatten_with_path(s.history)
    if treedef != built_def:
        have = {jax.tree_util.keystr(path) for path, _ in leaves}
        want = {jax.tree_util.keystr(path) for path, _ in built}
        raise ValueError(
            f"{who}: `params` do not have the structure this optimizer state was built for "
            f"(missing leaves {sorted(want - have)}, unexpected leaves {sorted(have - want)}; "
            f"params: {treedef}, state: {built_def}). Build the state with tx.init(params) "
            "for these parameters."
        )
    fixed_dtype = s.delay.history_dtype
    for (path, p), (_, h) in zip(leaves, built, strict=True):
        shape, dtype, stored = tuple(jnp.shape(p)), jnp.result_type(p), h.dtype
        # A set history_dtype recasts floating leaves: only their shape is then comparable.
        recast = fixed_dtype is not None and jnp.issubdtype(dtype, jnp.floating)
        if tuple(h.shape[1:]) != shape or not (recast or dtype == stored):
            raise ValueError(
                f"{who}: params leaf {jax.tree_util.keystr(path)} has shape {shape} and dtype "
                f"{dtype}, but this optimizer state was built for shape {tuple(h.shape[1:])} "
                f"and dtype {stored}. Build the state with tx.init(params) for these "
                "parameters (or cast them back)."
            )
