"""The demo's experiment: synchronous SGD against three asynchronous variants on one cluster.

``asgd-jax demo``, ``benchmarks/seeds.py`` and the tests build their runs from
:func:`demo_configs`; the CLI only runs them and reports.
"""

from __future__ import annotations

from asgd_jax._validation import check_min_int
from asgd_jax.train import TrainConfig

__all__ = ["DEMO_DC_LAMBDA", "DEMO_TARGET", "demo_configs"]

DEMO_TARGET = 0.85  # the test accuracy whose simulated time-to-reach the demo reports.
DEMO_DC_LAMBDA = 2.0  # λ₀ of DC-ASGD-a.


def demo_configs(
    num_workers: int = 8,
    num_slow: int = 2,
    slow_factor: float = 4.0,
    rounds: int = 300,
    evals: int = 30,
    learning_rate: float = 0.2,
) -> dict[str, TrainConfig]:
    """The four runs of ``asgd-jax demo``, keyed by their label.

    One MLP on the bundled digits, one simulated cluster: ``num_workers`` workers with
    exponential compute times of mean 1, the last ``num_slow`` of them ``slow_factor`` times
    slower. Synchronous SGD runs ``rounds`` rounds, each waiting for all n workers and
    applying the mean of their n gradients; the asynchronous runs apply each gradient on
    arrival, n × ``rounds`` updates, so every run computes the same number of gradients.
    DC-ASGD is the adaptive variant (DC-ASGD-a, Zheng et al. 2017, arXiv 1609.08326) with
    λ₀ = ``DEMO_DC_LAMBDA``: on a model this small the constant-λ form changes the update by
    parts per million.

    Args:
      num_workers: n, at least 2.
      num_slow: stragglers among them, in [0, n].
      slow_factor: how much slower a straggler is (≥ 1).
      rounds: synchronous rounds (≥ 1).
      evals: evaluations per run (≥ 1); rounds must be a multiple of it.
      learning_rate: the learning rate of every run.

    Returns:
      ``{label: TrainConfig}``.
    """
    check_min_int("num_workers", num_workers, 2)
    evals = check_min_int("evals", evals, 1)
    rounds = check_min_int("rounds", rounds, 1)
    if rounds % evals:
        raise ValueError(f"rounds must be a multiple of evals={evals}, got {rounds}")
    common = dict(
        dataset="digits",
        model="mlp",
        hidden_sizes=(64,),
        batch_size=16,
        optimizer="sgd",
        learning_rate=learning_rate,
        delay="workers",
        num_workers=num_workers,
        num_slow=num_slow,
        slow_factor=slow_factor,
        compute_time="exponential",
        compute_mean=1.0,
    )
    sync = TrainConfig(**common, protocol="k_sync", num_steps=rounds, eval_every=rounds // evals)
    async_steps = rounds * num_workers
    asynchronous = dict(
        common, protocol="async", num_steps=async_steps, eval_every=async_steps // evals
    )
    return {
        f"synchronous SGD ({num_workers} workers)": sync,
        "ASGD": TrainConfig(**asynchronous),
        "staleness-aware ASGD": TrainConfig(**asynchronous, mitigation="staleness_aware"),
        "DC-ASGD-a": TrainConfig(
            **asynchronous, mitigation="dc_asgd_adaptive", dc_lambda=DEMO_DC_LAMBDA
        ),
    }
