"""The optax surface of asgd_jax: the stale wrapper and staleness-aware transformations."""

from asgd_jax.transforms._stale import (
    StalenessMetrics,
    StaleState,
    find_stale_state,
    reseed,
    stale,
    stale_params,
    staleness,
)
from asgd_jax.transforms._staleness_aware import (
    STALENESS_RULES,
    DelayCompensationState,
    GapAwareState,
    delay_compensation,
    gap_aware,
    scale_by_staleness,
    staleness_factor,
)

__all__ = [
    "STALENESS_RULES",
    "DelayCompensationState",
    "GapAwareState",
    "StaleState",
    "StalenessMetrics",
    "delay_compensation",
    "find_stale_state",
    "gap_aware",
    "reseed",
    "scale_by_staleness",
    "stale",
    "stale_params",
    "staleness",
    "staleness_factor",
]
