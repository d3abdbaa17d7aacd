"""Studies built on :func:`asgd_jax.train.train`: each runs a protocol from a paper and returns
its measurements as arrays, ready to plot; and the demo's configurations.

* :mod:`asgd_jax.experiments.demo`: the four runs of ``asgd-jax demo`` (synchronous SGD,
  ASGD, staleness-aware ASGD, DC-ASGD-a on one simulated cluster).
* :mod:`asgd_jax.experiments.generalization`: the generalization gap and the algorithmic
  stability of asynchronous SGD against the average delay (Regatti et al. 2019,
  arXiv 1909.13391).
"""

from asgd_jax.experiments import demo, generalization
from asgd_jax.experiments.demo import demo_configs
from asgd_jax.experiments.generalization import (
    LR_SCHEDULES,
    GeneralizationResult,
    generalization_study,
)

__all__ = [
    "LR_SCHEDULES",
    "GeneralizationResult",
    "demo",
    "demo_configs",
    "generalization",
    "generalization_study",
]
