"""asgd_jax: asynchronous SGD with stale gradients, as optax transforms.

The core contract::

    tx = asgd.stale(optax.sgd(0.05), delay=asgd.delays.uniform(0, 8))
    grads = jax.grad(loss)(asgd.stale_params(state, params), batch)  # at W_{t-τ_t}
    updates, state = tx.update(grads, state, params)                 # applied to W_t

Submodules (``workers``, ``theory``, ``parallel``, ``hogwild``, ``data``, ``models``,
``train``, ``cli``) are imported on first attribute access.
"""

import importlib

from asgd_jax import delays, history
from asgd_jax.step import Step, make_step
from asgd_jax.transforms import (
    StalenessMetrics,
    StaleState,
    delay_compensation,
    delay_report,
    gap_aware,
    has_stale_state,
    reseed,
    scale_by_staleness,
    stale,
    stale_params,
    stale_params_at,
    staleness,
    staleness_summary,
    upcoming_staleness,
)

__version__ = "0.1.0"

_LAZY_SUBMODULES = (
    "workers",
    "theory",
    "parallel",
    "hogwild",
    "data",
    "models",
    "train",
    "cli",
    "experiments",
    "nnx",
    "linen",
)

__all__ = [
    "StaleState",
    "StalenessMetrics",
    "Step",
    "delay_compensation",
    "delay_report",
    "delays",
    "gap_aware",
    "has_stale_state",
    "history",
    "make_step",
    "reseed",
    "scale_by_staleness",
    "stale",
    "stale_params",
    "stale_params_at",
    "staleness",
    "staleness_summary",
    "upcoming_staleness",
    *_LAZY_SUBMODULES,
]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"asgd_jax.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'asgd_jax' has no attribute {name!r}")
