"""SDDE theory: closed forms, root finders, and agreement with the worker simulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import asgd_jax as asgd
from asgd_jax import theory as th
from asgd_jax import workers

# --------------------------------------------------------------------------------------------
# Continuous time: characteristic roots.


@pytest.mark.parametrize("kc", [0.05, 0.3, 1 / math.e, 0.5, 1.0, math.pi / 2, 2.0, 8.0])
def test_constant_delay_general_solver_matches_lambert_w(kc):
    c = 1.7
    closed = th.rightmost_root(kc / c, th.constant_delay(c))
    general = th.rightmost_root(kc / c, th.constant_delay(c), method="general")
    # A double root at the branch point is only determined to √eps by any solver.
    tol = 1e-6 if abs(kc - 1 / math.e) < 1e-9 else 1e-10
    assert abs(closed - general) < tol * (1 + abs(closed))
    assert abs(th.characteristic_function(closed, kc / c, c)) < 1e-9
    if kc <= 1 / math.e:
        assert closed.imag == 0.0
    else:
        assert closed.imag > 0


def test_lambert_branch_point_and_constant_delay_facts():
    c = 2.0
    # At kc = 1/e the double root −1/c; the rate 1/c is the fastest any gain achieves.
    assert th.rightmost_root(1 / (math.e * c), c) == pytest.approx(-1 / c, abs=1e-15)
    rates = [th.convergence_rate(k, c) for k in np.linspace(0.01, 0.78, 60)]
    assert max(rates) <= 1 / c + 1e-12
    # Stable iff kc < π/2, with the roots ±iπ/(2c) on the axis at the boundary.
    k_star = math.pi / (2 * c)
    assert th.critical_gain(c) == k_star
    assert th.critical_gain(th.constant_delay(c), method="general") == pytest.approx(k_star)
    assert th.is_stable(k_star * (1 - 1e-9), c) and not th.is_stable(k_star * (1 + 1e-9), c)
    assert th.rightmost_root(k_star, c) == pytest.approx(1j * math.pi / (2 * c), abs=1e-12)
    assert th.rightmost_root(0.3, 0.0) == -0.3 and th.rightmost_root(0.0, c) == 0


@pytest.mark.parametrize("mean, gain", [(1.0, 0.1), (1.0, 0.25), (1.0, 3.0), (0.5, 10.0)])
def test_exponential_delay_quadratic(mean, gain):
    law = th.exponential_delay(mean)
    closed = th.rightmost_root(gain, law)
    assert closed == pytest.approx((-1 + np.sqrt(complex(1 - 4 * mean * gain))) / (2 * mean))
    general = th.rightmost_root(gain, law, method="general")
    assert abs(closed - general) < 1e-7  # 4mk = 1 is a double root
    assert th.is_stable(gain, law) and th.critical_gain(law) == math.inf


@pytest.mark.parametrize("shape", [2, 3, 2.5])
def test_gamma_delay_critical_gain(shape):
    scale = 0.5
    law = th.gamma_delay(shape, scale)
    k_star = th.critical_gain(law)
    half = math.pi / (2 * shape)
    assert k_star == pytest.approx(math.tan(half) / (scale * math.cos(half) ** shape), rel=1e-12)
    if shape == 2:
        assert k_star == pytest.approx(2 / scale)  # Routh–Hurwitz for θ²s³ + 2θs² + s + k
    assert th.critical_gain(law, method="general") == pytest.approx(k_star, rel=1e-9)
    for k in (0.3 * k_star, k_star, 1.5 * k_star):
        auto = th.rightmost_root(k, law)
        assert abs(auto - th.rightmost_root(k, law, method="general")) < 1e-9
        assert abs(th.characteristic_function(auto, k, law)) < 1e-9
    assert abs(th.rightmost_root(k_star, law).real) < 1e-10


def test_uniform_and_empirical_delay_boundaries():
    b = 2.0
    law = th.uniform_delay(0.0, b)
    k_star = th.critical_gain(law)
    assert k_star == pytest.approx(math.pi**2 / (2 * b), rel=1e-14)
    assert th.critical_gain(law, method="general") == pytest.approx(k_star, rel=1e-10)
    assert th.rightmost_root(k_star, law) == pytest.approx(1j * math.pi / b, abs=1e-9)
    # A spread-out delay tolerates k·E[D] = π²/4 > π/2 of a constant delay.
    assert k_star * law.mean > math.pi / 2
    emp = th.empirical_delay([0.0, 1.0, 3.0], [0.2, 0.5, 0.3])
    k_emp = th.critical_gain(emp)
    assert abs(th.rightmost_root(k_emp, emp).real) < 1e-9
    assert th.is_stable(0.99 * k_emp, emp) and not th.is_stable(1.01 * k_emp, emp)
    # Repeated values are merged: a long trace costs as much as its distinct values.
    trace_law = th.empirical_delay(np.repeat([0.0, 1.0, 3.0], [2000, 5000, 3000]))
    assert th.rightmost_root(1.0, trace_law) == pytest.approx(th.rightmost_root(1.0, emp))


# --------------------------------------------------------------------------------------------
# Stationary variance and hitting times.


@pytest.mark.parametrize("k, c", [(1.0, 0.1), (1.0, 1.0), (1.0, 1.5), (0.5, 2.0)])
def test_kuchler_mensch_variance_matches_parseval(k, c):
    closed = th.stationary_variance(k, c, noise_scale=0.7)
    assert closed == pytest.approx(0.49 * (1 + math.sin(k * c)) / (2 * k * math.cos(k * c)))
    numeric = th.stationary_variance(k, c, noise_scale=0.7, method="parseval")
    assert numeric == pytest.approx(closed, rel=1e-6)
    assert th.stationary_variance(k, math.pi / (2 * k) * 1.01) == math.inf


def test_ou_and_exponential_variance():
    assert th.stationary_variance(2.0, 0.0, noise_scale=3.0) == pytest.approx(9.0 / 4.0)
    law = th.exponential_delay(0.8)
    closed = th.stationary_variance(1.5, law, noise_scale=1.0)
    assert closed == pytest.approx((1 + 1.5 * 0.8) / 3.0)
    assert th.stationary_variance(1.5, law, method="parseval") == pytest.approx(closed, 1e-6)


def test_constant_delay_variance_against_euler_maruyama():
    """Simulate dx = −k x(t − c) dt + g dB and compare the long-run variance."""
    k, c, g, dt = 1.0, 0.8, 1.0, 0.01
    lag = int(round(c / dt))
    rng = np.random.default_rng(0)  # test-side randomness only
    paths, steps, burn = 400, 20_000, 2_000
    history = np.zeros((lag + 1, paths))
    total, count = 0.0, 0
    for t in range(steps):
        x, old = history[t % (lag + 1)], history[(t + 1) % (lag + 1)]
        new = x - k * old * dt + g * math.sqrt(dt) * rng.standard_normal(paths)
        history[(t + 1) % (lag + 1)] = new
        if t >= burn:
            total, count = total + np.mean(new**2), count + 1
    predicted = th.stationary_variance(k, c, noise_scale=g)
    assert total / count == pytest.approx(predicted, rel=0.06)  # dt bias + sampling error


def test_hitting_time():
    # One OU mode: t = log((ℓ0 − ℓ∞)/(ε − ℓ∞)) / (2r).
    t = th.hitting_time([0.5], [2.0], 0.1, [0.05])
    assert t == pytest.approx(math.log(1.95 / 0.05) / 1.0)
    rates, l0 = np.array([0.1, 1.0, 3.0]), np.array([1.0, 2.0, 0.5])
    t = th.hitting_time(rates, l0, 1e-3)
    assert float(th.expected_loss(t, rates, l0)) == pytest.approx(1e-3, rel=1e-9)
    assert th.hitting_time(rates, l0, 10.0) == 0.0
    assert th.hitting_time([0.1, -0.1], [1.0, 1.0], 1e-3) == math.inf
    assert th.hitting_time([1.0], [1.0], 0.01, [0.02]) == math.inf  # below the noise floor


# --------------------------------------------------------------------------------------------
# Discrete time.


@pytest.mark.parametrize("tau", [0, 1, 2, 5, 20, 100])
def test_constant_staleness_boundary_exact(tau):
    pmf = np.zeros(tau + 1)
    pmf[-1] = 1.0
    bound = th.constant_staleness_bound(tau)
    assert th.discrete_critical_gain(pmf) == pytest.approx(bound, rel=1e-12)
    below = th.discrete_spectral_radius(bound * (1 - 1e-6), pmf)
    above = th.discrete_spectral_radius(bound * (1 + 1e-6), pmf)
    assert below < 1 < above
    assert th.discrete_spectral_radius(bound, pmf) == pytest.approx(1.0, abs=1e-9)
    if tau <= 20:
        roots = th.discrete_characteristic_roots(bound * (1 + 1e-6), pmf)
        assert np.max(np.abs(roots)) == pytest.approx(above, abs=1e-10)


def test_discrete_radius_methods_agree_and_geometric_closed_form():
    rng = np.random.default_rng(1)  # test-side randomness only
    for size in (4, 11, 41):
        pmf = rng.random(size)
        for a in (0.01, 0.3, 1.0):
            by_roots = th.discrete_spectral_radius(a, pmf, method="roots")
            assert th.discrete_spectral_radius(a, pmf) == pytest.approx(by_roots, abs=1e-10)
        a_star = th.discrete_critical_gain(pmf)
        assert th.discrete_spectral_radius(a_star, pmf) == pytest.approx(1.0, abs=1e-9)
    for n in (2, 8, 32):
        # Truncating the geometric tail at mass ε moves roots of modulus ≈ √q by ≈ √ε.
        pmf = th.worker_staleness(n, workers.exponential(1.0), tail=1e-18)
        for a in (0.01, 0.2, 1.0):
            closed = th.geometric_spectral_radius(a, 1 / n)
            assert th.discrete_spectral_radius(a, pmf) == pytest.approx(closed, abs=1e-8)


def test_half_step_delay_matches_discrete_boundary():
    """The SDDE with D = (τ + ½)/Λ reproduces 2 sin(π/(2(2τ + 1))) up to O(τ⁻²)."""
    for tau in (3, 20, 80):
        pmf = np.zeros(tau + 1)
        pmf[-1] = 1.0
        rate = 7.0
        sdde = th.critical_gain(th.staleness_delay(pmf, rate)) / rate
        x = math.pi / (2 * tau + 1)
        assert sdde == pytest.approx(x)
        assert abs(sdde / th.constant_staleness_bound(tau) - 1) < x * x / 20
        plain = th.critical_gain(th.staleness_delay(pmf, rate, half_step=False)) / rate
        assert plain / th.constant_staleness_bound(tau) - 1 > 1 / (2 * tau + 1) - x * x / 20


def test_mean_square_radius():
    pmf = np.zeros(6)
    pmf[-1] = 1.0
    for a in (0.05, 0.2):  # a constant delay has no randomness: ρ₂ = ρ²
        rho = th.discrete_spectral_radius(a, pmf)
        assert th.discrete_mean_square_radius(a, pmf) == pytest.approx(rho**2, rel=1e-8)
    assert th.discrete_mean_square_radius(0.3, [0.4, 0.6]) >= th.discrete_spectral_radius(
        0.3, [0.4, 0.6]
    ) ** 2 * (1 - 1e-12)
    # Against a Monte-Carlo second moment of the recursion with i.i.d. delays. (Kept short:
    # E[x²] is carried by ever rarer paths, so long Monte-Carlo horizons underestimate it.)
    weights = np.array([0.3, 0.2, 0.1, 0.4])
    a, steps, window, paths = 0.2, 110, 50, 40_000
    rng = np.random.default_rng(2)  # test-side randomness only
    x = np.ones((steps + 1, paths))
    taus = rng.choice(4, size=(steps, paths), p=weights)
    cols = np.arange(paths)
    for t in range(steps):
        x[t + 1] = x[t] - a * x[np.maximum(t - taus[t], 0), cols]
    second = np.mean(x**2, axis=1)
    measured = (second[steps] / second[steps - window]) ** (1 / window)
    assert measured == pytest.approx(th.discrete_mean_square_radius(a, weights), rel=0.01)
    assert measured > 1.05 * th.discrete_spectral_radius(a, weights) ** 2


def test_mean_trajectory_is_the_recursion():
    pmf, a = np.array([0.2, 0.3, 0.0, 0.5]), 0.3
    m = th.discrete_mean_trajectory(a, pmf, 200, initial=2.0)
    ref = [2.0]
    for t in range(200):
        ref.append(ref[t] - a * sum(p * ref[max(t - j, 0)] for j, p in enumerate(pmf)))
    np.testing.assert_allclose(m, ref, rtol=1e-12, atol=1e-300)
    rho = th.discrete_spectral_radius(a, pmf)
    assert abs(m[200] / m[150]) ** (1 / 50) == pytest.approx(rho, rel=0.05)  # oscillates


# --------------------------------------------------------------------------------------------
# Workers to SDDE.


def test_worker_mapping():
    det, expo = workers.deterministic(2.0), workers.exponential(2.0)
    sexp, logn = workers.shifted_exponential(1.0, 0.5), workers.lognormal(mean=1.0, cv=0.3)
    assert th.update_rate(8, det) == 4.0 and th.update_rate(8, 1.5, communication=0.5) == 4.0
    np.testing.assert_array_equal(th.worker_staleness(5, det), workers.parameter_server(5, det).pmf)
    model = workers.parameter_server(6, expo, max_delay=400)
    pmf = th.worker_staleness(6, expo)
    np.testing.assert_allclose(pmf[:100], model.pmf[:100], rtol=1e-8)
    for law in (det, expo, sexp, logn):
        for n in (1, 4, 16):
            pmf = th.worker_staleness(n, law)
            assert np.arange(pmf.size) @ pmf == pytest.approx(n - 1, rel=1e-6, abs=1e-9)
            delay = th.worker_delay(n, law)
            assert delay.mean == pytest.approx(law.mean * (n - 0.5) / n, rel=1e-3)
    assert th.worker_delay(4, det).kind == "constant"
    assert th.worker_delay(4, sexp).kind == "shifted"
    assert th.worker_delay(4, logn).kind == "empirical"


def test_optimal_num_workers_deterministic():
    """Constant compute times: divergence exactly where ηh_max ≥ 2 sin(π/(2(2n − 1)))."""
    lr, h = 0.1, np.array([0.1, 1.0])
    result = th.optimal_num_workers(lr, h, workers.deterministic(1.0), 1e-3, max_workers=24)
    bounds = [th.constant_staleness_bound(n - 1) for n in range(1, 25)]
    expected = next(n for n, b in zip(range(1, 25), bounds, strict=True) if lr * h.max() >= b)
    assert result.divergence_num_workers == expected
    assert np.all(result.stable == (result.grid < expected))
    assert 1 < result.num_workers < expected  # more workers are not always faster
    assert result.time_to_epsilon == result.times.min()
    assert np.all(np.isinf(result.times[~result.stable]))
    # Too few workers: the updates are fresh but rare; n* is much faster than n = 1.
    assert result.times[0] > 2 * result.time_to_epsilon


# --------------------------------------------------------------------------------------------
# Against the simulator: asgd.stale(optax.sgd) driven by workers.parameter_server.


def _run_quadratic(model, eigenvalues, learning_rates, steps, num_seeds):
    """x after every update of stale SGD on ½Σ h x², for each learning rate and seed."""
    h = jnp.asarray(eigenvalues, jnp.float32)

    def one(lr, key):
        tx = asgd.stale(optax.sgd(lr), delay=model)
        x = jnp.ones_like(h)
        state = asgd.reseed(tx.init(x), key)

        def body(carry, _):
            x, state = carry
            grads = h * asgd.stale_params(state, x)
            updates, state = tx.update(grads, state, x)
            x = optax.apply_updates(x, updates)
            return (x, state), x

        return jax.lax.scan(body, (x, state), None, length=steps)[1]

    keys = jax.random.split(jax.random.key(0), num_seeds)
    lrs = jnp.asarray(learning_rates, jnp.float32)
    run = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))
    return np.asarray(run(lrs, keys), np.float64)  # (lr, seed, step, mode)


def _fit_rate(values, times, rate_guess):
    """Decay rate of |values| against ``times`` where it has fallen by e^{5} to e^{60}.

    The envelope is a running RMS over 8 samples (oscillating modes); float32 keeps e^{−60}.
    """
    envelope = np.sqrt(np.convolve(values**2, np.ones(8), "valid") / 8)
    times = times[: envelope.size]
    start = np.searchsorted(times, times[0] + 5.0 / rate_guess)
    stop = np.searchsorted(times, times[0] + 60.0 / rate_guess)
    assert stop - start > 40, "run too short to fit a rate"
    return -np.polyfit(times[start:stop], np.log(envelope[start:stop]), 1)[0]


@pytest.mark.parametrize("num_workers", [2, 5])
def test_decay_rate_equal_deterministic_workers(num_workers):
    """Exact case: staleness n − 1 after the start-up, so the discrete rate is exact.

    Tolerance: 1e-5 relative per update (measured: ~5e-8; float32 trajectory, finite fitting
    window); the SDDE rate per unit time, 1.5 % (measured: ≤ 0.85 %; the continuous model's
    error is O((ηh)²) at these step sizes).
    """
    law = workers.deterministic(1.0)
    model = workers.parameter_server(num_workers, law)
    h = np.array([0.05, 0.2])
    lr = 0.2 * th.constant_staleness_bound(num_workers - 1) / h.max()
    steps = 4000
    xs = _run_quadratic(model, h, [lr], steps, 1)[0, 0]
    key = jax.random.split(jax.random.key(0), 1)[0]  # the key of the run's delay stream
    clock = np.asarray(workers.simulate(model, key, steps).time, np.float64)
    sdde = th.predict(num_workers, lr, h, law, 1e-6, method="sdde").rates
    for i, hi in enumerate(h):
        per_update = th.discrete_decay_rate(lr * hi, model.pmf)
        measured = _fit_rate(xs[:, i], np.arange(steps, dtype=np.float64), per_update)
        assert measured == pytest.approx(per_update, rel=1e-5)
        measured_time = _fit_rate(xs[:, i], clock, sdde[i])
        assert measured_time == pytest.approx(sdde[i], rel=0.015)


def test_decay_rate_exponential_workers():
    """Random delays: the mean over seeds follows the Geometric(1/n) mean dynamics.

    Tolerance 2 % (measured: ≤ 0.3 %; 32 seeds, and the simulated staleness sequence is
    correlated where the theory's is i.i.d.).
    """
    n, law = 8, workers.exponential(1.0)
    model = workers.parameter_server(n, law, max_delay=20 * n)
    h = np.array([0.02, 0.1])
    lr = 0.25 / (n * h.max())
    steps = 3000
    xs = _run_quadratic(model, h, [lr], steps, 32)[0].mean(axis=0)
    for i, hi in enumerate(h):
        predicted = -math.log(th.geometric_spectral_radius(lr * hi, 1 / n))
        measured = _fit_rate(xs[:, i], np.arange(steps, dtype=np.float64), predicted)
        assert measured == pytest.approx(predicted, rel=0.02)


@pytest.mark.parametrize("num_workers", [2, 3, 6])
def test_deterministic_workers_diverge_beyond_boundary(num_workers):
    model = workers.parameter_server(num_workers, workers.deterministic(1.0))
    bound = th.discrete_critical_gain(th.worker_staleness(num_workers, 1.0))
    factors = np.array([0.95, 1.05])
    xs = _run_quadratic(model, [1.0], factors * bound, 3000, 1)[:, 0, -200:, 0]
    assert np.max(np.abs(xs[0])) < 1e-3  # converging side
    assert not np.all(np.isfinite(xs[1])) or np.max(np.abs(xs[1])) > 1e3  # diverging side


def test_random_workers_boundary():
    """Shifted-exponential workers (cycle CV 0.2): the fluid-law boundary separates the runs.

    Exponential workers: runs converge below the mean-square boundary, which is far below
    the boundary of the mean dynamics (ηh < 4n − 2 for geometric staleness).
    """
    n, law = 8, workers.shifted_exponential(1.0, 0.25)
    model = workers.parameter_server(n, law, max_delay=8 * n)
    bound = th.discrete_critical_gain(th.worker_staleness(n, law))
    xs = _run_quadratic(model, [1.0], [0.85 * bound, 1.15 * bound], 3000, 6)[:, :, -200:, 0]
    assert np.all(np.max(np.abs(xs[0]), axis=-1) < 1e-2)
    assert np.all(np.isnan(xs[1]).any(-1) | (np.max(np.abs(xs[1]), axis=-1) > 1e2))

    n, law = 4, workers.exponential(1.0)
    pmf = th.worker_staleness(n, law)
    model = workers.parameter_server(n, law, max_delay=20 * n)
    ms_bound = _bisect(lambda a: th.discrete_mean_square_radius(a, pmf) < 1, 1e-3, 4.0)
    assert th.discrete_critical_gain(pmf) == pytest.approx(4 * n - 2, rel=1e-6)
    assert ms_bound < (4 * n - 2) / 10
    xs = _run_quadratic(model, [1.0], [0.9 * ms_bound], 2000, 6)[0, :, -200:, 0]
    assert np.all(np.max(np.abs(xs), axis=-1) < 1e-3)


@pytest.mark.parametrize(
    "law, num_workers",
    [(workers.deterministic(1.0), 4), (workers.shifted_exponential(1.0, 0.25), 8)],
)
def test_predicted_time_to_epsilon_matches_simulation(law, num_workers):
    """Wall-clock time until ½Σhx² stays below ε: prediction vs median of 8 simulated runs.

    Tolerance 2 % (measured: ≤ 0.3 %; the fluid staleness law of shifted-exponential workers
    is an approximation, and the simulated start-up is bursty).
    """
    h, lr, eps, steps, seeds = np.array([0.05, 0.3, 1.0]), 0.05, 1e-4, 2500, 8
    model = workers.parameter_server(num_workers, law, max_delay=8 * num_workers)
    pred = th.predict(num_workers, lr, h, law, eps)
    xs = _run_quadratic(model, h, [lr], steps, seeds)[0]
    losses = 0.5 * np.sum(h * xs**2, axis=-1)
    keys = jax.random.split(jax.random.key(0), seeds)
    clocks = np.asarray(jax.vmap(lambda k: workers.simulate(model, k, steps).time)(keys))
    pairs = zip(losses, clocks, strict=True)
    settle = [clock[np.nonzero(loss > eps)[0][-1] + 1] for loss, clock in pairs]
    assert np.median(settle) == pytest.approx(pred.time_to_epsilon, rel=0.02)
    sdde = th.predict(num_workers, lr, h, law, eps, method="sdde").time_to_epsilon
    assert sdde == pytest.approx(pred.time_to_epsilon, rel=0.02)


def _bisect(predicate, lo, hi):
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if predicate(mid) else (lo, mid)
    return lo


def test_variance_floor_against_simulation():
    """Noisy gradients: the stationary loss h V/2 of the SDDE vs stale SGD with noise."""
    n, law, h, lr, sigma = 4, workers.deterministic(1.0), 0.5, 0.1, 1.0
    model = workers.parameter_server(n, law)
    pred = th.predict(n, lr, [h], law, 1.0, noise_std=sigma, method="sdde")
    tx = asgd.stale(optax.sgd(lr), delay=model)

    def one(key):
        x = jnp.zeros(())
        state = tx.init(x)

        def body(carry, k):
            x, state = carry
            grads = h * asgd.stale_params(state, x) + sigma * jax.random.normal(k)
            updates, state = tx.update(grads, state, x)
            x = optax.apply_updates(x, updates)
            return (x, state), 0.5 * h * x**2

        return jax.lax.scan(body, (x, state), jax.random.split(key, 6000))[1]

    losses = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(3), 32))
    measured = float(jnp.mean(losses[:, 1000:]))
    assert measured == pytest.approx(pred.stationary_loss, rel=0.1)  # O(ηh) + sampling


# --------------------------------------------------------------------------------------------
# The fixed computation model (Rennala, Ringmaster, the lower bound).


def test_rennala_round_time_is_the_smallest_time_with_s_gradients():
    rng = np.random.default_rng(0)
    for _ in range(20):
        tau = rng.uniform(0.2, 5.0, size=rng.integers(1, 9))
        batch = int(rng.integers(1, 30))
        exact = th.rennala_round_time(tau, batch)
        # Brute force over every multiple c·τ_i up to the time worker 1 alone needs.
        candidates = np.sort((np.arange(1, batch + 1)[:, None] * tau[None, :]).ravel())
        counts = np.floor(candidates[:, None] / tau[None, :] + 1e-12).sum(axis=1)
        assert exact == candidates[np.argmax(counts >= batch)]
        bounds = th.rennala_round_bounds(tau, batch)
        assert bounds.lower <= exact <= bounds.upper <= bounds.upper_without_stops
        assert bounds.upper_without_stops <= 2 * bounds.upper
    # Equal workers: ⌈S/n⌉ rounds of τ; one worker: S·τ.
    assert th.rennala_round_time([2.0] * 4, 9) == 6.0
    assert th.rennala_round_time([0.5], 7) == 3.5


def test_harmonic_means_and_ringmaster_bound():
    tau = [4.0, 1.0, 2.0]
    np.testing.assert_allclose(th.harmonic_means(tau), [1.0, 2 / 1.5, 3 / 1.75])
    # 2 min_m (R + m)/Σ_{i≤m} 1/τ_i with R = 3: m = 1 → 4, m = 2 → 10/3, m = 3 → 24/7.
    assert th.ringmaster_time_bound(tau, 3) == pytest.approx(2 * 10 / 3)
    assert th.ringmaster_time_bound(tau, 3, 7) == pytest.approx(3 * 2 * 10 / 3)
    assert th.ringmaster_threshold(2.0, 0.3) == 7 and th.ringmaster_threshold(0.0, 1.0) == 1


def test_time_to_epsilon_side_by_side():
    problem = dict(smoothness=1.0, initial_gap=1.0, noise_variance=1.0, epsilon=0.1)
    slow = th.time_to_epsilon([1, 1, 1, 1, 50], **problem)
    assert slow.batch_size == slow.threshold == 10 and slow.num_fastest == 4
    # One straggler: synchronous SGD waits for it, Rennala and Ringmaster ignore it.
    assert slow.rennala < slow.rennala_without_stops < slow.synchronous
    assert slow.ringmaster < slow.asgd
    orders = th.time_complexities([1, 1, 1, 1, 50], **problem)
    assert orders["rennala"] == orders["ringmaster"] == orders["lower_bound"] == slow.lower_bound
    assert orders["lower_bound"] < orders["asgd"] < orders["synchronous"]
    # τ_i = 1 + √i: the optimum uses a fraction of the 100 workers.
    profile = th.time_to_epsilon(1 + np.sqrt(np.arange(1, 101)), **problem)
    assert 1 < profile.num_fastest < 100
    with pytest.raises(ValueError, match="compute_times"):
        th.time_to_epsilon([1.0, 0.0], **problem)
    with pytest.raises(ValueError, match="compute_times"):
        th.rennala_round_time([1.0, float("nan")], 3)
    with pytest.raises(ValueError, match="batch_size"):
        th.rennala_round_time([1.0], 0)
    with pytest.raises(ValueError, match="threshold"):
        th.ringmaster_time_bound([1.0], 0)
    with pytest.raises(ValueError, match="epsilon"):
        th.time_to_epsilon([1.0], **{**problem, "epsilon": 0.0})


# --------------------------------------------------------------------------------------------
# Bad inputs and exactness at double roots.


@pytest.mark.parametrize("tau", [1, 3, 8, 30])
def test_spectral_radius_exact_and_fast_at_and_near_the_double_root(tau):
    import time

    a_star = tau**tau / (tau + 1) ** (tau + 1)  # x_{t+1} = x_t − a x_{t−τ} decays fastest
    pmf = np.eye(tau + 1)[tau]
    start = time.perf_counter()
    assert th.discrete_spectral_radius(a_star, pmf) == pytest.approx(tau / (tau + 1), rel=1e-12)
    for rel in (1e-12, -1e-12, -1e-9, 1e-6, -1e-6):
        a = a_star * (1 + rel)
        exact = np.max(np.abs(np.roots(np.r_[1.0, -1.0, np.zeros(tau - 1), a])))
        assert th.discrete_spectral_radius(a, pmf) == pytest.approx(exact, rel=1e-7)
    assert time.perf_counter() - start < 5.0  # was 6–14 s per call (bisection fallback)


def test_pmf_and_trace_are_explicit_arguments():
    assert th.discrete_spectral_radius(0.25, pmf=[0, 1]) == pytest.approx(0.5)
    assert th.discrete_spectral_radius(0.25, [0.0, 1.0]) == pytest.approx(0.5)  # floats: pmf
    as_trace = th.discrete_spectral_radius(0.25, trace=[0, 1])
    assert as_trace == pytest.approx(th.discrete_spectral_radius(0.25, pmf=[0.5, 0.5]))
    with pytest.warns(DeprecationWarning, match="trace="):  # ambiguous: read as before, warned
        assert th.discrete_spectral_radius(0.25, [0, 1]) == as_trace
    np.testing.assert_array_equal(th.accepted_weights(pmf=[2, 0, 6]), [0.25, 0.0, 0.75])
    with pytest.raises(TypeError, match="once"):
        th.discrete_critical_gain([0.5, 0.5], pmf=[0.5, 0.5])
    with pytest.raises(TypeError, match="once"):
        th.discrete_critical_gain()
    with pytest.raises(ValueError, match="trace"):
        th.discrete_critical_gain(trace=[0.5, 1.0])
    law = th.staleness_delay(trace=[1, 1], update_rate=2.0)
    assert law.mean == pytest.approx(0.75)


def test_worker_theory_rejects_bad_compute_times_and_worker_counts():
    for bad in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="compute_time"):
            th.worker_staleness(4, compute_time=bad)
        with pytest.raises(ValueError, match="compute_time"):
            th.worker_delay(4, bad)
    with pytest.raises(TypeError, match="num_workers"):
        th.optimal_num_workers(0.1, [1.0], 1.0, 0.1, num_workers=[2.5])
    with pytest.raises(ValueError, match="communication"):
        th.worker_staleness(4, 1.0, communication=-0.5)
    grid = th.optimal_num_workers(0.1, [1.0], 1.0, 0.1, num_workers=[2.0, np.int64(3)]).grid
    np.testing.assert_array_equal(grid, [2, 3])
