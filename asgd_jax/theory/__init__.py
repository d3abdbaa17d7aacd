"""SDDE theory of asynchronous SGD (Yu, Chen & Poor, arXiv 2406.11159), checked by simulation.

Per Hessian eigenvalue h, with update rate Λ, acceptance probability p_acc and a delay D in
time units, the mean dynamics of asynchronous SGD on a quadratic are x'(t) = −k E[x(t − D)],
k = ηΛh·p_acc, with characteristic equation s + k E[e^{−sD}] = 0. This package computes

* delay laws (:class:`DelayLaw`: constant, exponential, Gamma, uniform, empirical, shifted,
  from a staleness law) and the rightmost characteristic root, stability, critical gain,
  convergence rate, stationary variance and hitting times of the SDDE;
* the exact discrete-time recursion x_{t+1} = x_t − ηh x_{t−τ_t}: spectral radius and exact
  trajectory of the mean dynamics, its stability boundary, and the second-moment
  (mean-square) radius, which sees the divergence that random delays cause and the mean
  dynamics miss;
* the map from n simulated workers to the SDDE and the worker count that minimises the
  predicted wall-clock time to a loss level;
* the fixed computation model (worker i needs τ_i per gradient): Rennala SGD's round time
  and bounds, Ringmaster ASGD's Lemma 4.1 and threshold, the lower bound, and the
  predicted time to an ε-stationary point of synchronous SGD, ASGD, Rennala and
  Ringmaster side by side (``_fixed_computation``).

NumPy/SciPy only: nothing here imports the training code.
"""

from asgd_jax.theory._continuous import (
    as_delay_law,
    characteristic_function,
    convergence_rate,
    critical_gain,
    expected_loss,
    hitting_time,
    is_stable,
    rightmost_root,
    stationary_variance,
)
from asgd_jax.theory._discrete import (
    accepted_weights,
    constant_staleness_bound,
    discrete_characteristic_polynomial,
    discrete_characteristic_roots,
    discrete_critical_gain,
    discrete_decay_rate,
    discrete_is_stable,
    discrete_mean_square_radius,
    discrete_mean_trajectory,
    discrete_spectral_radius,
    geometric_spectral_radius,
)
from asgd_jax.theory._fixed_computation import (
    RoundBounds,
    TimeToEpsilon,
    harmonic_means,
    lower_bound_time,
    rennala_round_bounds,
    rennala_round_time,
    ringmaster_threshold,
    ringmaster_time_bound,
    sgd_iterations,
    time_complexities,
    time_to_epsilon,
)
from asgd_jax.theory._laws import (
    DelayLaw,
    constant_delay,
    empirical_delay,
    exponential_delay,
    gamma_delay,
    shifted_delay,
    staleness_delay,
    uniform_delay,
)
from asgd_jax.theory._scheduling import (
    OptimalWorkers,
    WorkerPrediction,
    cycle_mean,
    optimal_num_workers,
    predict,
    update_rate,
    worker_delay,
    worker_staleness,
)
from asgd_jax.theory._step_size import StepSize, hessian_max_eigenvalue, step_size

__all__ = [
    "DelayLaw",
    "OptimalWorkers",
    "StepSize",
    "WorkerPrediction",
    "cycle_mean",
    "optimal_num_workers",
    "predict",
    "update_rate",
    "worker_delay",
    "worker_staleness",
    "accepted_weights",
    "as_delay_law",
    "characteristic_function",
    "constant_delay",
    "constant_staleness_bound",
    "convergence_rate",
    "critical_gain",
    "discrete_characteristic_polynomial",
    "discrete_characteristic_roots",
    "discrete_critical_gain",
    "discrete_decay_rate",
    "discrete_is_stable",
    "discrete_mean_square_radius",
    "discrete_mean_trajectory",
    "discrete_spectral_radius",
    "empirical_delay",
    "expected_loss",
    "exponential_delay",
    "gamma_delay",
    "geometric_spectral_radius",
    "hessian_max_eigenvalue",
    "hitting_time",
    "is_stable",
    "rightmost_root",
    "shifted_delay",
    "staleness_delay",
    "stationary_variance",
    "step_size",
    "uniform_delay",
    "RoundBounds",
    "TimeToEpsilon",
    "harmonic_means",
    "lower_bound_time",
    "rennala_round_bounds",
    "rennala_round_time",
    "ringmaster_threshold",
    "ringmaster_time_bound",
    "sgd_iterations",
    "time_complexities",
    "time_to_epsilon",
]
