"""Edges of the core surface: wrong shapes, x64, huge bounds, seeds, dtypes, value equality,
flax serialization, NNX variables, and errors that name the fix."""

import os
import pathlib
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import asgd_jax as asgd
from asgd_jax import delays
from asgd_jax.transforms import find_stale_state


def _params():
    return {"w": jnp.arange(8.0), "b": jnp.ones((2, 3))}


def _loss(params):
    return jnp.sum(params["w"] ** 2) + jnp.sum(jnp.sin(params["b"]))


def _run(tx, params, num_steps, seed_state=None):
    state = tx.init(params) if seed_state is None else seed_state
    for _ in range(num_steps):
        grads = jax.grad(_loss)(asgd.stale_params(state, params))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


# --------------------------------------------------------------------------------------------
# Issue 11.2: shapes, structures and dtypes are checked at trace time.


@pytest.mark.parametrize("where", ["stale_params", "update"])
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p: {"w": p["w"]}, r"structure.*missing leaves \[\"\['b'\]\"\]"),
        (lambda p: dict(p, w=p["w"][:1]), r"\['w'\] has shape \(1,\).*built for shape \(8,\)"),
        (
            lambda p: dict(p, b=p["b"].astype(jnp.bfloat16)),
            r"\['b'\] has shape \(2, 3\) and dtype bfloat16.*dtype float32",
        ),
    ],
    ids=["structure", "shape", "dtype"],
)
def test_params_that_do_not_fit_the_state_are_named(where, change, match):
    tx = asgd.stale(optax.sgd(0.1), delays.uniform(0, 4))
    state = tx.init(_params())
    wrong = change(_params())
    with pytest.raises(ValueError, match=match):
        if where == "stale_params":
            jax.jit(asgd.stale_params)(state, wrong)
        else:
            jax.jit(tx.update)(wrong, state, wrong)


def test_history_dtype_accepts_params_in_their_own_dtype():
    tx = asgd.stale(optax.sgd(0.1), delays.uniform(0, 4), history_dtype=jnp.bfloat16)
    state = tx.init(_params())
    at = asgd.stale_params(state, _params())
    assert at["w"].dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# Issue 11.3: jax_enable_x64 with vmap; the determinism and vmap tests run under x64 too.


def test_x64_vmap_over_seeds_runs_and_matches_separate_runs():
    code = """
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, optax, asgd_jax as asgd
params = {"w": jnp.arange(4.0), "b": jnp.ones((2,))}
assert params["w"].dtype == jnp.float64
tx = asgd.stale(optax.sgd(0.05), asgd.delays.uniform(0, 3), weight_prediction=True)
loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(jnp.cos(p["b"]))
def run(key):
    state, p = asgd.reseed(tx.init(params), key), params
    for _ in range(7):
        u, state = tx.update(jax.grad(loss)(asgd.stale_params(state, p)), state, p)
        p = optax.apply_updates(p, u)
    return p
keys = jax.random.split(jax.random.key(0), 3)
batched = jax.jit(jax.vmap(run))(keys)
for i in range(3):
    one = jax.jit(run)(keys[i])
    np.testing.assert_array_equal(batched["w"][i], one["w"])
assert batched["w"].dtype == jnp.float64
# The worker simulation keeps its int32 counters and float32 clock pairs under x64, and
# its methods agree bitwise there too (128 workers: the blocked loop).
from asgd_jax import workers
model = workers.parameter_server(128, workers.exponential(1.0), max_delay=4000)
ref = workers.simulate(model, jax.random.key(1), 400, method="events_reference")
for method in ("events", "sorted"):
    out = workers.simulate(model, jax.random.key(1), 400, method=method)
    np.testing.assert_array_equal(out.staleness, ref.staleness)
    np.testing.assert_array_equal(out.time, ref.time)
assert ref.staleness.dtype == jnp.int32 and ref.time.dtype == jnp.float32
ssp = workers.parameter_server(4, 1.0, protocol="ssp", max_staleness=1)
assert workers.simulate(ssp, jax.random.key(1), 20).staleness.dtype == jnp.int32
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_determinism_and_vmap_tests_pass_under_x64():
    tests = pathlib.Path(__file__).parent
    env = dict(os.environ, JAX_ENABLE_X64="1")
    selection = "Determinism or vmap or same_seed or reseed or matches_naive"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", selection]
        + [str(tests / "test_transforms.py"), str(tests / "test_history.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " deselected" in out.stdout


# --------------------------------------------------------------------------------------------
# Issue 11.10: bounded time and memory for any bound.


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: delays.uniform(0, 10**9), "high"),
        (lambda: delays.constant(10**12), "tau"),
        (lambda: delays.geometric(3.0, 10**9), "max_delay"),
        (lambda: delays.poisson(3.0, 10**9), "max_delay"),
        (lambda: delays.round_robin(10**9), "num_workers - 1"),
        (lambda: delays.trace([0, 10**9]), "max\\(taus\\)"),
        (lambda: delays.trace([0, 1], max_delay=10**9), "max_delay"),
    ],
)
def test_huge_bounds_fail_fast_naming_the_limit(make, name):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"`{name}` must be ≤ asgd_jax.delays.MAX_DELAY"):
        make()
    assert time.perf_counter() - start < 1.0


def test_the_limit_itself_is_accepted():
    model = delays.uniform(0, delays.MAX_DELAY)
    assert model.max_delay == delays.MAX_DELAY
    taus = delays.sample(model, jax.random.key(0), 4)
    assert bool(jnp.all((taus >= 0) & (taus <= delays.MAX_DELAY)))


# --------------------------------------------------------------------------------------------
# Issue 11.11: one rule for seeds (an int or a single key).


@pytest.mark.parametrize(
    "seed, exc",
    [
        (1.5, TypeError),
        ("abc", TypeError),
        (True, TypeError),
        (None, TypeError),
        (jnp.array(1.0), TypeError),
        (jax.random.split(jax.random.key(0), 3), ValueError),
        (jax.random.split(jax.random.PRNGKey(0), 3), ValueError),
        (2**70, ValueError),
    ],
    ids=["float", "str", "bool", "none", "float-array", "typed-batch", "raw-batch", "huge"],
)
def test_bad_seeds_are_named(seed, exc):
    with pytest.raises(exc, match="`seed`"):
        asgd.stale(optax.sgd(0.1), delays.uniform(0, 3), seed=seed)
    state = asgd.stale(optax.sgd(0.1), delays.uniform(0, 3)).init(_params())
    with pytest.raises(exc, match="`key`"):
        asgd.reseed(state, seed)


@pytest.mark.parametrize(
    "seed",
    [7, np.int64(7), jnp.int32(7), jax.random.key(7), jax.random.PRNGKey(7)],
    ids=["int", "numpy", "array", "typed", "raw"],
)
def test_every_accepted_seed_is_the_same_stream(seed):
    base = asgd.stale(optax.sgd(0.1), delays.uniform(0, 5), seed=7)
    want = asgd.upcoming_staleness(base.init(_params()), 12)
    tx = asgd.stale(optax.sgd(0.1), delays.uniform(0, 5), seed=seed)
    chex.assert_trees_all_equal(asgd.upcoming_staleness(tx.init(_params()), 12), want)
    reseeded = asgd.reseed(asgd.stale(optax.sgd(0.1), delays.uniform(0, 5)).init(_params()), seed)
    chex.assert_trees_all_equal(asgd.upcoming_staleness(reseeded, 12), want)


def test_reseed_with_traced_ints_under_vmap():
    tx = asgd.stale(optax.sgd(0.1), delays.uniform(0, 5))
    state = tx.init(_params())
    batched = jax.vmap(lambda s: asgd.upcoming_staleness(asgd.reseed(state, s), 6))(jnp.arange(3))
    for i in range(3):
        chex.assert_trees_all_equal(batched[i], asgd.upcoming_staleness(asgd.reseed(state, i), 6))


@pytest.mark.parametrize(
    "dtype, exc", [("bogus", TypeError), (jnp.complex64, ValueError), (jnp.int32, ValueError)]
)
def test_bad_history_dtype_is_named(dtype, exc):
    with pytest.raises(exc, match="`history_dtype`"):
        asgd.stale(optax.sgd(0.1), 2, history_dtype=dtype)


# --------------------------------------------------------------------------------------------
# Issue 11.12 (core): integer and complex leaves keep their own dtype in the history.


def test_integer_and_complex_leaves_are_stored_exactly():
    params = {
        "w": jnp.arange(3.0),
        "count": jnp.array([2**24 + 1, -7], jnp.int32),
        "z": jnp.array([1.0 + 2.0j, -3.0j], jnp.complex64),
    }
    tx = asgd.stale(optax.sgd(0.1), delays.constant(1), history_dtype=jnp.bfloat16)
    state = tx.init(params)
    hist = find_stale_state(state).history
    assert hist["w"].dtype == jnp.bfloat16
    assert hist["count"].dtype == jnp.int32 and hist["z"].dtype == jnp.complex64
    grads = jax.tree.map(jnp.zeros_like, params)
    _, state = tx.update(grads, state, params)
    at = asgd.stale_params(state, params)
    chex.assert_trees_all_equal(at["count"], params["count"])
    chex.assert_trees_all_equal(at["z"], params["z"])


# --------------------------------------------------------------------------------------------
# Issue 11.14: a trace replayed once through stale ends with exhausted == 1.


def test_trace_replayed_once_through_stale_leaves_one_draw_ahead():
    taus = [0, 1, 2, 1, 0, 2]
    tx = asgd.stale(optax.sgd(0.1), delays.trace(taus))
    _, state = _run(tx, _params(), len(taus) - 1)
    assert int(find_stale_state(state).delay_state.exhausted) == 0
    _, state = _run(tx, _params(), len(taus))
    assert int(find_stale_state(state).delay_state.exhausted) == 1
    np.testing.assert_array_equal(find_stale_state(state).metrics.staleness_histogram, [2, 2, 2])


# --------------------------------------------------------------------------------------------
# Issue 12.4: delay models and stale states compare and hash by value.


@pytest.mark.parametrize(
    "make",
    [
        lambda: delays.constant(3),
        lambda: delays.uniform(1, 6),
        lambda: delays.geometric(2.0, 9),
        lambda: delays.poisson(1.5, 7),
        lambda: delays.categorical([0.2, 0.3, 0.5], name="mine"),
        lambda: delays.round_robin(4),
        lambda: delays.trace([0, 3, 1], on_exhausted="hold"),
    ],
)
def test_identical_builds_are_equal_and_hash_alike(make):
    a, b = make(), make()
    assert a is not b and a == b and hash(a) == hash(b)
    tx_a, tx_b = asgd.stale(optax.adam(0.1), a, seed=2), asgd.stale(optax.adam(0.1), b, seed=2)
    sa, sb = tx_a.init(_params()), tx_b.init(_params())
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    jax.tree.map(lambda x, y: x + y, sa, sb)
    chex.assert_trees_all_equal(sa, sb)


def test_different_arguments_differ():
    assert delays.uniform(0, 4) != delays.uniform(0, 5)
    assert delays.uniform(0, 4) != delays.constant(4)
    assert delays.trace([0, 1]) != delays.trace([1, 0])
    assert delays.categorical([1, 1], name="a") != delays.categorical([1, 1], name="b")
    hand = delays.DelayModel(init=lambda k: (), next=lambda s: (jnp.int32(0), s), max_delay=0)
    twin = delays.DelayModel(init=hand.init, next=hand.next, max_delay=0)
    assert hand == hand and hand != twin  # no value key: identity


def test_rebuilt_optimizer_does_not_recompile_a_jitted_step():
    params = _params()

    @jax.jit
    def step(params, state):
        grads = jax.grad(_loss)(asgd.stale_params(state, params))
        return grads, asgd.staleness(state)

    for _ in range(3):
        tx = asgd.stale(optax.sgd(0.1), delays.uniform(0, 4), seed=0)
        step(params, tx.init(params))
    assert step._cache_size() == 1
    step(params, asgd.stale(optax.sgd(0.1), delays.uniform(0, 5)).init(params))
    assert step._cache_size() == 2


# --------------------------------------------------------------------------------------------
# Issue 12.5: one train step for plain and stale optimizers (opt-in), strict by default.


def test_plain_state_is_refused_by_default_and_passes_when_asked():
    params = _params()
    plain = optax.sgd(0.1).init(params)
    with pytest.raises(ValueError, match=r"has no asgd_jax.stale: build it with asgd.stale"):
        asgd.stale_params(plain, params)
    chex.assert_trees_all_equal(asgd.stale_params(plain, params, missing="params"), params)
    stale_state = asgd.stale(optax.sgd(0.1), 2).init(params)
    chex.assert_trees_all_equal(
        asgd.stale_params(stale_state, params, missing="params"),
        asgd.stale_params(stale_state, params),
    )
    with pytest.raises(ValueError, match="`missing`"):
        asgd.stale_params(plain, params, missing="zeros")


def test_two_stale_states_say_which_to_pass():
    params = _params()
    a = asgd.stale(optax.sgd(0.1), 2).init(params)
    with pytest.raises(ValueError, match="holds 2 asgd_jax.stale states; pass the StaleState"):
        asgd.stale_params((a, a), params)


# --------------------------------------------------------------------------------------------
# Issue 12.6: errors that name the fix; inject_hyperparams inside stale.


def test_multisteps_inside_stale_says_the_right_order():
    with pytest.raises(TypeError, match=r"optax.MultiSteps\(asgd.stale\("):
        asgd.stale(optax.MultiSteps(optax.sgd(0.1), 4), delays.uniform(0, 3))
    with pytest.raises(TypeError, match=r"optax.MultiSteps\(asgd.stale\("):
        tx = asgd.stale(optax.MultiSteps(optax.sgd(0.1), 4).gradient_transformation(), 2)
        tx.init(_params())


def test_outer_inject_hyperparams_without_static_args_names_them():
    def make(learning_rate, max_delay):
        return asgd.stale(optax.sgd(learning_rate), delays.uniform(0, max_delay))

    with pytest.raises(TypeError, match=r'static_args=\("max_delay",\)'):
        optax.inject_hyperparams(make)(0.1, max_delay=4).init(_params())
    tx = optax.inject_hyperparams(make, static_args=("max_delay",))(0.1, max_delay=4)
    tx.init(_params())


def test_inner_inject_hyperparams_are_reachable_with_optax_tree():
    tx = asgd.stale(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), delays.uniform(0, 3))
    params = _params()
    state = tx.init(params)
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(0.1)
    chex.assert_trees_all_equal(
        find_stale_state(state).inner_state.hyperparams["learning_rate"],
        optax.tree.get(state, "learning_rate"),
    )
    state = optax.tree.set(state, learning_rate=jnp.asarray(0.0))
    grads = jax.grad(_loss)(asgd.stale_params(state, params))
    updates, state = tx.update(grads, state, params)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))


# --------------------------------------------------------------------------------------------
# Issue 12.7: staleness-aware constants traceable; grad_fn keyword-only.


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (asgd.delay_compensation, {"lam": 0.05}),
        (asgd.delay_compensation, {"lam": 0.0}),
        (asgd.delay_compensation, {"lam": 0.05, "adaptive": True, "decay": 0.9, "eps": 1e-6}),
        (asgd.gap_aware, {"learning_rate": 0.1, "beta": 0.9, "eps": 1e-6}),
        (asgd.scale_by_staleness, {"rule": "polynomial", "a": 0.7}),
        (asgd.scale_by_staleness, {"rule": "hinge", "a": 0.5, "b": 1.0}),
        (asgd.scale_by_staleness, {"rule": "delay_adaptive", "concurrency": 2.0}),
        (asgd.scale_by_staleness, {"rule": "drop", "threshold": 1.0}),
    ],
)
def test_staleness_aware_constants_work_under_inject_hyperparams(factory, kwargs):
    static = tuple(k for k, v in kwargs.items() if isinstance(v, (str, bool)))
    injected = optax.inject_hyperparams(factory, static_args=static)(**kwargs)
    delay = delays.uniform(0, 3)
    tx_plain = asgd.stale(optax.chain(factory(**kwargs), optax.sgd(0.1)), delay, seed=4)
    tx_inject = asgd.stale(optax.chain(injected, optax.sgd(0.1)), delay, seed=4)
    p_plain, _ = _run(tx_plain, _params(), 8)
    p_inject, _ = jax.jit(lambda p: _run(tx_inject, p, 8))(_params())
    chex.assert_trees_all_close(p_plain, p_inject, rtol=1e-5)


def test_grad_fn_is_keyword_only():
    tx = asgd.stale(optax.sgd(0.1), 2)
    params = _params()
    state = tx.init(params)
    with pytest.raises(TypeError):
        tx.update(None, state, params, jax.grad(_loss))
    updates, _ = tx.update(None, state, params, grad_fn=jax.grad(_loss))
    want, _ = tx.update(jax.grad(_loss)(asgd.stale_params(state, params)), state, params)
    chex.assert_trees_all_equal(updates, want)


# --------------------------------------------------------------------------------------------
# Issue 12.3: flax msgpack checkpoints of a TrainState with a stale optimizer.


def test_flax_train_state_round_trips_through_msgpack():
    from flax import serialization
    from flax.training import train_state

    tx = asgd.stale(optax.adam(0.05), delays.uniform(0, 3), seed=1)
    state = train_state.TrainState.create(apply_fn=None, params=_params(), tx=tx)
    for _ in range(4):
        grads = jax.grad(_loss)(asgd.stale_params(state.opt_state, state.params))
        state = state.apply_gradients(grads=grads)
    as_dict = serialization.to_state_dict(state)
    stale_dict = as_dict["opt_state"]
    assert stale_dict["delay"] == {}
    assert set(stale_dict) >= {"history", "staleness", "step", "delay_state"}
    target = train_state.TrainState.create(apply_fn=None, params=_params(), tx=tx)
    restored = serialization.from_bytes(target, serialization.to_bytes(state))
    chex.assert_trees_all_equal(restored.params, state.params)
    chex.assert_trees_all_equal(restored.opt_state, state.opt_state)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)


# --------------------------------------------------------------------------------------------
# Issue 12.1 (core): NNX variable trees where a params pytree is expected.


def test_nnx_variables_are_accepted_and_arrays_returned():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = asgd.stale(optax.sgd(0.1), delays.constant(1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    at = asgd.stale_params(optimizer.opt_state, params)
    leaves = jax.tree.leaves(at)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    chex.assert_trees_all_equal(leaves, jax.tree.leaves(nnx.as_pure(params)))
    tau = asgd.staleness(optimizer.opt_state)
    assert isinstance(tau, jax.Array) and int(tau) == 1
    summary = asgd.staleness_summary(find_stale_state(optimizer.opt_state).metrics[1])
    assert isinstance(summary["mean"], jax.Array)
    for _ in range(2):
        grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3))) ** 2))(model)
        optimizer.update(model, grads)
    at = asgd.stale_params(optimizer.opt_state, nnx.state(model, nnx.Param))
    assert not np.allclose(np.asarray(at["kernel"]), np.asarray(model.kernel[...]))
