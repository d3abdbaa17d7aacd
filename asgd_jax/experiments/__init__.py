"""Studies built on :func:`asgd_jax.train.train`: each runs a protocol from a paper and returns
its measurements as arrays, ready to plot.

* :mod:`asgd_jax.experiments.generalization`: the generalization gap and the algorithmic
  stability of asynchronous SGD against the average delay (Regatti et al. 2019,
  arXiv 1909.13391).
"""

from asgd_jax.experiments import generalization
from asgd_jax.experiments.generalization import (
    LR_SCHEDULES,
    GeneralizationResult,
    generalization_study,
)

__all__ = [
    "LR_SCHEDULES",
    "GeneralizationResult",
    "generalization",
    "generalization_study",
]
