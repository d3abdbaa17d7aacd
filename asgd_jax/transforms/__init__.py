"""The optax surface of asgd_jax: the stale wrapper, its state readers, staleness-aware steps."""

from asgd_jax.transforms._stale import stale
from asgd_jax.transforms._staleness_aware import (
    STALENESS_RULES,
    DelayCompensationState,
    GapAwareState,
    delay_compensation,
    gap_aware,
    scale_by_staleness,
    staleness_factor,
)
from asgd_jax.transforms._state import (
    StalenessMetrics,
    StaleState,
    delay_report,
    find_stale_state,
    has_stale_state,
    reseed,
    stale_params,
    stale_params_at,
    staleness,
    staleness_summary,
    upcoming_staleness,
)

__all__ = [
    "STALENESS_RULES",
    "DelayCompensationState",
    "GapAwareState",
    "StaleState",
    "StalenessMetrics",
    "delay_compensation",
    "delay_report",
    "find_stale_state",
    "gap_aware",
    "has_stale_state",
    "reseed",
    "scale_by_staleness",
    "stale",
    "stale_params",
    "stale_params_at",
    "staleness",
    "staleness_factor",
    "staleness_summary",
    "upcoming_staleness",
]
