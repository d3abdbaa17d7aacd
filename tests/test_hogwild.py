"""Tests for asgd_jax.hogwild: real worker threads, host callbacks, measured staleness."""

import _thread
import itertools
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
from jax.experimental import io_callback

import asgd_jax as asgd
from asgd_jax import delays, hogwild

BATCH = 8


LR = 0.05
# Shared optimizer objects: runs with the same model and optimizer reuse compiled programs.
SGD = optax.sgd(LR)
ADAM = optax.adam(LR)
_batch_of = jax.jit(hogwild.worker_batch, static_argnums=1)
# The server rules (ringmaster, rennala) are tested in test_hogwild_rules.py.
CONSISTENCY_MODES = ("locked", "lock_free", "sync")
_grad = jax.jit(jax.grad(_squared_loss))


def _pushed(result, t):
    return jax.tree.map(lambda g: g[t], result.pushes)


def _hogwild_threads():
    return [t for t in threading.enumerate() if t.name.startswith("asgd-hogwild")]


def _host_data(fail_at=None, hang=None, interrupt_at=None, before_interrupt=None):
    """A host data function; optionally raises, blocks or interrupts at (worker, step)."""
    x, y = _regression()

    def data(worker, step):
        if (worker, step) == fail_at:
            raise ValueError(f"bad batch for worker {worker}")
        if hang is not None and (worker, step) == hang[0]:
            hang[1]()
        if (worker, step) == interrupt_at:
            if before_interrupt is not None:
                before_interrupt()
            _thread.interrupt_main()
        start = (worker * 37 + step * BATCH) % (x.shape[0] - BATCH)
        return x[start : start + BATCH], y[start : start + BATCH]

    return data


def _apply_fn(optimizer):
    """The contract's apply half, jitted: what the server does with one pushed gradient."""
    return jax.jit(asgd.make_step(_squared_loss, optimizer).apply)


@pytest.mark.timeout(60)
def test_locked_applies_exactly_the_logged_gradients_in_order():
    optimizer = ADAM
    result = hogwild.train(
        _squared_loss,
        PARAMS0,
        optimizer,
        _regression(),
        num_workers=4,
        steps=60,
        batch_size=BATCH,
        mode="locked",
        record_pushes=True,
    )
    trace, metrics = result.trace, result.metrics
    assert metrics.updates == 60 and metrics.gradients == 60
    assert int(metrics.gradients_per_worker.sum()) == 60
    np.testing.assert_array_equal(trace.version_applied, np.arange(60))
    np.testing.assert_array_equal(trace.staleness, trace.version_applied - trace.version_pulled)
    assert np.all(trace.staleness >= 0) and np.all(np.diff(trace.wall_time) >= 0)
    assert metrics.stopped_by == "steps"
    # Replaying the logged gradients in logged order gives the same parameters, bit for bit.
    apply = _apply_fn(optimizer)
    params, state = PARAMS0, optimizer.init(PARAMS0)
    for t in range(60):
        params, state = apply(_pushed(result, t), params, state)
    chex.assert_trees_all_equal(params, result.params)
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", CONSISTENCY_MODES)
def test_one_worker_has_zero_staleness(mode):
    result = hogwild.train(
        _squared_loss,
        PARAMS0,
        SGD,
        _regression(),
        num_workers=1,
        steps=25,
        batch_size=BATCH,
        mode=mode,
    )
    assert result.metrics.updates == 25
    np.testing.assert_array_equal(result.trace.staleness, np.zeros(25, np.int32))
    np.testing.assert_array_equal(result.trace.worker, np.zeros(25, np.int32))
    np.testing.assert_array_equal(result.trace.worker_step, np.arange(25))


@pytest.mark.timeout(60)
def test_staleness_grows_with_workers_and_with_a_straggler():
    def run(num_workers, straggler):
        return hogwild.train(
            _squared_loss,
            PARAMS0,
            SGD,
            _regression(),
            num_workers=num_workers,
            steps=48,
            batch_size=BATCH,
            straggler=straggler,
        )

    # Every gradient takes ≥ 10 ms, so the 4 workers overlap: τ ≈ 3 in steady state.
    busy = run(4, hogwild.Straggler.fixed(0.01))
    assert run(1, hogwild.Straggler.fixed(0.01)).metrics.mean_staleness == 0.0
    assert busy.metrics.mean_staleness > 1.0
    # One worker 40× slower than the others' extra time: its gradients are much staler.
    slow = run(4, hogwild.Straggler(extra_time=(0.04, 0.001, 0.001, 0.001)))
    tr = slow.trace
    from_slow = tr.staleness[tr.worker == 0]
    assert from_slow.size >= 1
    assert from_slow.mean() > tr.staleness[tr.worker != 0].mean()
    assert slow.metrics.max_staleness > 4


@pytest.mark.timeout(60)
def test_replay_through_stale_applies_the_recorded_staleness_sequence():
    x, y = _regression()
    steps, key = 40, jax.random.key(3)
    result = hogwild.train(
        _squared_loss,
        PARAMS0,
        SGD,
        (x, y),
        num_workers=3,
        steps=steps,
        batch_size=BATCH,
        seed=key,
        straggler=hogwild.Straggler.fixed(0.003),
        record_pushes=True,
    )
    trace = result.trace
    assert trace.staleness.max() > 0  # a replay of all zeros would prove nothing

    tx = asgd.stale(SGD, delays.trace(trace))
    state = tx.init(PARAMS0)
    replay = asgd.make_step(_squared_loss, tx)

    @jax.jit
    def step(params, state, batch):
        tau = asgd.staleness(state)
        _, grads = replay.gradient(params, state, batch)  # at W_{t−τ_t}
        params, state = replay.apply(grads, params, state)
        return params, state, tau, grads

    params, applied = PARAMS0, []
    for t in range(steps):
        batch = _batch_of((x, y), BATCH, key, trace.worker[t], trace.worker_step[t])
        params, state, tau, grads = step(params, state, batch)
        applied.append(int(tau))
        # The real gradient was taken at the version the worker pulled: W_{t−τ_t}.
        chex.assert_trees_all_close(grads, _pushed(result, t), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(applied), trace.staleness)
    assert int(state.metrics.last_staleness) == trace.staleness[-1]
    # Same staleness, same batches: the deterministic replay retraces the real run.
    chex.assert_trees_all_close(params, result.params, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(60)
def test_sync_mode_averages_each_round_in_worker_order():
    x, y = _regression()
    rounds, workers, key = 5, 3, jax.random.key(11)
    result = hogwild.train(
        _squared_loss,
        PARAMS0,
        SGD,
        (x, y),
        num_workers=workers,
        steps=rounds,
        batch_size=BATCH,
        mode="sync",
        seed=key,
    )
    assert result.metrics.updates == rounds
    assert result.metrics.gradients == rounds * workers
    np.testing.assert_array_equal(result.trace.staleness, np.zeros(rounds, np.int32))
    params = PARAMS0
    for r in range(rounds):
        grads = [_grad(params, _batch_of((x, y), BATCH, key, w, r)) for w in range(workers)]
        mean = jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), axis=0), *grads)
        params = jax.tree.map(lambda p, g: p - LR * g, params, mean)
    chex.assert_trees_all_close(result.params, params, rtol=1e-6, atol=1e-7)


@pytest.mark.timeout(60)
def test_lock_free_counts_writes_and_keeps_every_small_update():
    result = hogwild.train(
        _squared_loss,
        PARAMS0,
        SGD,
        _regression(),
        num_workers=4,
        steps=50,
        batch_size=BATCH,
        mode="lock_free",
        record_pushes=True,
    )
    metrics = result.metrics
    assert metrics.updates == 50 and metrics.gradients == 50
    np.testing.assert_array_equal(result.trace.version_applied, np.arange(50))
    assert np.all(result.trace.staleness >= 0)
    assert 0 <= metrics.torn_reads <= 50 and 0 <= metrics.overlapping_writes <= 50
    # Leaves this small are added under the GIL, so no element update can be lost.
    assert metrics.write_residual < 1e-5
    summed = jax.tree.map(lambda p, d: p + d.sum(axis=0), PARAMS0, result.pushes)
    chex.assert_trees_all_close(result.params, summed, rtol=1e-5, atol=1e-6)
    assert len(result.opt_state) == 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", CONSISTENCY_MODES)
def test_worker_exception_names_the_worker_and_leaks_no_thread(mode):
    # Worker 1's data function raises between two pushes: in sync mode the other workers are
    # left waiting at the barrier for a gradient that never comes.
    with pytest.raises(hogwild.HogwildError, match="worker 1 raised ValueError") as info:
        hogwild.train(
            _squared_loss,
            PARAMS0,
            SGD,
            _host_data(fail_at=(1, 3)),
            num_workers=3,
            steps=10_000,
            mode=mode,
            shutdown_timeout=20.0,
        )
    assert info.value.worker == 1
    assert isinstance(info.value.__cause__, ValueError)
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["locked", "sync"])
@pytest.mark.parametrize("fail_at", [(1, 0), (1, 3)])
def test_a_worker_dying_while_the_server_holds_gradients_does_not_deadlock(mode, fail_at):
    # Worker 0 is slow, so when worker 1 dies the server holds the others' gradients (sync:
    # a round it can never complete) and is waiting for more: it must see the stop signal.
    with pytest.raises(hogwild.HogwildError, match="worker 1 raised ValueError") as info:
        hogwild.train(
            _squared_loss,
            PARAMS0,
            SGD,
            _host_data(fail_at=fail_at),
            num_workers=3,
            steps=10_000,
            mode=mode,
            straggler=hogwild.Straggler(extra_time=(0.2, 0.0, 0.0)),
        )
    assert info.value.worker == 1
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
def test_exception_inside_the_worker_program_is_reraised():
    calls = itertools.count()

    def flaky_loss(params, batch):
        def check(value):
            if next(calls) == 10:
                raise FloatingPointError("loss blew up")

        loss = _squared_loss(params, batch)
        jax.debug.callback(check, loss)
        return loss

    with pytest.raises(hogwild.HogwildError, match="worker [01] raised") as info:
        hogwild.train(
            flaky_loss,
            PARAMS0,
            SGD,
            _regression(),
            num_workers=2,
            steps=10_000,
            batch_size=BATCH,
        )
    assert info.value.worker in (0, 1)
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
def test_server_exception_stops_the_workers():
    def failing_update(updates, state, params=None):
        def check(count):
            if int(count) == 5:
                raise RuntimeError("optimizer state corrupted")
            return np.asarray(count) + np.int32(1)

        count = io_callback(check, jax.ShapeDtypeStruct((), jnp.int32), state)
        return updates, count

    optimizer = optax.chain(
        SGD,
        optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32), failing_update),
    )
    with pytest.raises(hogwild.HogwildError, match="server raised") as info:
        hogwild.train(
            _squared_loss,
            PARAMS0,
            optimizer,
            _regression(),
            num_workers=3,
            steps=10_000,
            batch_size=BATCH,
        )
    assert info.value.worker is None
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["locked", "sync"])
def test_time_limit_ends_the_run_despite_a_very_slow_worker(mode):
    result = hogwild.train(
        _squared_loss,
        PARAMS0,
        SGD,
        _regression(),
        num_workers=2,
        time_limit=0.5,
        batch_size=BATCH,
        mode=mode,
        straggler=hogwild.Straggler.one_slow(600.0, worker=0),
    )
    assert result.metrics.stopped_by == "time_limit"
    assert 0.5 <= result.metrics.wall_time < 30.0  # the slow worker's gradient needs 600 s
    assert result.metrics.gradients_per_worker[0] == 0
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
def test_a_worker_hanging_past_the_time_limit_is_waited_for():
    release = threading.Event()
    # Worker 1 blocks in user code (its data function) well past the time limit.
    data = _host_data(hang=((1, 2), lambda: release.wait(1.5)))
    result = hogwild.train(
        _squared_loss,
        PARAMS0,
        SGD,
        data,
        num_workers=2,
        time_limit=0.3,
    )
    assert result.metrics.stopped_by == "time_limit"
    assert result.metrics.gradients_per_worker[1] <= 2
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
def test_a_worker_stuck_past_shutdown_timeout_is_reported():
    release = threading.Event()
    data = _host_data(hang=((1, 2), lambda: release.wait(30.0)))
    try:
        with pytest.raises(hogwild.HogwildError, match="asgd-hogwild-worker-1"):
            hogwild.train(
                _squared_loss,
                PARAMS0,
                SGD,
                data,
                num_workers=2,
                time_limit=0.3,
                shutdown_timeout=0.5,
            )
    finally:
        release.set()
        for thread in _hogwild_threads():
            thread.join(10.0)
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
def test_keyboard_interrupt_stops_every_thread():
    with pytest.raises(KeyboardInterrupt):
        hogwild.train(
            _squared_loss,
            PARAMS0,
            SGD,
            _host_data(interrupt_at=(0, 5)),
            num_workers=3,
            time_limit=50.0,
        )
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", CONSISTENCY_MODES)
def test_more_workers_than_cores_with_a_pooled_convolution_do_not_deadlock(mode):
    # XLA:CPU runs a convolution this size on its intra-op pool (one thread per core), and the
    # host callbacks that follow it on pool threads. A callback that waited there (for a sync
    # barrier, an acknowledgement, a straggler's sleep) would hold a pool thread: with as many
    # waiting workers as cores, nothing else could run, the server's update included.
    images = np.random.default_rng(0).random((128, 28, 28, 1), dtype=np.float32)

    def conv_loss(params, batch):
        features = jax.lax.conv_general_dilated(
            batch, params["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.mean(jnp.tanh(features) ** 2)

    params = {"kernel": jnp.full((5, 5, 1, 10), 0.05, jnp.float32)}
    result = hogwild.train(
        conv_loss,
        params,
        SGD,
        images,
        num_workers=4,
        steps=8,
        batch_size=64,
        mode=mode,
        straggler=hogwild.Straggler.fixed(0.005),
    )
    assert result.metrics.updates == 8
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
def test_async_reaches_the_loss_of_sync_on_the_same_gradient_budget():
    data, budget, workers = _regression(), 200, 4
    common = dict(num_workers=workers, batch_size=BATCH)
    async_run = hogwild.train(_squared_loss, PARAMS0, SGD, data, steps=budget, **common)
    sync_run = hogwild.train(
        _squared_loss,
        PARAMS0,
        SGD,
        data,
        steps=budget // workers,
        mode="sync",
        **common,
        progress=True,
    )
    assert sync_run.metrics.gradients == async_run.metrics.gradients == budget
    initial = float(_squared_loss(PARAMS0, data))
    loss_async = float(_squared_loss(async_run.params, data))
    loss_sync = float(_squared_loss(sync_run.params, data))
    assert loss_sync < 0.1 * initial
    # Both sit near the noise floor (0.01); async's single-worker batches and thread-timed
    # staleness leave it a little above sync's four-worker averages, never far above.
    assert loss_async <= 1.5 * loss_sync


@pytest.mark.timeout(60)
def test_arguments_are_validated_eagerly():
    data = _regression()
    args = (_squared_loss, PARAMS0, SGD, data)
    with pytest.raises(ValueError, match="mode"):
        hogwild.train(*args, steps=5, batch_size=4, mode="async")
    with pytest.raises(ValueError, match="num_workers"):
        hogwild.train(*args, steps=5, batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="steps"):
        hogwild.train(*args, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        hogwild.train(*args, steps=5)
    with pytest.raises(ValueError, match="time_limit"):
        hogwild.train(*args, steps=5, batch_size=4, time_limit=-1.0)
    with pytest.raises(ValueError, match="worker"):
        hogwild.train(
            *args,
            steps=5,
            batch_size=4,
            num_workers=2,
            straggler=hogwild.Straggler.one_slow(0.1, worker=2),
        )
    with pytest.raises(ValueError, match="law"):
        hogwild.Straggler(0.1, law="pareto")
    with pytest.raises(ValueError, match="extra_time"):
        hogwild.Straggler.fixed(-0.1)
    with pytest.raises(ValueError, match="num_workers"):
        hogwild.Straggler.fixed((0.1, 0.2)).means(3)
    table = hogwild.Straggler.random(0.01).table(jax.random.key(0), 3, 1000)
    assert table.shape == (3, 1000) and np.all(table >= 0)
    np.testing.assert_allclose(table.mean(), 0.01, rtol=0.1)
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "seed",
    ["abc", 1.5, True, None, np.zeros(2, np.float32), jax.random.split(jax.random.key(0), 2)],
    ids=["str", "float", "bool", "none", "float-array", "batch-of-keys"],
)
def test_a_bad_seed_is_rejected_naming_it(seed):
    with pytest.raises((TypeError, ValueError), match="`seed` must be an int or a single PRNG key"):
        hogwild.train(
            _squared_loss, PARAMS0, SGD, _regression(), steps=2, batch_size=BATCH, seed=seed
        )
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
def test_an_int_seed_and_its_key_give_the_same_run():
    def run(seed):
        return hogwild.train(
            _squared_loss,
            PARAMS0,
            SGD,
            _regression(),
            num_workers=1,
            steps=6,
            batch_size=BATCH,
            seed=seed,
        ).params

    reference = run(3)
    for seed in (np.int64(3), jax.random.key(3), jax.random.PRNGKey(3)):
        chex.assert_trees_all_equal(run(seed), reference)


@pytest.mark.timeout(60)
def test_integer_params_are_rejected_naming_the_leaf():
    params = {"w": jnp.zeros(NUM_FEATURES, jnp.int32), "b": jnp.zeros((), jnp.float32)}
    with pytest.raises(TypeError, match=r"`params` leaf \['w'\] has dtype int32"):
        hogwild.train(_squared_loss, params, SGD, _regression(), steps=2, batch_size=BATCH)
    with pytest.raises(TypeError, match=r"`params` leaf \['b'\] has dtype bool"):
        hogwild.train(
            _squared_loss,
            {"w": PARAMS0["w"], "b": jnp.zeros((), bool)},
            SGD,
            _regression(),
            steps=2,
            batch_size=BATCH,
        )
    assert not _hogwild_threads()


@pytest.mark.timeout(60)
def test_keyboard_interrupt_names_the_threads_left_stuck_in_user_code():
    release, stuck = threading.Event(), threading.Event()

    def hang():
        stuck.set()
        release.wait(30.0)

    # Worker 1 blocks in its data function; once it is stuck there, worker 0 presses Ctrl-C
    # (waiting for it keeps a loaded machine from interrupting before worker 1 is stuck).
    data = _host_data(
        hang=((1, 1), hang), interrupt_at=(0, 4), before_interrupt=lambda: stuck.wait(30.0)
    )
    try:
        with pytest.warns(RuntimeWarning, match="asgd-hogwild-worker-1"):
            with pytest.raises(KeyboardInterrupt) as info:
                hogwild.train(
                    _squared_loss,
                    PARAMS0,
                    SGD,
                    data,
                    num_workers=2,
                    time_limit=50.0,
                    shutdown_timeout=0.5,
                )
        notes = getattr(info.value, "__notes__", [])
        assert len(notes) == 1 and "asgd-hogwild-worker-1" in notes[0]
        assert "worker-0" not in notes[0]
    finally:
        release.set()
        for thread in _hogwild_threads():
            thread.join(10.0)
    assert not _hogwild_threads()
