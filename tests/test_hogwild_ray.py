"""Tests for hogwild.train(..., backend="ray"): real processes, real faults, measured τ.

One local Ray for the module, on loopback (a ``ray.cluster_utils.Cluster`` head with two
CPUs, no dashboard, a 100 MB object store), shut down at the end; the node-removal test adds
and removes a second node of it. Every run uses a tiny regression model so that the time
goes to what is tested: the processes, the faults and the bookkeeping.
"""

import os
import sys
import threading
import time

import chex
import jax
import numpy as np
import optax
import psutil
import pytest

ray = pytest.importorskip("ray")

import _linear_problem  # noqa: E402
from _linear_problem import PARAMS0  # noqa: E402
from _linear_problem import regression as _regression  # noqa: E402
from _linear_problem import squared_loss as _squared_loss  # noqa: E402

import asgd_jax as asgd  # noqa: E402
from asgd_jax import delays, hogwild  # noqa: E402
from asgd_jax.hogwild import _ray  # noqa: E402

# The worker processes unpickle the loss and the data functions by value (this module is
# not importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(_linear_problem)

BATCH = 8
SGD = optax.sgd(0.05)
_batch_of = jax.jit(hogwild.worker_batch, static_argnums=1)


def _dying_data(marker, die_at):
    """Host data; the worker process exits (``os._exit``) at ``die_at`` the first time."""
    x, y = _regression()

    def data(worker, step):
        if (worker, step) == die_at and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        start = (worker * 37 + step * BATCH) % (x.shape[0] - BATCH)
        return x[start : start + BATCH], y[start : start + BATCH]

    return data


def _ray_processes():
    """This process's descendants that Ray started (raylet, GCS, workers)."""
    return [p for p in psutil.Process().children(recursive=True)]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    head = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": False,
            "object_store_memory": 100 * 2**20,
        },
    )
    try:
        ray.init(address=head.address, log_to_driver=False)
        yield head
    finally:
        ray.shutdown()
        head.shutdown()


def _train(**kwargs):
    args = dict(num_workers=2, batch_size=BATCH, backend="ray")
    args.update(kwargs)
    data = args.pop("data", _regression())
    if callable(data):
        args["batch_size"] = None
    return hogwild.train(_squared_loss, PARAMS0, SGD, data, **args)


def _check_exact(result, steps):
    trace = result.trace
    assert result.metrics.updates == steps
    np.testing.assert_array_equal(trace.version_applied, np.arange(steps))
    np.testing.assert_array_equal(trace.staleness, trace.version_applied - trace.version_pulled)
    assert np.all(trace.staleness >= 0)
    pairs = set(zip(trace.worker.tolist(), trace.worker_step.tolist(), strict=True))
    assert len(pairs) == steps  # no gradient applied twice


class _ServerWatch:
    """Runs ``action(handle)`` once, from a thread, when the run's server (its own one when
    it has one, else the kept one) reports a version satisfying ``predicate``."""

    def __init__(self, predicate, action):
        self.done, self.over = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._watch, args=(predicate, action), daemon=True)
        self.thread.start()

    def _watch(self, predicate, action):
        while not self.over.is_set():
            names = [n for n in ray.util.list_named_actors() if n.endswith("-server")]
            names.sort(key=lambda n: "-run-" in n)
            try:
                handle = ray.get_actor(names[-1])
                version, _, finished = ray.get(handle.status.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - not started, finished, or gone
                time.sleep(0.005)
                continue
            if not finished and predicate(version):
                action(handle)
                self.done.set()
                return
            time.sleep(0.005)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.over.set()
        self.thread.join()
        return False


# -- before any Ray starts -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_lock_free_and_misplaced_arguments_are_rejected_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="lock_free.*backend='ray'.*separate processes"):
        _train(steps=5, mode="lock_free")
    with pytest.raises(ValueError, match="`ray_address` applies to backend='ray'"):
        _train(steps=5, backend="threads", ray_address="127.0.0.1:6379")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        _train(steps=5, backend="mpi")
    with pytest.raises(ValueError, match="go together"):
        _train(steps=5, checkpoint_every=5)
    with pytest.raises(ValueError, match="has no checkpoint"):
        _train(steps=5, checkpoint_every=5, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1, got 0"):
        _train(steps=5, checkpoint_every=0, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="record_pushes"):
        _train(steps=5, checkpoint_every=5, checkpoint_dir=tmp_path, record_pushes=True)
    assert not ray.is_initialized()


@pytest.mark.timeout(60)
def test_an_unreachable_address_fails_in_one_line(monkeypatch):
    if ray.is_initialized():
        pytest.skip("a Ray is already initialized in this process: it would be used")
    with socket_closed_port() as port:
        with pytest.raises(ConnectionError) as info:
            _train(steps=5, ray_address=f"127.0.0.1:{port}")
        assert "\n" not in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        with pytest.raises(ConnectionError, match="ray start --head"):
            _train(steps=5)
    assert not ray.is_initialized()


class socket_closed_port:
    """A loopback port nothing listens on (bound, then closed)."""

    def __enter__(self):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


# -- on the module's cluster ----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_the_measured_staleness_replays_through_delays_trace(cluster):
    x, y = _regression()
    steps, key = 30, jax.random.key(3)
    result = _train(
        data=(x, y),
        steps=steps,
        seed=key,
        straggler=hogwild.Straggler.fixed(0.01),
        record_pushes=True,
    )
    _check_exact(result, steps)
    trace = result.trace
    assert result.metrics.backend == "ray" and result.metrics.stopped_by == "steps"
    assert trace.staleness.max() > 0  # the two workers overlapped
    tx = asgd.stale(SGD, delays.trace(trace))
    state = tx.init(PARAMS0)
    replay = asgd.make_step(_squared_loss, tx)

    @jax.jit
    def step(params, state, batch):
        tau = asgd.staleness(state)
        _, grads = replay.gradient(params, state, batch)
        params, state = replay.apply(grads, params, state)
        return params, state, tau, grads

    params, applied = PARAMS0, []
    for t in range(steps):
        batch = _batch_of((x, y), BATCH, key, trace.worker[t], trace.worker_step[t])
        params, state, tau, grads = step(params, state, batch)
        applied.append(int(tau))
        pushed = jax.tree.map(lambda g, t=t: g[t], result.pushes)
        chex.assert_trees_all_close(grads, pushed, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(applied), trace.staleness)
    chex.assert_trees_all_close(params, result.params, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(120)
def test_sync_rounds_equal_the_thread_backend_bit_for_bit(cluster):
    args = dict(steps=4, mode="sync", seed=5)
    on_ray = _train(**args)
    threads = _train(**args, backend="threads")
    np.testing.assert_array_equal(on_ray.trace.staleness, np.zeros(4, np.int32))
    np.testing.assert_array_equal(on_ray.metrics.gradients_per_worker, [4, 4])
    chex.assert_trees_all_equal(on_ray.params, threads.params)
    chex.assert_trees_all_equal(on_ray.opt_state, threads.opt_state)


@pytest.mark.timeout(120)
def test_a_worker_that_dies_mid_run_is_restarted_and_the_run_applies_exactly_steps(
    cluster, tmp_path
):
    steps = 24
    result = _train(
        data=_dying_data(str(tmp_path / "died"), die_at=(1, 4)),
        steps=steps,
        straggler=hogwild.Straggler.fixed(0.005),
    )
    _check_exact(result, steps)
    assert (tmp_path / "died").exists()
    np.testing.assert_array_equal(result.metrics.worker_restarts, [0, 1])
    assert result.metrics.duplicate_pushes == 0
    # The dead worker's in-flight gradient was lost, not skipped: it recomputed step 4.
    steps_of_1 = np.sort(result.trace.worker_step[result.trace.worker == 1])
    np.testing.assert_array_equal(steps_of_1, np.arange(steps_of_1.size))


@pytest.mark.timeout(150)
def test_a_killed_server_reloads_its_checkpoint_and_a_dead_driver_s_run_resumes(cluster, tmp_path):
    directory = tmp_path / "ckpt"
    args = dict(
        straggler=hogwild.Straggler.fixed(0.01), checkpoint_every=5, checkpoint_dir=directory
    )
    with _ServerWatch(
        lambda version: version >= 12, lambda handle: ray.kill(handle, no_restart=False)
    ) as watch:
        result = _train(steps=30, **args)
    assert watch.done.is_set()
    _check_exact(result, 30)
    assert result.metrics.server_restarts >= 1
    # What the reloaded server kept: the checkpoint at version 10 (or later), then onwards.
    assert _ray.latest_step(str(directory)) == 30
    # A new driver resumes the checkpointed run and extends it.
    resumed = _train(steps=40, resume=True, **args)
    _check_exact(resumed, 40)
    for field in ("worker", "version_pulled", "version_applied", "worker_step"):
        np.testing.assert_array_equal(
            getattr(resumed.trace, field)[:30], getattr(result.trace, field)
        )
    chex.assert_trees_all_equal_shapes(resumed.params, PARAMS0)


@pytest.mark.timeout(150)
def test_a_node_removed_mid_run_does_not_stop_the_run(cluster):
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    with _ServerWatch(lambda version: version >= 8, lambda _: cluster.remove_node(node)) as watch:
        result = _train(steps=40, straggler=hogwild.Straggler.fixed(0.02))
    assert watch.done.is_set()
    _check_exact(result, 40)
    assert int(result.metrics.worker_restarts.sum()) == 1  # the worker on the lost node


@pytest.mark.timeout(60)
def test_no_ray_process_is_left_behind(cluster):
    before = _ray_processes()
    assert before  # the cluster's processes are this process's descendants
    ray.shutdown()
    cluster.shutdown()
    _, alive = psutil.wait_procs(before, timeout=20)
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
