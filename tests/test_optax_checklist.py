"""The optax checklist, run on every optimizer this library builds.

One list of transformations (``stale`` around sgd, momentum and adam, and every
staleness-aware transform inside ``stale``), each put through the checks optax asks of a new
transform (``optax/contrib/_common_test.py``): extra arguments without recompiling,
convergence under ``lax.scan``, equality under ``inject_hyperparams``, wrapping by
``MultiSteps``, dtype preservation, ``init`` on abstract shapes, and sharding stability on
8 devices.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import asgd_jax as asgd
from asgd_jax import delays


def _delay():
    return delays.uniform(0, 3)


def _stale(*inner):
    return lambda learning_rate: asgd.stale(
        optax.chain(*(t(learning_rate) if callable(t) else t for t in inner)), _delay(), seed=5
    )


# name -> (factory of learning_rate, learning rate used by the checks)
OPTIMIZERS = {
    "sgd": (lambda learning_rate: asgd.stale(optax.sgd(learning_rate), _delay(), seed=5), 0.05),
    "momentum": (
        lambda learning_rate: asgd.stale(optax.sgd(learning_rate, momentum=0.5), _delay(), seed=5),
        0.02,
    ),
    "adam": (lambda learning_rate: asgd.stale(optax.adam(learning_rate), _delay(), seed=5), 0.05),
    "inverse": (_stale(optax.sgd, asgd.scale_by_staleness("inverse")), 0.05),
    "polynomial": (_stale(optax.sgd, asgd.scale_by_staleness("polynomial", a=0.5)), 0.05),
    "hinge": (_stale(optax.sgd, asgd.scale_by_staleness("hinge", a=1.0, b=1.0)), 0.05),
    "delay_adaptive": (
        _stale(optax.sgd, asgd.scale_by_staleness("delay_adaptive", concurrency=2)),
        0.05,
    ),
    "drop": (_stale(optax.sgd, asgd.scale_by_staleness("drop", threshold=1)), 0.05),
    "dc_asgd": (_stale(asgd.delay_compensation(0.04), optax.sgd), 0.05),
    "dc_asgd_adaptive": (_stale(asgd.delay_compensation(0.04, adaptive=True), optax.sgd), 0.05),
    "gap_aware": (_stale(lambda lr: asgd.gap_aware(lr), optax.sgd), 0.05),
    "weight_prediction": (
        lambda learning_rate: asgd.stale(
            optax.sgd(learning_rate), _delay(), seed=5, weight_prediction=True
        ),
        0.02,
    ),
}
NAMES = sorted(OPTIMIZERS)
TARGET = {"w": jnp.array([1.0, -2.0, 3.0, 0.5]), "b": jnp.array([[0.5, -0.5], [1.5, 2.0]])}


def _loss(params):
    return sum(jnp.sum((params[k] - TARGET[k]) ** 2) for k in TARGET)


def _params(dtype=jnp.float32):
    return jax.tree.map(lambda t: jnp.zeros_like(t, dtype), TARGET)


def _step(tx):
    def step(carry, _):
        params, state = carry
        grads = jax.grad(_loss)(asgd.stale_params(state, params))
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    return step


def _scan(tx, params, num_steps):
    (params, state), _ = jax.lax.scan(_step(tx), (params, tx.init(params)), None, length=num_steps)
    return params, state


@pytest.mark.parametrize("name", NAMES)
def test_extra_args_change_without_recompiling(name):
    make, lr = OPTIMIZERS[name]
    tx = make(lr)
    params = _params()
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, v: tx.update(g, s, p, loss=v))
    grads = jax.grad(_loss)(params)
    outs = [update(grads, state, params, jnp.asarray(v)) for v in (0.0, 1.0, 2.0)]
    assert update._cache_size() == 1
    chex.assert_trees_all_equal(outs[0], outs[2])


@pytest.mark.parametrize("name", NAMES)
def test_converges_under_scan(name):
    make, lr = OPTIMIZERS[name]
    params, _ = jax.jit(lambda p: _scan(make(lr), p, 600))(_params())
    assert float(_loss(params)) < 1e-3 * float(_loss(_params()))


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_equals_the_plain_optimizer(name):
    make, lr = OPTIMIZERS[name]
    plain, _ = jax.jit(lambda p: _scan(make(lr), p, 20))(_params())
    injected = optax.inject_hyperparams(make)(learning_rate=lr)
    params, state = jax.jit(lambda p: _scan(injected, p, 20))(_params())
    chex.assert_trees_all_close(params, plain, rtol=1e-6, atol=1e-7)
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(lr)


@pytest.mark.parametrize("name", NAMES)
def test_wrapped_by_multisteps(name):
    make, lr = OPTIMIZERS[name]
    every = 3
    tx = optax.MultiSteps(make(lr), every_k_schedule=every)
    params = _params()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        at = asgd.stale_params(state, params)
        updates, state = tx.update(jax.grad(_loss)(at), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(4 * every):
        params, state = step(params, state)
    # The stale wrapper sees one (accumulated) gradient per `every` micro-steps.
    assert int(asgd.transforms.find_stale_state(state).step) == 4
    assert float(_loss(params)) < float(_loss(_params()))


@pytest.mark.parametrize("name", NAMES)
def test_preserves_dtypes(name):
    make, lr = OPTIMIZERS[name]
    tx = make(lr)
    params = _params(jnp.bfloat16)
    state = tx.init(params)
    grads = jax.grad(_loss)(asgd.stale_params(state, params))
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.dtype == p.dtype == jnp.bfloat16
    chex.assert_trees_all_equal_dtypes(state, new_state)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(asgd.stale_params(state, params)))


@pytest.mark.parametrize("name", NAMES)
def test_init_on_abstract_shapes(name):
    make, lr = OPTIMIZERS[name]
    tx = make(lr)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
    shapes = jax.eval_shape(tx.init, abstract)
    concrete = tx.init(_params())
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, concrete)
    assert jax.tree.structure(shapes) == jax.tree.structure(concrete)


@pytest.mark.parametrize("name", NAMES)
def test_state_sharding_is_stable_on_8_devices(name):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    make, lr = OPTIMIZERS[name]
    tx = make(lr)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    named = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))  # noqa: E731
    params = {
        "w": jax.device_put(jnp.zeros((16, 4)), named("data", None)),
        "b": jax.device_put(jnp.zeros((4,)), named()),
    }
    loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2) + jnp.sum((p["b"] + 1.0) ** 2)  # noqa: E731

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(asgd.stale_params(state, params)), state, params)
        return optax.apply_updates(params, updates), state

    state = jax.jit(tx.init)(params)
    new_params, new_state = step(params, state)
    new_params, new_state = step(new_params, new_state)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    # The wrapper's own leaves keep their sharding (the inner optimizer's state is optax's
    # business: its zeros are initialised replicated under jit).
    ours = lambda s: asgd.transforms.find_stale_state(s)._replace(inner_state=())  # noqa: E731
    for before, after in zip(
        jax.tree.leaves(ours(state)), jax.tree.leaves(ours(new_state)), strict=True
    ):
        assert after.sharding.is_equivalent_to(before.sharding, after.ndim)
    for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(new_params), strict=True):
        assert after.sharding.is_equivalent_to(before.sharding, after.ndim)
