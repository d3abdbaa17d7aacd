"""Server rules in real asynchrony: bounded staleness, Ringmaster ASGD, Rennala SGD."""

import math
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _linear_problem import NUM_FEATURES, PARAMS0
from _linear_problem import regression as _regression
from _linear_problem import squared_loss as _squared_loss

import asgd_jax as asgd
from asgd_jax import delays, hogwild

BATCH = 8
LR = 0.05
SGD = optax.sgd(LR)
# Worker 0 is slow: while it computes, the others apply several updates, so its gradients
# reach any small threshold and the rules have work to discard.
SLOW_0 = hogwild.Straggler(extra_time=(0.03, 0.002, 0.002, 0.002))
_batch_of = jax.jit(hogwild.worker_batch, static_argnums=1)


def _hogwild_threads():
    return [t for t in threading.enumerate() if t.name.startswith("asgd-hogwild")]


def _check_discarded(result, *, stopped, per_update=1):
    """Counters, the log of discarded work and the budget agree; nothing was applied twice."""
    metrics, discarded = result.metrics, result.discarded
    assert metrics.updates == result.trace.staleness.size
    np.testing.assert_array_equal(result.trace.version_applied, np.arange(metrics.updates))
    assert discarded.worker.size == metrics.dropped + metrics.stopped
    assert int(discarded.stopped.sum()) == metrics.stopped
    assert (metrics.stopped > 0) == stopped and (metrics.dropped > 0) != stopped
    np.testing.assert_array_equal(discarded.staleness, discarded.version - discarded.version_pulled)
    # Every gradient computed was applied (Rennala: S per update) or discarded: the last
    # update ends the run with nothing in flight counted.
    assert metrics.gradients == per_update * metrics.updates + discarded.worker.size
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "rule",
    [
        dict(mode="locked", max_staleness=2),
        dict(mode="ringmaster", threshold=3),
        dict(mode="ringmaster", threshold=3, stops=True),
    ],
    ids=["max_staleness", "ringmaster", "ringmaster_stops"],
)
def test_a_threshold_never_applies_a_staler_gradient_and_the_trace_replays(rule):
    x, y = _regression()
    steps, key = 60, jax.random.key(5)
    result = hogwild.train(
        _squared_loss,
        PARAMS0,
        SGD,
        (x, y),
        num_workers=4,
        steps=steps,
        batch_size=BATCH,
        seed=key,
        straggler=SLOW_0,
        record_pushes=True,
        **rule,
    )
    limit = rule.get("max_staleness", rule.get("threshold", 0) - 1)
    trace, discarded = result.trace, result.discarded
    assert result.metrics.updates == steps
    assert trace.staleness.max() <= limit and result.metrics.max_staleness <= limit
    stops = rule.get("stops", False)
    _check_discarded(result, stopped=stops)
    # Drops arrive staler than the limit; stops are taken once the delay passes it.
    assert np.all(discarded.staleness > limit)
    if stops:
        np.testing.assert_array_equal(discarded.staleness[discarded.stopped], limit + 1)

    # The trace holds the applied updates only: the replay through `stale` retraces the run,
    # each gradient at W_{t−τ_t} on the batch the worker drew for that step.
    tx = asgd.stale(SGD, delays.trace(trace))
    replay = asgd.make_step(_squared_loss, tx)

    @jax.jit
    def step(params, state, batch):
        _, grads = replay.gradient(params, state, batch)
        params, state = replay.apply(grads, params, state)
        return params, state, grads

    params, state = PARAMS0, tx.init(PARAMS0)
    for t in range(steps):
        batch = _batch_of((x, y), BATCH, key, trace.worker[t], trace.worker_step[t])
        params, state, grads = step(params, state, batch)
        pushed = jax.tree.map(lambda g, t=t: g[t], result.pushes)
        chex.assert_trees_all_close(grads, pushed, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(params, result.params, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threshold", [None, math.inf])
def test_ringmaster_with_an_infinite_threshold_is_locked_bit_for_bit(threshold):
    # One worker makes the locked run deterministic, so two runs compare bit for bit.
    common = dict(num_workers=1, steps=15, batch_size=BATCH, seed=2)
    locked = hogwild.train(_squared_loss, PARAMS0, SGD, _regression(), **common)
    ring = hogwild.train(
        _squared_loss, PARAMS0, SGD, _regression(), mode="ringmaster", threshold=threshold, **common
    )
    chex.assert_trees_all_equal(ring.params, locked.params)
    np.testing.assert_array_equal(ring.trace.worker_step, locked.trace.worker_step)
    assert ring.metrics.dropped == ring.metrics.stopped == 0
    # With more workers and a straggler, R = ∞ discards nothing either.
    busy = hogwild.train(
        _squared_loss,
        PARAMS0,
        SGD,
        _regression(),
        num_workers=4,
        steps=30,
        batch_size=BATCH,
        straggler=SLOW_0,
        mode="ringmaster",
        threshold=threshold,
        stops=True,
    )
    assert busy.metrics.dropped == busy.metrics.stopped == 0
    assert busy.metrics.gradients == busy.metrics.updates == 30


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stops", [False, True])
def test_rennala_averages_s_gradients_all_taken_at_the_current_point(stops):
    # The gradient does not depend on the batch, only on the point it is taken at: an update
    # that mixed in one gradient from an older point would move the iterate visibly off the
    # recursion w ← w − η (w − c).
    target = jnp.arange(1.0, NUM_FEATURES + 1, dtype=jnp.float32)

    def loss(params, batch):
        return 0.5 * jnp.sum((params["w"] - target) ** 2) + 0.0 * jnp.mean(batch)

    lr, k, steps = 0.2, 3, 20
    data = np.zeros((64, 1), np.float32)
    params0 = {"w": jnp.zeros(NUM_FEATURES, jnp.float32)}
    result = hogwild.train(
        loss,
        params0,
        optax.sgd(lr),
        data,
        num_workers=4,
        steps=steps,
        batch_size=4,
        straggler=SLOW_0,
        mode="rennala",
        k=k,
        stops=stops,
        record_pushes=True,
    )
    metrics = result.metrics
    assert metrics.updates == steps
    np.testing.assert_array_equal(result.trace.staleness, np.zeros(steps, np.int32))
    _check_discarded(result, stopped=stops, per_update=k)
    # Only work at an older point is discarded.
    assert np.all(result.discarded.staleness >= 1)
    w = np.zeros(NUM_FEATURES, np.float32)
    for t in range(steps):
        np.testing.assert_allclose(result.pushes["w"][t], w - target, rtol=1e-6, atol=1e-6)
        w = (w - np.float32(lr) * (w - target)).astype(np.float32)
    np.testing.assert_allclose(result.params["w"], w, rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "rule", [dict(mode="ringmaster", threshold=2, stops=True), dict(mode="rennala", k=2)]
)
def test_a_worker_exception_under_a_rule_names_the_worker_and_leaks_no_thread(rule):
    x, y = _regression()

    def data(worker, step):
        if (worker, step) == (1, 3):
            raise ValueError(f"bad batch for worker {worker}")
        start = (worker * 37 + step * BATCH) % (x.shape[0] - BATCH)
        return x[start : start + BATCH], y[start : start + BATCH]

    with pytest.raises(hogwild.HogwildError, match="worker 1 raised ValueError") as info:
        hogwild.train(_squared_loss, PARAMS0, SGD, data, num_workers=3, steps=10_000, **rule)
    assert info.value.worker == 1
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
def test_rennala_ends_at_the_time_limit_when_its_rounds_cannot_fill():
    # S = 10⁶ gradients per update: no round completes, the time limit ends the run.
    result = hogwild.train(
        _squared_loss,
        PARAMS0,
        SGD,
        _regression(),
        num_workers=2,
        time_limit=0.3,
        batch_size=BATCH,
        mode="rennala",
        k=1_000_000,
    )
    assert result.metrics.stopped_by == "time_limit" and result.metrics.updates == 0
    assert result.metrics.gradients > 0 and result.discarded.worker.size == 0
    chex.assert_trees_all_equal(result.params, PARAMS0)


@pytest.mark.timeout(60)
def test_rule_arguments_are_validated_naming_them():
    args = (_squared_loss, PARAMS0, SGD, _regression())
    common = dict(steps=5, batch_size=4)
    bad = [
        (dict(mode="sync", max_staleness=1), ValueError, "max_staleness"),
        (dict(mode="ringmaster", max_staleness=1), ValueError, "max_staleness"),
        (dict(mode="locked", max_staleness=-1), ValueError, "max_staleness"),
        (dict(mode="locked", max_staleness=1.5), TypeError, "max_staleness"),
        (dict(mode="locked", threshold=3), ValueError, "threshold"),
        (dict(mode="ringmaster", threshold=0), ValueError, "threshold"),
        (dict(mode="ringmaster", threshold=2.5), TypeError, "threshold"),
        (dict(mode="rennala"), ValueError, "`k`"),
        (dict(mode="rennala", k=0), ValueError, "`k`"),
        (dict(mode="locked", k=2), ValueError, "`k`"),
        (dict(mode="locked", stops=True), ValueError, "stops"),
        (dict(mode="ringmaster", threshold=2, stops=1), TypeError, "stops"),
    ]
    for kwargs, error, name in bad:
        with pytest.raises(error, match=name):
            hogwild.train(*args, **common, **kwargs)
    assert set(hogwild.MODES) >= {"locked", "lock_free", "sync", "ringmaster", "rennala"}
    assert not _hogwild_threads()
