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
from asgd_jax.transforms import (
    StalenessMetrics,
    StaleState,
    delay_compensation,
    gap_aware,
    reseed,
    scale_by_staleness,
    stale,
    stale_params,
    staleness,
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
)

__all__ = [
    "StaleState",
    "StalenessMetrics",
    "delay_compensation",
    "delays",
    "gap_aware",
    "history",
    "reseed",
    "scale_by_staleness",
    "stale",
    "stale_params",
    "staleness",
    *_LAZY_SUBMODULES,
]


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"asgd_jax.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'asgd_jax' has no attribute {name!r}")
