"""Parameter-server simulation: exact sequences, queueing identities, laws, protocols."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import asgd_jax as asgd
from asgd_jax import workers

KEY = jax.random.key(0)
NUM = 20_000  # updates per statistical run: one scan each, about a second on 2 cores.


def _np(trace):
    return jax.tree.map(np.asarray, trace)


def _run_states(model, key, num_events):
    """Every state after each arrival (clocks included), via one scan over ``arrival``."""

    def body(state, _):
        state = model.arrival(state)
        return state, state

    return _np(
        jax.jit(lambda k: jax.lax.scan(body, model.init(k), None, length=num_events)[1])(key)
    )


def _reference(table, *, protocol="async", threshold=None, k=1, num_events):
    """A plain-Python event loop with the documented semantics (absolute float64 times)."""
    table = np.asarray(table, np.float64)
    n = table.shape[1]
    finish = [table[0, i] for i in range(n)]
    pulled, clock, group = [0] * n, [0] * n, []
    version, out = 0, []
    drops = threshold is not None and protocol != "ssp"
    for _ in range(num_events):
        j = min(range(n), key=lambda i: (finish[i], i))
        now = finish[j]
        tau = version - pulled[j]
        accepted = not (drops and tau > threshold)
        clock[j] += 1
        if accepted:
            group.append(tau)
        applied = accepted and len(group) == k
        if applied:
            version, group = version + 1, []
        if protocol == "ssp":
            low = min(clock)
            finish[j] = math.inf
            for i in range(n):
                if finish[i] == math.inf and clock[i] <= low + threshold:
                    finish[i], pulled[i] = now + table[clock[i], i], version
        else:
            finish[j], pulled[j] = now + table[clock[j], j], version
        out.append((tau, j, accepted, applied, now))
    return [np.array(c) for c in zip(*out, strict=True)]


# --------------------------------------------------------------------------------------------
# Compute-time laws.

LAWS = [
    workers.deterministic(1.5),
    workers.exponential(2.0),
    workers.shifted_exponential(0.5, 1.5),
    workers.lognormal(mean=2.0, cv=0.8),
    workers.pareto(1.0, 3.0),
]


@pytest.mark.parametrize("law", LAWS, ids=lambda law: law.name)
def test_law_sampling_quantiles_and_moments(law):
    u = np.linspace(0.01, 0.99, 99)
    np.testing.assert_allclose(
        np.asarray(law.sample(jnp.asarray(u, jnp.float32))), law.ppf(u), 1e-5
    )
    if not isinstance(law, workers.Deterministic):
        np.testing.assert_allclose(law.cdf(law.ppf(u)), u, atol=1e-9)
    draws = np.asarray(law.draw(jax.random.key(1), (200_000,)), np.float64)
    assert abs(draws.mean() - law.mean) < 0.02 * law.mean
    assert draws.min() >= law.ppf(0.0) - 1e-6


@pytest.mark.parametrize("law", LAWS[:3], ids=lambda law: law.name)
def test_closed_form_laplace_matches_quadrature(law):
    s = np.array([0.0, 0.3, 2.0, 0.5 + 1.5j])
    numeric = workers.ComputeTime.laplace(law, s) if law.var > 0 else np.exp(-s * law.time)
    np.testing.assert_allclose(law.laplace(s), numeric, rtol=1e-6, atol=1e-9)
    assert law.laplace(0.0) == 1.0


def test_numerical_laplace_of_heavy_laws():
    # E[e^{-sT}] ≥ e^{-s E[T]} (Jensen) and matches a Monte Carlo average.
    for law in LAWS[3:]:
        draws = np.asarray(law.draw(jax.random.key(2), (400_000,)), np.float64)
        for s in (0.2, 1.0):
            value = float(law.laplace(s))
            assert value >= math.exp(-s * law.mean)
            assert abs(value - np.exp(-s * draws).mean()) < 3e-3
    with pytest.raises(ValueError, match="Re"):
        LAWS[4].laplace(-1.0)


def test_expected_order_statistic_exact_cases():
    # Exponential: E[X_(k:n)] = mean·(H_n − H_{n−k}).
    law = workers.exponential(2.0)
    harmonic = lambda m: sum(1.0 / i for i in range(1, m + 1))
    for k in (1, 5, 8):
        expected = 2.0 * (harmonic(8) - harmonic(8 - k))
        assert workers.expected_order_statistic(law, k, 8) == pytest.approx(expected, rel=1e-7)
    # Shift and heterogeneous deterministic times are exact.
    det = workers.deterministic(1.0)
    assert workers.expected_order_statistic(det, 2, 3, multipliers=[3, 1, 2], shift=0.5) == 2.5
    # Two exponential groups: the minimum is exponential with the summed rate.
    m = [1.0, 1.0, 4.0]
    assert workers.expected_order_statistic(law, 1, 3, multipliers=m) == pytest.approx(
        1.0 / (2 / 2.0 + 1 / 8.0), rel=1e-6
    )
    assert workers.expected_order_statistic(workers.pareto(1.0, 0.5), 3, 3) == math.inf


def test_law_validation():
    with pytest.raises(ValueError, match="mean"):
        workers.exponential(0.0)
    with pytest.raises(TypeError, match="time"):
        workers.deterministic("1")
    with pytest.raises(ValueError, match="alpha"):
        workers.pareto(1.0, -2.0)
    with pytest.raises(ValueError, match="cv"):
        workers.lognormal(0.0, 1.0, cv=0.5)
    assert workers.lognormal(mean=3.0, cv=0.5).mean == pytest.approx(3.0)


# --------------------------------------------------------------------------------------------
# Exact sequences and tie-breaking.


@pytest.mark.parametrize("use_jit", [False, True])
def test_equal_deterministic_workers_exact_sequence(use_jit):
    n = 4
    model = workers.parameter_server(n, 2.0, comm_time=0.5)
    assert model.max_delay == n - 1 and model.update_rate == n / 2.5
    next_ = jax.jit(model.next) if use_jit else model.next
    state = model.init(KEY)
    taus, workers_seen = [], []
    for _ in range(3 * n):
        tau, state = next_(state)
        taus.append(int(tau))
        workers_seen.append(int(state.worker))
    assert taus == [0, 1, 2, 3] + [3] * (2 * n)
    assert workers_seen == list(range(n)) * 3
    assert float(state.time) == 3 * 2.5 and int(state.version) == 3 * n
    trace = _np(workers.simulate(model, KEY, 3 * n))
    np.testing.assert_array_equal(trace.staleness, taus)
    np.testing.assert_array_equal(trace.time, np.repeat([2.5, 5.0, 7.5], n))
    longer = _np(workers.simulate(workers.parameter_server(7, 0.3), KEY, 70)).staleness
    np.testing.assert_array_equal(longer, list(range(7)) + [6] * 63)


def test_synchronous_rounds_deterministic():
    model = workers.parameter_server(4, 1.0, speeds=[1, 1, 1, 0.5], protocol="k_sync")
    assert model.max_delay == 0 and model.update_rate == 0.5
    trace = _np(workers.simulate(model, KEY, 6))
    np.testing.assert_array_equal(trace.staleness, 0)
    np.testing.assert_array_equal(trace.time, 2.0 * np.arange(1, 7))
    np.testing.assert_array_equal(trace.worker, 3)
    # K = 3 of 4: the straggler is cancelled every round.
    model = workers.parameter_server(4, 1.0, speeds=[1, 1, 1, 0.5], protocol="k_sync", k=3)
    trace = _np(workers.simulate(model, KEY, 6))
    np.testing.assert_array_equal(trace.time, np.arange(1, 7))
    np.testing.assert_array_equal(trace.dropped, 1)


def test_matches_reference_event_loop():
    # Heterogeneous integer cycle times (exact in float32) and random times, four protocols.
    cases = [
        (dict(speeds=[1, 1, 0.5, 0.25], compute_time=1.0), {}),
        (dict(speeds=[1, 1, 0.5, 0.25], compute_time=1.0, max_staleness=2), {"threshold": 2}),
        (
            dict(speeds=[1, 1, 0.5, 0.25], compute_time=1.0, protocol="ssp", max_staleness=1),
            {"protocol": "ssp", "threshold": 1},
        ),
        (
            dict(compute_time=workers.exponential(1.0), protocol="ssp", max_staleness=2),
            {"protocol": "ssp", "threshold": 2},
        ),
        (
            dict(compute_time=workers.lognormal(0.0, 1.0), num_slow=1, max_staleness=3),
            {"threshold": 3},
        ),
        (
            dict(compute_time=workers.exponential(1.0), protocol="k_async", k=3, max_delay=60),
            {"k": 3},
        ),
    ]
    num = 400
    for kwargs, ref_kwargs in cases:
        model = workers.parameter_server(4, max_delay=kwargs.pop("max_delay", None), **kwargs)
        table = workers.cycle_times(model, KEY, num + 1)
        tau, worker, accepted, applied, time = _reference(table, num_events=num, **ref_kwargs)
        trace = _np(workers.simulate_events(model, KEY, num))
        np.testing.assert_array_equal(trace.staleness, tau, err_msg=model.name)
        np.testing.assert_array_equal(trace.worker, worker, err_msg=model.name)
        np.testing.assert_array_equal(trace.accepted, accepted, err_msg=model.name)
        np.testing.assert_array_equal(trace.applied, applied, err_msg=model.name)
        np.testing.assert_allclose(trace.time, time, rtol=1e-5, err_msg=model.name)


# --------------------------------------------------------------------------------------------
# Queueing facts.

STEADY_LAWS = [
    workers.exponential(1.0),
    workers.shifted_exponential(0.5, 0.5),
    workers.lognormal(mean=1.0, cv=1.5),
    workers.pareto(1.0, 2.5),
]


@pytest.mark.parametrize("law", STEADY_LAWS, ids=lambda law: law.name)
def test_mean_staleness_and_update_rate(law):
    n = 8
    model = workers.parameter_server(n, law, max_delay=40 * n)
    states = jax.jit(
        lambda k: jax.lax.scan(lambda s, _: model.next(s)[::-1], model.init(k), None, length=NUM)
    )
    final, taus = states(KEY)
    taus = np.asarray(taus)
    # Exact (Little's law): each update is seen by the n − 1 workers then in flight, so
    # Σ τ over arrived gradients + Σ_i (version − pulled_i) = (n − 1)·version.
    in_flight = int(jnp.sum(final.version - final.pulled))
    assert int(final.clipped) == 0
    assert int(taus.sum()) + in_flight == (n - 1) * NUM
    # Hence the mean staleness is n − 1 up to the O(n²/NUM) in-flight term.
    assert abs(taus.mean() - (n - 1)) < 0.05
    # Update rate n / E[T]: the superposition of n renewal processes.
    rate = NUM / float(final.time)
    assert model.update_rate == pytest.approx(n / law.mean)
    assert rate == pytest.approx(model.update_rate, rel=0.03)


def test_exponential_staleness_is_geometric():
    n = 8
    model = workers.parameter_server(n, workers.exponential(1.0), max_delay=200)
    taus = np.asarray(workers.simulate(model, KEY, NUM).staleness)[20 * n :]
    top = 40
    observed = np.bincount(np.minimum(taus, top), minlength=top + 1)
    p = 1.0 / n
    pmf = p * (1 - p) ** np.arange(top + 1)
    pmf[-1] = (1 - p) ** top
    fit = scipy.stats.chisquare(observed, pmf * observed.sum())
    assert fit.pvalue > 1e-3
    np.testing.assert_allclose(model.pmf[:top], pmf[:top], rtol=1e-12)
    # The test has power: log-normal times with the same mean staleness are rejected.
    other = workers.parameter_server(n, workers.lognormal(mean=1.0, cv=1.0), max_delay=200)
    taus = np.asarray(workers.simulate(other, KEY, NUM).staleness)[20 * n :]
    observed = np.bincount(np.minimum(taus, top), minlength=top + 1)
    assert abs(taus.mean() - (n - 1)) < 0.1
    assert scipy.stats.chisquare(observed, pmf * observed.sum()).pvalue < 1e-6


def test_sync_slower_than_async_by_order_statistics():
    n, law = 8, workers.shifted_exponential(1.0, 1.0)
    kwargs = dict(num_slow=2, slow_factor=3.0)
    asyn = workers.parameter_server(n, law, max_delay=40 * n, **kwargs)
    sync = workers.parameter_server(n, law, protocol="k_sync", **kwargs)
    k_sync = workers.parameter_server(n, law, protocol="k_sync", k=6, **kwargs)
    mult = [1.0] * 6 + [3.0] * 2
    rounds = 5_000
    # Gradients per unit time: async Σ 1/E[T_i]; sync n / E[max_i T_i]; K-sync K / E[T_(K)].
    async_rate = NUM / float(workers.simulate(asyn, KEY, NUM).time[-1])
    sync_rate = n * rounds / float(workers.simulate(sync, KEY, rounds).time[-1])
    k_rate = 6 * rounds / float(workers.simulate(k_sync, KEY, rounds).time[-1])
    assert async_rate == pytest.approx(6 / 2.0 + 2 / 6.0, rel=0.03)
    e_max = workers.expected_order_statistic(law, n, n, multipliers=mult)
    e_six = workers.expected_order_statistic(law, 6, n, multipliers=mult)
    assert sync_rate == pytest.approx(n / e_max, rel=0.03)
    assert k_rate == pytest.approx(6 / e_six, rel=0.03)
    assert sync.update_rate == pytest.approx(1 / e_max) and k_sync.update_rate == 1 / e_six
    # The slowdown of synchronous rounds is the order-statistic ratio, well above 1.
    predicted = (6 / 2.0 + 2 / 6.0) * e_max / n
    assert predicted > 1.5
    assert async_rate / sync_rate == pytest.approx(predicted, rel=0.05)


# --------------------------------------------------------------------------------------------
# Bounded staleness: drop, SSP, K-async.


def test_drop_threshold_respected_exactly():
    s, n = 3, 8
    model = workers.parameter_server(n, workers.exponential(1.0), num_slow=2, max_staleness=s)
    assert model.max_delay == s and model.update_rate is None
    events = _np(workers.simulate_events(model, KEY, 5_000))
    np.testing.assert_array_equal(events.accepted, events.staleness <= s)
    assert (~events.accepted).sum() > 100  # the threshold does bind
    np.testing.assert_array_equal(events.applied, events.accepted)
    updates = _np(workers.simulate(model, KEY, 3_000))
    assert updates.staleness.max() == s and not updates.clipped.any()
    # The first 3,000 accepted arrivals, and the drops between them, are the updates.
    accepted = events.staleness[events.accepted][:3_000]
    np.testing.assert_array_equal(updates.staleness, accepted)
    position = np.flatnonzero(events.accepted)[:3_000]
    np.testing.assert_array_equal(updates.dropped, np.diff(position, prepend=-1) - 1)
    # Drops re-pull, so every arrival still obeys the queueing identity.
    state = model.init(KEY)
    run = jax.jit(lambda s: jax.lax.fori_loop(0, 5_000, lambda i, s: model.arrival(s), s))
    state = run(state)
    assert int(state.dropped) == (~events.accepted).sum()
    in_flight = int(jnp.sum(state.version - state.pulled))
    assert events.staleness.sum() + in_flight == (n - 1) * int(state.version)


def test_ssp_blocks_fast_workers_exactly():
    s, n = 1, 6
    model = workers.parameter_server(
        n, workers.exponential(1.0), protocol="ssp", max_staleness=s, num_slow=1, slow_factor=5
    )
    assert model.max_delay == (n - 1) * (2 * s + 1)
    states = _run_states(model, KEY, 3_000)
    gap = states.clock.max(axis=1) - states.clock.min(axis=1)
    assert gap.max() == s + 1  # a worker may finish the clock it started, never more
    blocked = np.isinf(states.finish)
    assert blocked.any()
    # A worker computes only while its clock is at most S ahead of the slowest.
    computing = ~blocked
    low = states.clock.min(axis=1, keepdims=True)
    assert np.all(
        states.clock[computing] <= np.broadcast_to(low + s, states.clock.shape)[computing]
    )
    # A blocked worker is exactly one that may not start.
    np.testing.assert_array_equal(blocked, states.clock > low + s)
    assert states.staleness.max() <= model.max_delay and states.clipped[-1] == 0
    # S = 0 is bulk-synchronous: equal workers run in lock-step rounds.
    bsp = workers.parameter_server(3, 1.0, protocol="ssp", max_staleness=0)
    trace = _np(workers.simulate(bsp, KEY, 9))
    np.testing.assert_array_equal(trace.staleness, [0, 1, 2] * 3)
    np.testing.assert_array_equal(trace.time, np.repeat([1.0, 2.0, 3.0], 3))


def test_k_async_groups():
    n, k = 8, 4
    law = workers.exponential(1.0)
    model = workers.parameter_server(n, law, protocol="k_async", k=k, max_delay=60)
    assert model.update_rate == pytest.approx(n / k) and model.mean_staleness == (n - 1) / k
    events = _np(workers.simulate_events(model, KEY, k * 2_000))
    np.testing.assert_array_equal(np.flatnonzero(events.applied), np.arange(k - 1, k * 2_000, k))
    groups = events.staleness.reshape(-1, k)
    updates = _np(workers.simulate(model, KEY, 2_000, method="events"))
    np.testing.assert_array_equal(updates.staleness, (groups.sum(1) + k // 2) // k)
    np.testing.assert_array_equal(updates.time, events.time[k - 1 :: k])
    # Every gradient is seen by the n − 1 workers in flight at each update: mean (n − 1)/K.
    assert abs(groups.mean() - (n - 1) / k) < 0.05
    oldest = workers.parameter_server(
        n, law, protocol="k_async", k=k, max_delay=60, group_staleness="max"
    )
    np.testing.assert_array_equal(workers.simulate(oldest, KEY, 2_000).staleness, groups.max(1))
    # Equal deterministic workers: derived bound ⌊(n − 1 + K − 1)/K⌋ is attained.
    det = workers.parameter_server(n, 1.0, protocol="k_async", k=k, group_staleness="max")
    assert det.max_delay == (n + k - 2) // k
    assert int(workers.simulate(det, KEY, 40).staleness.max()) == det.max_delay


def test_max_delay_derivation_and_clipping():
    law = workers.exponential(1.0)
    with pytest.raises(ValueError, match="max_delay"):
        workers.parameter_server(8, law)
    assert workers.parameter_server(8, law, max_staleness=5).max_delay == 5
    assert workers.parameter_server(8, 1.0, speeds=[1] * 7 + [0.5]).max_delay == 14
    small = workers.parameter_server(8, law, max_delay=3)
    full = workers.parameter_server(8, law, max_delay=500)
    clipped = _np(workers.simulate(small, KEY, 2_000))
    raw = _np(workers.simulate(full, KEY, 2_000)).staleness
    np.testing.assert_array_equal(clipped.staleness, np.minimum(raw, 3))
    np.testing.assert_array_equal(clipped.clipped, raw > 3)
    state = small.init(KEY)
    state = jax.jit(lambda s: jax.lax.fori_loop(0, 2_000, lambda i, s: small.next(s)[1], s))(state)
    assert int(state.clipped) == (raw > 3).sum() > 0


def test_argument_validation():
    law = workers.exponential(1.0)
    with pytest.raises(ValueError, match="protocol"):
        workers.parameter_server(4, law, protocol="hogwild", max_delay=9)
    with pytest.raises(ValueError, match="max_staleness"):
        workers.parameter_server(4, law, protocol="ssp")
    with pytest.raises(ValueError, match="`k`"):
        workers.parameter_server(4, law, protocol="k_async", max_delay=9)
    with pytest.raises(ValueError, match="`k`"):
        workers.parameter_server(4, law, protocol="k_sync", k=5)
    with pytest.raises(ValueError, match="speeds"):
        workers.parameter_server(4, law, speeds=[1, 2], max_delay=9)
    with pytest.raises(ValueError, match="num_slow"):
        workers.parameter_server(4, law, num_slow=5, max_delay=9)
    with pytest.raises(ValueError, match="slow_factor"):
        workers.parameter_server(4, law, num_slow=1, slow_factor=0.5, max_delay=9)
    with pytest.raises(TypeError, match="compute_time"):
        workers.parameter_server(4, "fast")
    with pytest.raises(TypeError, match="WorkerModel"):
        workers.simulate(asgd.delays.constant(2), KEY, 5)


# --------------------------------------------------------------------------------------------
# Purity, vmap, and the stale wrapper.


def test_pure_function_of_key_and_vmap():
    model = workers.parameter_server(6, workers.lognormal(0.0, 0.5), max_staleness=4)
    keys = jax.random.split(jax.random.key(7), 3)
    batched = _np(jax.vmap(lambda k: workers.simulate(model, k, 200))(keys))
    for i in range(3):
        single = _np(workers.simulate(model, keys[i], 200))
        chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], batched), single)
    assert not np.array_equal(batched.staleness[0], batched.staleness[1])
    raw = _np(workers.simulate(model, jax.random.key_data(keys[0]), 200))
    chex.assert_trees_all_equal(raw, jax.tree.map(lambda x: x[0], batched))


def test_drives_stale_with_the_simulated_sequence():
    model = workers.parameter_server(4, workers.exponential(1.0), num_slow=1, max_staleness=3)
    tx = asgd.stale(optax.sgd(0.1), delay=model, seed=5)
    params = {"w": jnp.ones(3)}
    loss = lambda p: 0.5 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = carry
            tau = asgd.staleness(state)
            grads = jax.grad(loss)(asgd.stale_params(state, params))
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), tau

        return jax.lax.scan(step, (params, tx.init(params)), None, length=60)

    (params, state), taus = run(params)
    expected = workers.simulate(model, jax.random.key(5), 60).staleness
    np.testing.assert_array_equal(taus, expected)
    assert int(state.delay_state.dropped) > 0
    assert float(loss(params)) < 1.5


# --------------------------------------------------------------------------------------------
# The sorted (event-free) path.

SORTED_CASES = [
    dict(num_workers=8, compute_time=0.3),
    dict(num_workers=6, compute_time=1.0, speeds=[1, 1, 0.5, 0.25, 1, 0.5]),
    dict(num_workers=8, compute_time=workers.exponential(1.0), max_delay=400),
    dict(num_workers=6, compute_time=workers.lognormal(0.0, 1.0), num_slow=2, max_delay=600),
    dict(
        num_workers=5,
        compute_time=workers.exponential(1.0),
        comm_time=0.25,
        protocol="k_async",
        k=3,
        max_delay=60,
    ),
    dict(num_workers=5, compute_time=workers.exponential(1.0), protocol="k_sync", k=3),
]


def test_sorted_path_equals_event_path():
    # Both make the same double-float additions per worker: every field is bitwise equal.
    for kwargs in SORTED_CASES:
        model = workers.parameter_server(**kwargs)
        events = _np(workers.simulate(model, KEY, 3_000, method="events_reference"))
        fast = _np(workers.simulate(model, KEY, 3_000, method="sorted"))
        for name in events._fields:
            np.testing.assert_array_equal(
                getattr(fast, name), getattr(events, name), err_msg=f"{model.name} {name}"
            )
    # Equal deterministic workers: 0, 1, …, n − 1, n − 1, … with exact times.
    trace = _np(workers.simulate(workers.parameter_server(4, 2.0, comm_time=0.5), KEY, 12))
    np.testing.assert_array_equal(trace.staleness, [0, 1, 2, 3] + [3] * 8)
    np.testing.assert_array_equal(trace.worker, list(range(4)) * 3)
    np.testing.assert_array_equal(trace.time, np.repeat([2.5, 5.0, 7.5], 4))


def test_sorted_path_matches_float64_reference():
    model = workers.parameter_server(8, workers.exponential(1.0), num_slow=2, max_delay=400)
    num = 2_000
    tau, worker, _, _, time = _reference(workers.cycle_times(model, KEY, num), num_events=num)
    trace = _np(workers.simulate(model, KEY, num, method="sorted"))
    np.testing.assert_array_equal(trace.staleness, tau)
    np.testing.assert_array_equal(trace.worker, worker)
    # The double-float sum rounded once to float32: within half an ulp of the float64 sum.
    np.testing.assert_allclose(trace.time, time, rtol=2**-24)


def test_shared_time_words_and_long_runs_keep_the_exact_order():
    # 20,000 arrivals of 8 workers reach t ≈ 2,500, where float32 spacing (2.4e-4) is close
    # to the gaps between arrivals: many arrivals share their high word, and a float32
    # clock would order them by worker id. The pairs keep the float64 order, and the sorted
    # path ranks the shared words by their low words exactly like the event loop.
    model = workers.parameter_server(8, workers.exponential(1.0), max_delay=400)
    num = 20_000
    trace = _np(workers.simulate(model, KEY, num, method="sorted"))
    shared = np.sum(np.diff(trace.time) == 0)
    assert shared >= 10, shared  # the case does exercise the tie path
    reference = _np(workers.simulate(model, KEY, num, method="events_reference"))
    for name in trace._fields:
        np.testing.assert_array_equal(getattr(trace, name), getattr(reference, name), name)
    tau, worker, _, _, _ = _reference(workers.cycle_times(model, KEY, num), num_events=num)
    np.testing.assert_array_equal(trace.staleness, tau)
    np.testing.assert_array_equal(trace.worker, worker)


def test_equal_deterministic_workers_rank_by_id_past_the_tie_buffer():
    # 64 equal workers tie on every cycle: more shared time words than the small tie sort
    # holds, so one full sort ranks them; the order is still the worker id, round by round.
    from asgd_jax.workers import _sorted

    model = workers.parameter_server(64, 0.5)
    num = 6_000
    assert num > _sorted._TIES
    trace = _np(workers.simulate(model, KEY, num, method="sorted"))
    np.testing.assert_array_equal(trace.worker, np.arange(num) % 64)
    np.testing.assert_array_equal(trace.staleness, np.minimum(np.arange(num), 63))
    np.testing.assert_array_equal(trace.time, 0.5 * (np.arange(num) // 64 + 1))


def test_sorted_path_extends_past_a_short_horizon():
    # Infinite-mean Pareto cycles: the luckiest worker's horizon covers only 264 (key 0) and
    # 233 (key 1) of the 300 arrivals the default cycle count aims at, so the public sorted
    # path finishes these runs with the event loop from the state at the horizon.
    for alpha, seed in ((0.3, 0), (0.5, 1)):
        model = workers.parameter_server(8, workers.pareto(1.0, alpha), max_delay=4000)
        key = jax.random.key(seed)
        events = _np(workers.simulate(model, key, 300, method="events"))
        short = _np(workers.simulate(model, key, 300, method="sorted"))
        # Under an outer jit the complete program (fallbacks in the graph) is traced.
        traced = _np(jax.jit(lambda k: workers.simulate(model, k, 300, method="sorted"))(key))
        for name in short._fields:
            np.testing.assert_array_equal(getattr(short, name), getattr(events, name), name)
            np.testing.assert_array_equal(getattr(traced, name), getattr(events, name), name)


@pytest.mark.parametrize(
    "n, kwargs",
    [
        (1024, dict(compute_time=workers.exponential(1.0), num_slow=64, slow_factor=4.0)),
        (1024, dict(compute_time=workers.lognormal(mean=1.0, cv=1.5), comm_time=0.1)),
    ],
    ids=["exponential", "lognormal"],
)
def test_topped_up_tables_equal_the_event_loop(n, kwargs):
    # From 1024 workers the table is sized for the typical worker and the earliest
    # finishers draw more cycles: the records stay bitwise the event loop's, also when the
    # table is deliberately too short and the event loop finishes the run from the horizon.
    from asgd_jax.workers import _simulate, _sorted

    model = workers.parameter_server(n, max_delay=40 * n, **kwargs)
    num = 3_000
    cycles, top_workers, top_cycles = _sorted.plan(model, num)
    assert top_workers > 0 and top_cycles > 0 and cycles < _sorted.num_cycles(model, num)
    reference = _np(workers.simulate(model, KEY, num, method="events_reference"))
    for shape in ((cycles, top_workers, top_cycles), (2, 64, 3)):
        fast = _np(_simulate._simulate_sorted(model, KEY, num, shape))
        for name in fast._fields:
            np.testing.assert_array_equal(getattr(fast, name), getattr(reference, name), name)


def test_auto_takes_the_sorted_path_for_long_runs_only(monkeypatch):
    from asgd_jax.workers import _simulate

    taken = []
    sorted_fn = _simulate._simulate_sorted
    monkeypatch.setattr(
        _simulate, "_simulate_sorted", lambda *a: taken.append(a[2]) or sorted_fn(*a)
    )
    model = workers.parameter_server(8, workers.exponential(1.0), max_delay=200)
    short = workers.simulate(model, KEY, 200)
    assert not taken  # 200 · 8 arrivals: the event loop is cheaper than compiling
    monkeypatch.setattr(_simulate, "_SORTED_FROM", 1_000)
    long = workers.simulate(model, KEY, 200)
    assert taken == [200]
    chex.assert_trees_all_equal(long, short)


def test_simulate_method_validation():
    ssp = workers.parameter_server(4, 1.0, protocol="ssp", max_staleness=1)
    with pytest.raises(ValueError, match="method"):
        workers.simulate(ssp, KEY, 10, method="sorted")
    with pytest.raises(ValueError, match="method"):
        workers.simulate(ssp, KEY, 10, method="fast")
    # "auto" falls back to the event loop where arrivals feed back into timing.
    chex.assert_trees_all_equal(
        workers.simulate(ssp, KEY, 50), workers.simulate(ssp, KEY, 50, method="events")
    )


# --------------------------------------------------------------------------------------------
# Rennala SGD and Ringmaster ASGD (fixed computation model: deterministic τ_i).

SQRT_PROFILE = (1.0 + np.sqrt(np.arange(1, 9))).astype(np.float32)  # τ_i = 1 + √i, n = 8


def _fixed(taus, **kwargs):
    taus = np.asarray(taus, np.float32)
    return workers.parameter_server(taus.size, 1.0, speeds=1.0 / taus.astype(np.float64), **kwargs)


@pytest.mark.parametrize("batch", [1, 3, 8, 20])
def test_rennala_round_time_is_the_fixed_model_formula(batch):
    # With stops every round starts afresh: each lasts min{t : Σ_i ⌊t/τ_i⌋ ≥ S}.
    exact = asgd.theory.rennala_round_time(SQRT_PROFILE, batch)
    bounds = asgd.theory.rennala_round_bounds(SQRT_PROFILE, batch)
    assert bounds.lower <= exact <= bounds.upper
    model = _fixed(SQRT_PROFILE, protocol="rennala", k=batch, stops=True)
    assert model.max_delay == 0 and model.k == batch and model.mean_staleness == 0.0
    trace = _np(workers.simulate(model, KEY, 40))
    np.testing.assert_allclose(np.diff(trace.time, prepend=0.0), exact, rtol=1e-5)
    np.testing.assert_array_equal(trace.staleness, 0)
    assert trace.stopped.sum() > 0 or batch == 1
    # Without stops the first round is the same; later ones finish stale work first, within
    # min_m (S + 2m)/Σ_{i≤m} 1/τ_i, and the stale gradients are discarded (counted).
    plain = _np(workers.simulate(_fixed(SQRT_PROFILE, protocol="rennala", k=batch), KEY, 40))
    rounds = np.diff(plain.time, prepend=0.0)
    assert rounds[0] == pytest.approx(exact, rel=1e-5)
    assert np.all(rounds <= bounds.upper_without_stops * (1 + 1e-5))
    np.testing.assert_array_equal(plain.staleness, 0)
    np.testing.assert_array_equal(plain.stopped, 0)
    assert plain.dropped.sum() > 0


def test_rennala_with_a_full_batch_of_equal_workers_is_synchronous_sgd():
    n = 5
    sync = _np(workers.simulate(workers.parameter_server(n, 1.5, protocol="k_sync"), KEY, 30))
    model = workers.parameter_server(n, 1.5, protocol="rennala", k=n, stops=True)
    rennala = _np(workers.simulate(model, KEY, 30))
    for name in ("staleness", "time", "worker", "version", "clipped"):
        np.testing.assert_array_equal(getattr(rennala, name), getattr(sync, name), err_msg=name)
    # k_sync cancels nothing (all n finish together); Rennala stops the n − 1 second jobs.
    np.testing.assert_array_equal(rennala.dropped, 0)
    np.testing.assert_array_equal(rennala.stopped, n - 1)


@pytest.mark.parametrize("stops", [False, True])
@pytest.mark.parametrize("threshold", [1, 4, 16])
def test_ringmaster_delays_stay_below_r_and_obey_lemma_4_1(threshold, stops):
    taus = (1.0 + np.sqrt(np.arange(1, 17))).astype(np.float32)
    model = _fixed(taus, protocol="ringmaster", threshold=threshold, stops=stops)
    assert model.max_delay <= threshold - 1
    events = _np(workers.simulate_events(model, KEY, 3_000))
    assert np.all(events.staleness[events.accepted] < threshold)
    if stops:  # a computation is stopped the moment its delay reaches R: none is ignored
        assert events.accepted.all() and events.stopped.sum() > 0
    trace = _np(workers.simulate(model, KEY, 1_000))
    assert trace.staleness.max() < threshold
    # Lemma 4.1: any R consecutive updates (the first R from time 0) take ≤ 2 min_m H_m(1+R/m).
    bound = asgd.theory.ringmaster_time_bound(taus, threshold)
    times = np.concatenate([[0.0], trace.time.astype(np.float64)])
    windows = times[threshold:] - times[:-threshold]
    assert windows.max() <= bound * (1 + 1e-5)
    k = trace.time.size
    assert times[-1] <= asgd.theory.ringmaster_time_bound(taus, threshold, k) * (1 + 1e-5)


def test_one_very_slow_worker_asgd_delays_in_the_hundreds_ringmaster_below_r():
    taus = [1.0, 1.0, 1.0, 1.0, 50.0]
    asgd_trace = _np(workers.simulate(_fixed(taus), KEY, 300))
    assert asgd_trace.staleness.max() >= 100  # the slow worker's gradient is ~200 updates old
    for stops in (False, True):
        model = _fixed(taus, protocol="ringmaster", threshold=4, stops=stops)
        trace = _np(workers.simulate(model, KEY, 300))
        assert trace.staleness.max() < 4
        # The server still runs at the speed of the four fast workers.
        assert trace.time[-1] == pytest.approx(asgd_trace.time[-1], rel=0.05)


@pytest.mark.parametrize("threshold", [None, math.inf])
@pytest.mark.parametrize("stops", [False, True])
def test_ringmaster_without_a_threshold_is_asgd_bit_for_bit(threshold, stops):
    law = workers.lognormal(0.0, 1.0)
    kwargs = dict(num_slow=2, max_delay=120)
    plain = workers.parameter_server(6, law, **kwargs)
    ring = workers.parameter_server(
        6, law, protocol="ringmaster", threshold=threshold, stops=stops, **kwargs
    )
    chex.assert_trees_all_equal(
        workers.simulate(ring, KEY, 2_000), workers.simulate(plain, KEY, 2_000)
    )
    assert ring.update_rate == plain.update_rate and ring.pmf is plain.pmf is None

    params = {"w": jnp.linspace(-1.0, 1.0, 4)}
    loss = lambda p, batch: 0.5 * jnp.sum((p["w"] - batch) ** 2)
    batches = jax.random.normal(jax.random.key(3), (50, 4))
    results = []
    for model in (plain, ring):
        tx = asgd.stale(optax.sgd(0.1), delay=model, seed=2)
        step = asgd.make_step(loss, tx)

        def body(carry, batch, step=step):
            p, s, _ = step(*carry, batch)
            return (p, s), None

        results.append(
            jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), batches)[0][0])(params)
        )
    chex.assert_trees_all_equal(*results)


def test_rennala_and_ringmaster_drive_stale_with_their_counters():
    law = workers.exponential(1.0)
    params = {"w": jnp.ones(3)}
    loss = lambda p: 0.5 * jnp.sum(p["w"] ** 2)
    for model in (
        workers.parameter_server(4, law, num_slow=1, protocol="rennala", k=3),
        workers.parameter_server(
            4, law, num_slow=1, protocol="ringmaster", threshold=2, stops=True
        ),
    ):
        tx = asgd.stale(optax.sgd(0.1), delay=model, seed=5)
        step = asgd.make_step(loss, tx)

        def body(carry, _, step=step):
            tau = asgd.staleness(carry[1])  # the τ this update's gradient is taken with
            p, s, _ = step(*carry)
            return (p, s), tau

        (params_out, state), taus = jax.jit(
            lambda p, tx=tx, body=body: jax.lax.scan(body, (p, tx.init(p)), None, length=60)
        )(params)
        expected = workers.simulate(model, jax.random.key(5), 60).staleness
        np.testing.assert_array_equal(taus, expected)
        report = asgd.delay_report(state)
        assert float(report["time"]) > 0 and float(loss(params_out)) < 1.5
        if model.protocol == "rennala":
            np.testing.assert_array_equal(taus, 0)
            assert int(report["dropped"]) > 0  # gradients computed at older points
        else:
            assert int(np.max(taus)) < 2 and int(state.delay_state.stopped) > 0


def test_rennala_and_ringmaster_arguments_rejected_before_tracing():
    law = workers.exponential(1.0)
    with pytest.raises(ValueError, match="`k`"):
        workers.parameter_server(4, law, protocol="rennala", k=0)
    with pytest.raises(ValueError, match="`k`"):
        workers.parameter_server(4, law, protocol="rennala")
    with pytest.raises(ValueError, match="`threshold`"):
        workers.parameter_server(4, law, protocol="ringmaster", threshold=0)
    with pytest.raises(TypeError, match="`threshold`"):
        workers.parameter_server(4, law, protocol="ringmaster", threshold=2.5)
    with pytest.raises(ValueError, match="speeds"):
        workers.parameter_server(3, 1.0, speeds=[1.0, 0.0, 1.0], protocol="rennala", k=2)
    with pytest.raises(ValueError, match="speeds"):
        workers.parameter_server(3, 1.0, speeds=[1.0, -2.0, 1.0], protocol="ringmaster")
    with pytest.raises(ValueError, match="compute_time"):
        workers.parameter_server(3, -1.0, protocol="ringmaster", threshold=2)
    with pytest.raises(TypeError, match="stops"):
        workers.parameter_server(4, law, protocol="rennala", k=2, stops=1)
    with pytest.raises(ValueError, match="stops"):
        workers.parameter_server(4, law, stops=True, max_delay=9)
    with pytest.raises(ValueError, match="threshold"):
        workers.parameter_server(4, law, threshold=3, max_delay=9)
    with pytest.raises(ValueError, match="max_staleness"):
        workers.parameter_server(4, law, protocol="ringmaster", max_staleness=3)
    with pytest.raises(ValueError, match="method"):
        workers.simulate(_fixed([1, 2], protocol="rennala", k=2), KEY, 5, method="sorted")


def test_infinite_mean_pareto_is_simulated_without_rates():
    # alpha ≤ 1: every draw is finite, but no steady-state rate or mean staleness exists.
    model = workers.parameter_server(4, workers.pareto(1.0, 0.5), max_delay=400)
    assert model.arrival_rate is None and model.update_rate is None
    assert model.mean_staleness is None
    trace = _np(workers.simulate(model, KEY, 500))
    assert np.all(np.isfinite(trace.time)) and np.all(np.diff(trace.time) >= 0)
    finite = workers.parameter_server(4, workers.pareto(1.0, 2.5), max_delay=400)
    assert finite.update_rate == pytest.approx(4 / 2.5 * 1.5) and finite.mean_staleness == 3.0


# --------------------------------------------------------------------------------------------
# Traced parameters (sweeps under vmap) and value keys.

TRACED = (
    jnp.array([0.5, 1.0, 2.0]),  # law parameter
    jnp.array([1.0, 2.5, 4.0]),  # slow_factor
    jnp.array([0.0, 0.25, 0.5]),  # comm_time
    jnp.array([0, 2, 5]),  # num_slow
)


def _traced_build(law, slow, comm, num_slow, make=workers.exponential):
    return workers.parameter_server(
        6, make(law), num_slow=num_slow, slow_factor=slow, comm_time=comm, max_delay=90
    )


@pytest.mark.parametrize(
    "make",
    [
        workers.exponential,
        workers.deterministic,
        lambda v: workers.shifted_exponential(v, 1.0),
        lambda v: workers.lognormal(mean=1.0, cv=v),
        lambda v: workers.lognormal(0.0, v),
        lambda v: workers.pareto(v, 2.5),
    ],
    ids=["exponential", "deterministic", "shifted", "lognormal_cv", "lognormal", "pareto"],
)
def test_traced_parameters_under_vmap_equal_separate_builds(make):
    run = lambda *a: workers.simulate(_traced_build(*a, make=make), KEY, 300).staleness
    batched = np.asarray(jax.vmap(run)(*TRACED))
    for i in range(3):
        args = [v[i].item() for v in TRACED]
        np.testing.assert_array_equal(batched[i], np.asarray(run(*args)), err_msg=str(args))
    assert len({tuple(row) for row in batched}) == 3


def test_traced_model_drives_stale_inside_vmap():
    loss = lambda p: 0.5 * jnp.sum(p["w"] ** 2)
    params = {"w": jnp.ones(3)}

    def run(mean, slow, num_slow):
        model = workers.parameter_server(
            4, workers.exponential(mean), num_slow=num_slow, slow_factor=slow, max_delay=40
        )
        assert model.traced and model.update_rate is None and model.pmf is None
        with pytest.raises(TypeError, match="traced parameters"):
            hash(model)
        assert model == model and model != _traced_build(1.0, 2.0, 0.0, 1)
        tx = asgd.stale(optax.sgd(0.1), delay=model, seed=3)
        step = asgd.make_step(loss, tx)

        def body(carry, _):
            tau = asgd.staleness(carry[1])
            p, s, _ = step(*carry)
            return (p, s), tau

        return jax.lax.scan(body, (params, tx.init(params)), None, length=50)[1]

    means, slows, num_slow = jnp.array([0.5, 2.0]), jnp.array([2.0, 8.0]), jnp.array([1, 3])
    taus = np.asarray(jax.jit(jax.vmap(run))(means, slows, num_slow))
    for i in range(2):
        model = workers.parameter_server(
            4,
            workers.exponential(means[i].item()),
            num_slow=num_slow[i].item(),
            slow_factor=slows[i].item(),
            max_delay=40,
        )
        expected = workers.simulate(model, jax.random.key(3), 50).staleness
        np.testing.assert_array_equal(taus[i], expected)


def test_traced_parameters_checks():
    law = workers.exponential(1.0)

    def deterministic(t):  # the deterministic bound needs the value: max_delay is required
        return workers.parameter_server(4, workers.deterministic(t)).max_delay

    with pytest.raises(ValueError, match="max_delay"):
        jax.vmap(deterministic)(jnp.array([1.0, 2.0]))

    # Structural bounds need no value: k_sync is 0, a drop threshold is S.
    def bounds(t):
        sync = workers.parameter_server(4, workers.exponential(t), protocol="k_sync")
        drop = workers.parameter_server(4, workers.exponential(t), max_staleness=3)
        assert (sync.max_delay, drop.max_delay) == (0, 3)
        return t

    jax.vmap(bounds)(jnp.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="num_slow"):
        jax.vmap(lambda s: workers.parameter_server(4, law, num_slow=s, max_delay=9))(
            jnp.array([1.0, 2.0])
        )
    with pytest.raises(TypeError, match="mean"):
        jax.vmap(lambda m: workers.exponential(m))(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="sorted"):
        jax.vmap(
            lambda m: workers.simulate(
                workers.parameter_server(4, workers.exponential(m), max_delay=9),
                KEY,
                5,
                method="sorted",
            )
        )(jnp.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="concrete"):
        jax.vmap(lambda m: workers.exponential(m).ppf(0.5))(jnp.array([1.0, 2.0]))
    # Concrete values are still checked before tracing, naming the argument.
    with pytest.raises(ValueError, match="slow_factor"):
        workers.parameter_server(4, law, num_slow=1, slow_factor=jnp.float32(0.5), max_delay=9)


def test_worker_models_compare_and_hash_by_value():
    kwargs = dict(num_slow=2, slow_factor=3.0, comm_time=0.25, max_delay=60)
    a = workers.parameter_server(6, workers.lognormal(mean=1.0, cv=0.5), **kwargs)
    b = workers.parameter_server(6, workers.lognormal(mean=1.0, cv=0.5), **kwargs)
    assert a is not b and a == b and hash(a) == hash(b)
    assert workers.exponential(2.0) == workers.exponential(2.0) != workers.exponential(3.0)
    assert hash(workers.pareto(1.0, 2.0)) == hash(workers.pareto(1.0, 2.0))
    assert a != workers.parameter_server(
        6, workers.lognormal(mean=1.0, cv=0.5), **{**kwargs, "slow_factor": 2.0}
    )
    assert a != workers.parameter_server(6, workers.lognormal(mean=1.0, cv=0.6), **kwargs)
    # A rebuilt optimizer with an equal worker model does not recompile a jitted step.
    traces = []

    @jax.jit
    def step(state):
        traces.append(1)  # runs once per trace
        return asgd.delay_report(state)["time"]

    @functools.partial(jax.jit, static_argnums=0)
    def first_tau(model, key):
        traces.append(2)
        return model.next(model.init(key))[0]

    params = {"w": jnp.ones(2)}
    for model in (a, b):
        tx = asgd.stale(optax.sgd(0.1), delay=model, seed=0)
        step(tx.init(params))
        first_tau(model, KEY)
    assert traces == [1, 2]


# --------------------------------------------------------------------------------------------
# The blocked event loop: bitwise the one-arrival-per-step loop.

_BLOCKED_CASES = [
    (64, dict(compute_time=workers.exponential(1.0), max_delay=2560)),
    (16, dict(compute_time=workers.deterministic(1.0))),  # every arrival ties: plain steps
    (12, dict(compute_time=workers.deterministic(1.0), speeds=[1 + 0.25 * i for i in range(12)])),
    (40, dict(compute_time=workers.exponential(1.0), max_delay=8, num_slow=8)),  # clipping
    (
        20,
        dict(compute_time=workers.pareto(1.0, 1.5), protocol="ringmaster", threshold=6, num_slow=4),
    ),
    (
        24,
        dict(
            compute_time=workers.shifted_exponential(0.5, 1.0),
            comm_time=0.25,
            protocol="k_async",
            k=4,
            max_staleness=5,
        ),
    ),
]


@pytest.mark.parametrize("n, kwargs", _BLOCKED_CASES, ids=lambda c: str(c)[:40])
def test_blocked_event_loop_equals_the_reference_loop_bitwise(n, kwargs):
    from asgd_jax.workers import _blocked, _simulate

    model = workers.parameter_server(n, **kwargs)
    assert _blocked.applicable(model)
    # The reference loop is the τ sequence stale applies (tested above); 2500 updates are
    # hundreds of blocks, sentinel stops and (for ties) plain steps.
    for seed in (0, 7):
        key = jax.random.key(seed)
        fast = _np(_simulate._simulate_blocked(model, key, 2500))
        reference = _np(workers.simulate(model, key, 2500, method="events_reference"))
        for name in fast._fields:
            np.testing.assert_array_equal(getattr(fast, name), getattr(reference, name), name)


def test_blocked_event_loop_with_traced_parameters_equals_the_reference():
    from asgd_jax.workers import _simulate

    def run(mean, slow, method):
        model = workers.parameter_server(
            24, workers.exponential(mean), num_slow=4, slow_factor=slow, max_delay=300
        )
        if method == "blocked":
            return _simulate._simulate_blocked(model, KEY, 1500)
        return workers.simulate(model, KEY, 1500, method=method)

    means, slows = jnp.array([0.5, 2.0]), jnp.array([2.0, 6.0])
    fast = _np(jax.jit(jax.vmap(lambda a, b: run(a, b, "blocked")))(means, slows))
    reference = _np(jax.jit(jax.vmap(lambda a, b: run(a, b, "events_reference")))(means, slows))
    for name in fast._fields:
        np.testing.assert_array_equal(getattr(fast, name), getattr(reference, name), name)


def test_protocols_outside_the_blocked_loop_keep_the_reference_loop():
    from asgd_jax.workers import _blocked

    law = workers.exponential(1.0)
    assert not _blocked.applicable(
        workers.parameter_server(16, law, protocol="ssp", max_staleness=2)
    )
    assert not _blocked.applicable(workers.parameter_server(16, law, protocol="k_sync"))
    assert not _blocked.applicable(
        workers.parameter_server(16, law, protocol="ringmaster", threshold=4, stops=True)
    )
    assert not _blocked.applicable(workers.parameter_server(8, law, max_delay=80))
    with pytest.raises(ValueError, match="method"):
        workers.simulate(workers.parameter_server(8, law, max_delay=80), KEY, 10, method="heap")
