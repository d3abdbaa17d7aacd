"""Step-size guidance under staleness: exact facts of the constant-delay recursion."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import asgd_jax as asgd
from asgd_jax import theory as th


@pytest.mark.parametrize("tau", [0, 1, 2, 3, 5, 8])
def test_constant_delay_boundary_and_optimum_are_the_closed_forms(tau):
    curvature = 4.0
    s = th.step_size(tau, curvature)
    # Stable iff ηL < 2 sin(π / (2(2τ + 1))) (Levin & May 1976).
    boundary = 2.0 * math.sin(math.pi / (2.0 * (2 * tau + 1)))
    assert s.critical_gain == pytest.approx(boundary, rel=1e-9)
    assert s.critical_gain == pytest.approx(th.constant_staleness_bound(tau), rel=1e-9)
    assert s.max_stable == pytest.approx(boundary / curvature, rel=1e-9)
    # Rate-optimal ηL = τ^τ / (τ + 1)^{τ+1}: a double root at z = τ / (τ + 1).
    optimum = tau**tau / (tau + 1) ** (tau + 1)
    assert s.optimal_gain == pytest.approx(optimum, rel=1e-6)
    assert s.optimal == pytest.approx(optimum / curvature, rel=1e-6)
    # Mean square: ρ₂ = ρ² for a constant delay.
    assert s.radius == pytest.approx((tau / (tau + 1)) ** 2, abs=1e-5)
    mean = th.step_size(tau, curvature, criterion="mean")
    assert mean.critical_gain == pytest.approx(boundary, rel=1e-9)
    assert mean.optimal_gain == pytest.approx(optimum, rel=1e-6)
    assert mean.radius == pytest.approx(tau / (tau + 1), abs=1e-5)


def test_double_root_at_the_optimal_gain():
    for tau in (1, 2, 4, 7):
        a = tau**tau / (tau + 1) ** (tau + 1)
        z = tau / (tau + 1)
        # z^{τ+1} − z^τ + a = 0 and its derivative (τ+1) z^τ − τ z^{τ−1} = 0 at z = τ/(τ+1).
        assert z ** (tau + 1) - z**tau + a == pytest.approx(0.0, abs=1e-15)
        assert (tau + 1) * z**tau - tau * z ** (tau - 1) == pytest.approx(0.0, abs=1e-15)
        pmf = np.eye(tau + 1)[tau]
        rho = lambda g, pmf=pmf: th.discrete_spectral_radius(g, pmf, method="roots")
        assert rho(a) < rho(a * 0.99) and rho(a) < rho(a * 1.01)


def test_delay_models_pmfs_and_traces_agree():
    by_int = th.step_size(3, 1.0)
    for delay in (asgd.delays.constant(3), np.eye(4)[3], np.full(50, 3)):
        s = th.step_size(delay, 1.0)
        assert s.critical_gain == pytest.approx(by_int.critical_gain, rel=1e-12)
        assert s.optimal_gain == pytest.approx(by_int.optimal_gain, rel=1e-9)
    # A round robin of n workers is a constant staleness n − 1.
    rr = th.step_size(asgd.delays.round_robin(4), 1.0)
    assert rr.critical_gain == pytest.approx(by_int.critical_gain, rel=1e-12)
    # A worker setup: constant compute times give τ = n − 1 too.
    workers = th.step_size(th.worker_staleness(4, 1.0), 1.0)
    assert workers.critical_gain == pytest.approx(by_int.critical_gain, rel=1e-12)


def test_random_delays_mean_square_is_stricter_than_the_mean():
    delay = asgd.delays.uniform(0, 8)
    ms = th.step_size(delay, 1.0)
    mean = th.step_size(delay, 1.0, criterion="mean")
    assert mean.critical_gain == pytest.approx(th.discrete_critical_gain(delay.pmf), rel=1e-12)
    assert ms.critical_gain < mean.critical_gain
    assert th.discrete_mean_square_radius(ms.critical_gain * 0.999, delay.pmf) < 1.0
    assert th.discrete_mean_square_radius(ms.critical_gain * 1.001, delay.pmf) > 1.0
    assert 0 < ms.optimal < ms.max_stable and ms.radius < 1.0


def test_dropping_stale_gradients_moves_the_boundary_as_the_theory_says():
    pmf = np.ones(9) / 9
    s = th.step_size(pmf, 2.0, max_staleness=4, criterion="mean")
    expected = th.discrete_critical_gain(pmf, max_staleness=4)
    assert s.critical_gain == pytest.approx(expected, rel=1e-12)
    assert s.critical_gain > th.step_size(pmf, 2.0, criterion="mean").critical_gain


def test_min_curvature_balances_the_slowest_mode():
    s = th.step_size(2, 10.0)
    balanced = th.step_size(2, 10.0, min_curvature=1.0)
    assert s.optimal < balanced.optimal < balanced.max_stable
    # At the balanced step both modes contract at the same rate.
    rho2 = lambda g: th.discrete_spectral_radius(g, np.eye(3)[2], method="roots") ** 2
    gain = balanced.optimal_gain
    assert rho2(gain) == pytest.approx(rho2(gain / 10.0), rel=1e-6)
    assert th.step_size(2, 10.0, min_curvature=10.0).optimal == pytest.approx(s.optimal)


def test_bad_arguments_raise_naming_the_argument():
    with pytest.raises(ValueError, match="curvature"):
        th.step_size(2, 0.0)
    with pytest.raises(ValueError, match="min_curvature"):
        th.step_size(2, 1.0, min_curvature=2.0)
    with pytest.raises(ValueError, match="criterion"):
        th.step_size(2, 1.0, criterion="fast")
    with pytest.raises(ValueError, match="delay"):
        th.step_size(-1, 1.0)
    no_law = asgd.delays.DelayModel(
        init=lambda key: (), next=lambda s: (jnp.int32(0), s), max_delay=3, name="custom"
    )
    with pytest.raises(ValueError, match="pmf"):
        th.step_size(no_law, 1.0)


def test_power_iteration_finds_the_largest_eigenvalue():
    eigenvalues = jnp.array([0.5, 2.0, 7.0, 3.0])
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (4, 4)))
    hessian = q @ jnp.diag(eigenvalues) @ q.T
    loss = lambda p, h: 0.5 * p["w"] @ h @ p["w"] + jnp.sum(p["b"] ** 2)
    params = {"w": jnp.ones(4), "b": jnp.zeros(2)}  # the b block has eigenvalue 2
    top = th.hessian_max_eigenvalue(loss, params, hessian, num_iterations=200)
    assert top == pytest.approx(7.0, rel=1e-4)


def test_power_iteration_with_a_dominant_negative_eigenvalue():
    hessian = jnp.diag(jnp.array([-9.0, 1.0, 4.0]))
    loss = lambda w: 0.5 * w @ hessian @ w
    top = th.hessian_max_eigenvalue(loss, jnp.zeros(3), num_iterations=300)
    assert top == pytest.approx(4.0, rel=1e-3)


def test_the_recommended_step_trains_and_twice_the_boundary_diverges():
    # Least squares with curvature L: SGD with constant staleness 4 through asgd.stale.
    x = jax.random.normal(jax.random.key(0), (64, 5))
    y = x @ jnp.arange(1.0, 6.0)
    loss = lambda w: 0.5 * jnp.mean((x @ w - y) ** 2)
    w0 = jnp.zeros(5)
    curvature = th.hessian_max_eigenvalue(loss, w0, num_iterations=200)
    exact = float(jnp.linalg.eigvalsh(x.T @ x / 64)[-1])
    assert curvature == pytest.approx(exact, rel=1e-4)
    guide = th.step_size(4, curvature)

    def final_loss(learning_rate):
        tx = asgd.stale(optax.sgd(learning_rate), delay=4)
        step = asgd.make_step(loss, tx)
        run = jax.jit(lambda w, s: jax.lax.fori_loop(0, 300, lambda _, c: step(*c)[:2], (w, s)))
        w, _ = run(w0, tx.init(w0))
        return float(loss(w))

    assert final_loss(guide.optimal) < 1e-3 * float(loss(w0))
    assert not final_loss(2.0 * guide.max_stable) < float(loss(w0))
