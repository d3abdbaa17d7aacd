"""Data-parallel, one-device-per-worker and multi-process training (asgd_jax.parallel)."""

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import asgd_jax as asgd
from asgd_jax import delays, parallel, workers
from asgd_jax.parallel import _distributed_worker
from asgd_jax.transforms import find_stale_state

NUM_FEATURES = 4
NUM_STEPS = 5
GLOBAL_BATCH = 16
# Same math, different float reduction order (per-device sums then an all-reduce).
RTOL, ATOL = 2e-5, 1e-6


def _loss(params, batch):
    x, y = batch
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - y) ** 2)


def _params():
    rows = np.arange(NUM_FEATURES * 8, dtype=np.float32).reshape(NUM_FEATURES, 8)
    return {
        "w1": 0.3 * np.sin(rows),
        "b1": np.zeros(8, np.float32),
        "w2": 0.3 * np.cos(np.arange(8, dtype=np.float32)),
    }


def _batches(num_steps=NUM_STEPS, batch=GLOBAL_BATCH):
    rows = np.arange(num_steps * batch, dtype=np.float32)[:, None]
    x = np.sin(0.37 * rows + np.arange(NUM_FEATURES, dtype=np.float32)[None] * 1.1)
    y = np.cos(rows[:, 0] * 0.21) + x[:, 0]
    return x.reshape(num_steps, batch, NUM_FEATURES), y.reshape(num_steps, batch)


def _reference(tx, params, batches):
    """The core contract on one device: gradient at stale_params, scanned over steps."""

    is_stale = isinstance(tx.init(params), asgd.StaleState)

    @jax.jit
    def run(params, state, batches):
        def body(carry, batch):
            params, state = carry
            if is_stale:
                at, tau = asgd.stale_params(state, params), asgd.staleness(state)
            else:
                at, tau = params, jnp.zeros((), jnp.int32)
            loss, grads = jax.value_and_grad(_loss)(at, batch)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), (loss, tau)

        (params, state), (losses, taus) = jax.lax.scan(body, (params, state), batches)
        return params, state, losses, taus

    params = jax.tree.map(jnp.asarray, params)
    return run(params, tx.init(params), batches)


def _close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), a, b)


def _stale_tx(seed=3):
    return asgd.stale(optax.sgd(0.2), delays.uniform(0, 3), seed=seed)


def test_sync_baseline_on_8_devices_equals_full_batch_sgd():
    tx = optax.sgd(0.2)
    mesh = parallel.data_mesh(8)
    params, state = parallel.shard_init(tx, _params(), mesh)
    step = parallel.shard_map_step(_loss, tx, mesh, scan=True)
    params, state, metrics = step(params, state, parallel.shard_batch(_batches(), mesh, 1))
    ref_params, _, ref_losses, _ = _reference(tx, _params(), _batches())
    _close(params, ref_params)
    np.testing.assert_allclose(metrics["loss"], ref_losses, rtol=RTOL)
    assert "staleness" not in metrics
    assert params["w1"].sharding.is_fully_replicated


def test_stale_same_taus_and_params_on_1_2_4_8_devices_and_pmap():
    ref_params, ref_state, ref_losses, ref_taus = _reference(_stale_tx(), _params(), _batches())
    expected_taus = delays.sample(delays.uniform(0, 3), jax.random.key(3), NUM_STEPS)
    np.testing.assert_array_equal(ref_taus, expected_taus)
    assert len(set(np.asarray(ref_taus).tolist())) > 1  # the run really is stale.

    for num_devices in (1, 2, 4, 8):
        tx = _stale_tx()
        mesh = parallel.data_mesh(num_devices)
        params, state = parallel.shard_init(tx, _params(), mesh)
        step = parallel.shard_map_step(_loss, tx, mesh, scan=True)
        params, state, metrics = step(params, state, parallel.shard_batch(_batches(), mesh, 1))
        np.testing.assert_array_equal(metrics["staleness"], ref_taus)
        np.testing.assert_array_equal(
            find_stale_state(state).metrics.staleness_histogram,
            ref_state.metrics.staleness_histogram,
        )
        assert int(asgd.staleness(state)) == int(asgd.staleness(ref_state))
        _close(params, ref_params)
        np.testing.assert_allclose(metrics["loss"], ref_losses, rtol=RTOL)
        shard_map_params = params

    tx = _stale_tx()
    step = parallel.pmap_step(_loss, tx, scan=True)
    params = parallel.pmap_replicate(_params())
    state = parallel.pmap_replicate(tx.init(_params()))
    params, state, metrics = step(params, state, _batches())
    np.testing.assert_array_equal(metrics["staleness"], ref_taus)
    _close(parallel.pmap_unreplicate(params), shard_map_params)
    # Every replica holds the same state.
    replicas = find_stale_state(state).staleness
    np.testing.assert_array_equal(replicas, [int(asgd.staleness(ref_state))] * 8)


def test_single_steps_agree_with_scan_and_pmap_takes_global_batches():
    batches = _batches(num_steps=2)
    mesh = parallel.data_mesh(4)
    tx = _stale_tx()
    params, state = parallel.shard_init(tx, _params(), mesh)
    step = parallel.shard_map_step(_loss, tx, mesh)
    for t in range(2):
        batch = parallel.shard_batch((batches[0][t], batches[1][t]), mesh)
        params, state, metrics = step(params, state, batch)
        assert metrics["loss"].shape == ()
    ref_params, *_ = _reference(_stale_tx(), _params(), batches)
    _close(params, ref_params)

    devices = jax.devices()[:2]
    pstep = parallel.pmap_step(_loss, tx, devices=devices)
    p = parallel.pmap_replicate(_params(), devices)
    s = parallel.pmap_replicate(tx.init(_params()), devices)
    for t in range(2):
        p, s, metrics = pstep(p, s, (batches[0][t], batches[1][t]))
    _close(parallel.pmap_unreplicate(p), ref_params)


def _tensor_parallel_loss(params, batch):
    """Hidden units split over the 'model' axis; the output sums their shares."""
    x, y = batch
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    out = jax.lax.psum(hidden @ params["w2"], "model")
    return jnp.mean((out - y) ** 2)


def test_history_keeps_parameter_sharding_and_is_donated():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model")}
    tx = asgd.stale(optax.sgd(0.2), delays.constant(2))
    params, state = parallel.shard_init(tx, _params(), mesh, param_specs=specs)
    history = find_stale_state(state).history
    expected = {"w1": P(None, None, "model"), "b1": P(None, "model"), "w2": P(None, "model")}
    assert parallel.state_specs(state, params, specs).history == expected
    for name, spec in expected.items():
        assert history[name].shape[0] == 2
        ndim = history[name].ndim
        assert history[name].sharding.is_equivalent_to(NamedSharding(mesh, spec), ndim)

    step = parallel.shard_map_step(_tensor_parallel_loss, tx, mesh, param_specs=specs, scan=True)
    before = history["w1"]
    pointers = {s.device: s.data.unsafe_buffer_pointer() for s in before.addressable_shards}
    params, state, _ = step(params, state, parallel.shard_batch(_batches(), mesh, 1))
    after = find_stale_state(state).history["w1"]
    assert before.is_deleted()  # donated
    assert after.sharding.is_equivalent_to(NamedSharding(mesh, expected["w1"]), 3)
    # Updated in place: each device's history shard lives in the buffer it was given.
    assert {s.device: s.data.unsafe_buffer_pointer() for s in after.addressable_shards} == pointers
    ref_params, *_ = _reference(
        asgd.stale(optax.sgd(0.2), delays.constant(2)), _params(), _batches()
    )
    _close(params, ref_params)
    assert params["w1"].sharding.is_equivalent_to(NamedSharding(mesh, specs["w1"]), 2)


def test_state_specs_follow_parameters_through_momentum_and_history():
    params = {"a": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    specs = {"a": P("model", None), "b": P()}
    tx = asgd.stale(optax.sgd(0.1, momentum=0.9), delays.constant(3))
    out = parallel.state_specs(tx.init(params), params, specs)
    stale_specs = find_stale_state(out)
    assert stale_specs.history == {"a": P(None, "model", None), "b": P(None)}
    assert stale_specs.step == P() and stale_specs.staleness == P()
    trace = jax.tree.leaves(stale_specs.inner_state, is_leaf=lambda x: isinstance(x, P))
    assert P("model", None) in trace


def _sequential(tx, params, batches, num_updates):
    """Single-device simulation: update t uses local batch t at W_{t−τ_t}."""
    batches = jax.tree.map(lambda x: x[:num_updates], batches)
    return _reference(tx, params, batches)


def _local_batches(num_updates):
    x, y = _batches(num_steps=num_updates, batch=2)
    return x, y


def test_one_device_per_worker_round_robin_equals_single_device_simulation(num_devices=8):
    num_updates = 3 * num_devices
    make = lambda: asgd.stale(  # noqa: E731
        optax.chain(asgd.scale_by_staleness("inverse"), optax.sgd(0.3)),
        delays.round_robin(num_devices),
    )
    schedule = parallel.round_robin_schedule(num_devices, num_updates)
    rounds = parallel.plan_rounds(schedule, num_devices)
    assert rounds.size.tolist() == [num_devices] * 3

    mesh = parallel.data_mesh(num_devices, "workers")
    tx = make()
    params, state = parallel.shard_init(tx, _params(), mesh, axis_name="workers")
    run = parallel.one_device_per_worker(_loss, tx, mesh)
    batches = _local_batches(num_updates)
    params, state, losses = run(params, state, batches, schedule)

    ref_params, ref_state, ref_losses, ref_taus = _sequential(
        make(), _params(), batches, num_updates
    )
    np.testing.assert_array_equal(ref_taus, schedule.staleness)
    _close(params, ref_params)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL)
    got, want = find_stale_state(state), find_stale_state(ref_state)
    assert int(got.step) == int(want.step) == num_updates
    np.testing.assert_array_equal(got.metrics.staleness_histogram, want.metrics.staleness_histogram)


def test_one_device_per_worker_follows_a_simulated_parameter_server():
    # Worker 3 is three times faster: it pushes several times in a row, so rounds are
    # partial and some devices sit idle.
    model = workers.parameter_server(4, 1.0, speeds=[1.0, 1.0, 1.0, 3.0])
    key = jax.random.key(5)
    num_updates = 14
    trace = workers.simulate(model, key, num_updates)
    rounds = parallel.plan_rounds(trace, 4)
    assert rounds.size.min() < 4 and rounds.size.sum() == num_updates
    worker = np.asarray(trace.worker)
    tau = np.asarray(trace.staleness)
    start = 0
    for r in range(rounds.size.size):
        members = rounds.order[r, : rounds.size[r]]
        assert len(set(members.tolist())) == rounds.size[r]
        ts = rounds.update[r, members]
        np.testing.assert_array_equal(worker[ts], members)
        assert np.all(ts - tau[ts] <= start) and ts[0] == start
        start += rounds.size[r]

    mesh = parallel.data_mesh(4, "workers")
    tx = asgd.stale(optax.sgd(0.3), model, seed=key)
    params, state = parallel.shard_init(tx, _params(), mesh, axis_name="workers")
    run = parallel.one_device_per_worker(_loss, tx, mesh)
    batches = _local_batches(num_updates)
    params, state, losses = run(params, state, batches, trace)
    ref_params, _, ref_losses, ref_taus = _sequential(
        asgd.stale(optax.sgd(0.3), delays.trace(trace)), _params(), batches, num_updates
    )
    np.testing.assert_array_equal(ref_taus, tau)
    _close(params, ref_params)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL)


def test_bad_inputs_raise_clear_errors():
    mesh = parallel.data_mesh(8)
    tx = _stale_tx()
    x, y = _batches(num_steps=1, batch=12)
    with pytest.raises(ValueError, match="12 is not divisible by the 8 devices"):
        parallel.shard_batch((x, y), mesh, 1)
    params, state = parallel.shard_init(tx, _params(), mesh)
    step = parallel.shard_map_step(_loss, tx, mesh, scan=True)
    with pytest.raises(ValueError, match="not divisible"):
        step(params, state, (x, y))
    with pytest.raises(ValueError, match="not divisible"):
        parallel.pmap_step(_loss, tx)(params, state, (x[0], y[0]))
    with pytest.raises(ValueError, match=r"'batch' is not an axis of the mesh.*\('data',\)"):
        parallel.shard_map_step(_loss, tx, mesh, axis_name="batch")
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        parallel.one_device_per_worker(_loss, tx, mesh)  # default axis 'workers'
    with pytest.raises(ValueError, match="must not shard parameters over the data axis"):
        parallel.shard_init(tx, _params(), mesh, param_specs=P("data"))
    with pytest.raises(ValueError, match="10 workers but the mesh axis has only 8 devices"):
        parallel.plan_rounds(parallel.round_robin_schedule(10, 20), 8)
    with pytest.raises(ValueError, match="num_devices"):
        parallel.data_mesh(9)

    wmesh = parallel.data_mesh(4, "workers")
    run = parallel.one_device_per_worker(_loss, tx, wmesh)
    schedule = parallel.round_robin_schedule(4, 8)
    batches = _local_batches(8)
    p, s = parallel.shard_init(tx, _params(), wmesh, axis_name="workers")
    with pytest.raises(ValueError, match="more workers|5 workers"):
        run(p, s, batches, parallel.round_robin_schedule(5, 8))
    with pytest.raises(ValueError, match="disagrees with the schedule at update 0"):
        run(p, s, batches, schedule)  # uniform(0, 3) is not round-robin
    with pytest.raises(ValueError, match="needs an optimizer containing asgd.stale"):
        sgd = optax.sgd(0.1)
        run(*parallel.shard_init(sgd, _params(), wmesh, axis_name="workers"), batches, schedule)
    with pytest.raises(ValueError, match="coordinator_address, num_processes and process_id"):
        parallel.initialize("127.0.0.1:1", num_processes=2)


@pytest.mark.timeout(240)
def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "result.npz"
    logs = parallel.launch_local(
        "asgd_jax.parallel._distributed_worker",
        [str(out)],
        num_processes=2,
        devices_per_process=4,
        timeout=200,
        initialization_timeout=60,
    )
    assert "process 0: 8 devices, done" in logs[0]
    assert "process 1: 8 devices, done" in logs[1]
    got = dict(np.load(out))
    assert int(got.pop("num_processes")) == 2
    want = _distributed_worker.experiment(parallel.data_mesh(8))
    assert set(got) == set(want)
    np.testing.assert_array_equal(got["stale_staleness"], want["stale_staleness"])
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.timeout(60)
def test_launch_local_reports_failures_and_timeouts():
    with pytest.raises(RuntimeError, match=r"(?s)failed.*No module named"):
        parallel.launch_local("asgd_jax_no_such_module", num_processes=2, timeout=30)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out"):
        parallel.launch_local(
            "timeit", ["-n", "1", "-r", "1", "import time; time.sleep(60)"], timeout=1.0
        )
    assert time.monotonic() - started < 20  # the sleepers were killed, not waited for.


def test_placement_never_aliases_the_callers_buffers():
    mesh = parallel.data_mesh(1)
    params = {"w": jax.device_put(jnp.ones((4, 3)), jax.sharding.NamedSharding(mesh, P()))}
    placed = parallel.replicate(params, mesh)
    assert placed["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()


def test_one_device_per_worker_reads_low_precision_and_predicted_snapshots_like_one_device():
    # A bfloat16 history with weight prediction: every worker's snapshot must be rounded and
    # extrapolated exactly as the single-device step reads it from the history.
    num_devices, num_updates = 4, 12
    make = lambda: asgd.stale(  # noqa: E731
        optax.sgd(0.3, momentum=0.5),
        delays.round_robin(num_devices),
        history_dtype=jnp.bfloat16,
        weight_prediction=True,
    )
    schedule = parallel.round_robin_schedule(num_devices, num_updates)
    mesh = parallel.data_mesh(num_devices, "workers")
    tx = make()
    params, state = parallel.shard_init(tx, _params(), mesh, axis_name="workers")
    run = parallel.one_device_per_worker(_loss, tx, mesh)
    batches = _local_batches(num_updates)
    params, state, losses = run(params, state, batches, schedule)
    ref_params, ref_state, ref_losses, ref_taus = _sequential(
        make(), _params(), batches, num_updates
    )
    np.testing.assert_array_equal(ref_taus, schedule.staleness)
    _close(params, ref_params)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, atol=ATOL)
    assert params["w1"].dtype == jnp.float32
    assert int(asgd.staleness(state)) == int(asgd.staleness(ref_state))


def test_package_reads_the_stale_state_only_through_public_readers():
    package = pathlib.Path(parallel.__file__).parent
    sources = {path.name: path.read_text() for path in package.glob("*.py")}
    assert {"_placement.py", "_data_parallel.py", "_device_per_worker.py"} <= set(sources)
    for name, text in sources.items():
        for needle in ("_replace(", "history_lib", "import history", "StaleState", ".delay_state"):
            assert needle not in text, f"{name} reaches into the stale state: {needle!r}"
        assert len(text.splitlines()) <= 400, f"{name} is over 400 lines"


def test_launch_local_checks_its_arguments_before_starting_anything():
    with pytest.raises(ValueError, match="`timeout` must be finite and > 0"):
        parallel.launch_local("timeit", timeout=0)
    with pytest.raises(ValueError, match=r"`initialization_timeout` must be in \[1, ∞\]"):
        parallel.launch_local("timeit", initialization_timeout=0)
    with pytest.raises(ValueError, match=r"`num_processes` must be in \[1, ∞\], got 0"):
        parallel.launch_local("timeit", num_processes=0)
    with pytest.raises(TypeError, match="`axis_name` must be a non-empty str"):
        parallel.pmap_step(_loss, optax.sgd(0.1), axis_name="")
