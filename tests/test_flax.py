"""Flax: the README's linen and NNX recipes, run as written, and the asgd_jax.nnx / linen helpers.

The README blocks of "Using asgd_jax with Flax" are executed here verbatim (a delay or an
optimizer name substituted where a test needs another), so the documented two-line changes
are the tested ones.
"""

import pathlib
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training import train_state

import asgd_jax as asgd
import asgd_jax.linen as asgd_linen
import asgd_jax.nnx as asgd_nnx

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def _substitute(code: str, old: str, new: str) -> str:
    assert old in code, old
    return code.replace(old, new)


class _Asgd:
    """``asgd`` as the README spells it, with ``asgd.nnx`` and ``asgd.linen``."""

    nnx, linen = asgd_nnx, asgd_linen

    def __getattr__(self, name):
        return getattr(asgd, name)


def _Namespace(**names):
    base = dict(jax=jax, jnp=jnp, optax=optax, nnx=nnx, train_state=train_state, ocp=ocp)
    return {**base, "asgd": _Asgd(), **names}


def _batches(num, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(num, size, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, (num, size))
    return [(jnp.asarray(x), jnp.asarray(y)) for x, y in zip(images, labels, strict=True)]


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------------
# linen: TrainState.


class _LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _linen_blocks():
    block = _readme_blocks("Using asgd_jax with Flax")[0]
    setup, rest = block.split("# training:", 1)
    train, evaluate = rest.split("# evaluation:", 1)
    return setup, "# training:" + train, "# evaluation:" + evaluate


def _linen_run(delay_src, steps, learning_rate=0.1, momentum=0.9):
    setup, train, evaluate = _linen_blocks()
    batches = _batches(steps + 1)
    cnn = _LinenCNN()
    params = cnn.init(jax.random.key(0), batches[0][0])["params"]
    ns = _Namespace(cnn=cnn, params=params, learning_rate=learning_rate, momentum=momentum)
    exec(_substitute(setup, "asgd.delays.uniform(0, 8)", delay_src), ns)
    history = [ns["state"].params]
    for images, labels in batches[:steps]:
        ns.update(images=images, labels=labels)
        exec(train, ns)
        history.append(ns["state"].params)
    ns.update(test_images=batches[-1][0], test_labels=batches[-1][1])
    exec(evaluate, ns)
    return ns, history, batches


def test_linen_recipe_with_delay_zero_is_flax_example_bit_for_bit():
    ns, _, batches = _linen_run("0", steps=4)
    # Flax's example unchanged: plain optimizer, gradient at state.params.
    state = train_state.TrainState.create(
        apply_fn=ns["cnn"].apply, params=ns["params"], tx=optax.sgd(0.1, 0.9)
    )
    for images, labels in batches[:4]:
        grads, _, _ = ns["apply_model"](state, state.params, images, labels)
        state = ns["update_model"](state, grads)
    _assert_trees_equal(ns["state"].params, state.params)
    assert int(ns["state"].step) == int(state.step) == 4
    _, test_loss, test_accuracy = ns["apply_model"](
        state, state.params, batches[-1][0], batches[-1][1]
    )
    assert float(ns["test_loss"]) == float(test_loss)
    assert float(ns["test_accuracy"]) == float(test_accuracy)


def test_linen_recipe_takes_the_gradient_at_the_stale_parameters():
    learning_rate, momentum, tau = 0.1, 0.9, 2
    ns, history, batches = _linen_run(f"asgd.delays.constant({tau})", 5, learning_rate, momentum)
    state = ns["state"]
    # The three spellings of the stale point agree, and it is W_{t−τ}.
    at = asgd_linen.stale_params(state)
    _assert_trees_equal(at, asgd.stale_params(state.opt_state, state.params))
    _assert_trees_equal(at, asgd.stale_params(state, state.params))
    _assert_trees_equal(at, history[5 - tau])
    # Heavy-ball SGD with g_t = ∇L(W_{max(t−τ, 0)}), written out by hand.
    cnn = ns["cnn"]

    def loss(p, x, y):
        logits = cnn.apply({"params": p}, x)
        return jnp.mean(optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, 10)))

    w, trace = history[0], jax.tree.map(jnp.zeros_like, history[0])
    for t, (images, labels) in enumerate(batches[:5]):
        g = jax.grad(loss)(history[max(t - tau, 0)], images, labels)
        trace = jax.tree.map(lambda m, g: g + momentum * m, trace, g)
        w = jax.tree.map(lambda w, m: w - learning_rate * m, w, trace)
        for x, y in zip(jax.tree.leaves(w), jax.tree.leaves(history[t + 1]), strict=True):
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)
    # Evaluation in the recipe is at the live parameters, not the stale ones.
    _, test_loss, _ = ns["apply_model"](state, state.params, batches[-1][0], batches[-1][1])
    _, stale_loss, _ = ns["apply_model"](state, at, batches[-1][0], batches[-1][1])
    assert float(ns["test_loss"]) == float(test_loss) != float(stale_loss)


def test_linen_opaque_apply_gradients_equals_the_explicit_form():
    cnn = _LinenCNN()
    batches = _batches(4)
    params = cnn.init(jax.random.key(0), batches[0][0])["params"]
    tx = asgd.stale(optax.sgd(0.1, 0.9), delay=asgd.delays.uniform(0, 3))
    explicit = opaque = train_state.TrainState.create(apply_fn=cnn.apply, params=params, tx=tx)

    def loss(p, x, y):
        logits = cnn.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def explicit_step(state, x, y):
        grads = jax.grad(loss)(asgd_linen.stale_params(state), x, y)
        return state.apply_gradients(grads=grads)

    @jax.jit
    def opaque_step(state, x, y):
        return asgd_linen.apply_gradients(state, grad_fn=lambda p: jax.grad(loss)(p, x, y))

    for x, y in batches:
        explicit, opaque = explicit_step(explicit, x, y), opaque_step(opaque, x, y)
    _assert_trees_equal(explicit.params, opaque.params)
    _assert_trees_equal(explicit.opt_state, opaque.opt_state)
    assert int(opaque.step) == 4
    with pytest.raises(TypeError, match="TrainState"):
        asgd_linen.stale_params({"params": params})
    with pytest.raises(TypeError, match="grad_fn"):
        asgd_linen.apply_gradients(explicit, grad_fn=None)


def test_multisteps_outside_stale_takes_every_micro_gradient_at_one_stale_point():
    k, tau = 3, 1
    params = {"w": jnp.arange(3.0)}
    tx = optax.MultiSteps(asgd.stale(optax.sgd(0.1), delay=tau), every_k_schedule=k)
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    loss = lambda p, c: jnp.sum((p["w"] - c) ** 2)
    points, live = [], [state.params]
    for i in range(2 * k + 1):
        at = asgd.stale_params(state.opt_state, state.params)
        points.append(at["w"])
        state = state.apply_gradients(grads=jax.grad(loss)(at, float(i)))
        if (i + 1) % k == 0:
            live.append(state.params)
    # Micro-steps of one accumulation read the same point; the update after reads W_{u−τ}.
    np.testing.assert_array_equal(points[0], points[k - 1])
    np.testing.assert_array_equal(points[k], points[2 * k - 1])
    np.testing.assert_array_equal(points[k], live[0]["w"])  # update 1 reads W_0 (τ = 1)
    np.testing.assert_array_equal(points[2 * k], live[1]["w"])  # update 2 reads W_1
    histogram = optax.tree.get(state.opt_state, "staleness_histogram")
    assert histogram.tolist() == [0, 2]  # two inner updates applied, both with τ = 1


def test_inject_hyperparams_inside_stale_lives_at_inner_state():
    params = {"w": jnp.ones(3)}
    tx = asgd.stale(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), delay=2)
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    hyper = state.opt_state.inner_state.hyperparams
    assert float(hyper["learning_rate"]) == pytest.approx(0.1)
    hyper["learning_rate"] = jnp.asarray(0.0)
    state = state.apply_gradients(grads={"w": jnp.ones(3)})
    np.testing.assert_array_equal(state.params["w"], params["w"])  # a zero step

    def make(learning_rate, max_delay):
        return asgd.stale(optax.sgd(learning_rate), asgd.delays.uniform(0, max_delay))

    outer = optax.inject_hyperparams(make, static_args=("max_delay",))(0.1, max_delay=8)
    assert float(outer.init(params).hyperparams["learning_rate"]) == pytest.approx(0.1)


def _stale_train_state():
    cnn = _LinenCNN()
    batches = _batches(3)
    params = cnn.init(jax.random.key(0), batches[0][0])["params"]
    tx = asgd.stale(optax.sgd(0.1, 0.9), delay=asgd.delays.uniform(0, 4))
    state = train_state.TrainState.create(apply_fn=cnn.apply, params=params, tx=tx)

    @jax.jit
    def step(state, x, y):
        def loss(p):
            logits = state.apply_fn({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return state.apply_gradients(grads=jax.grad(loss)(asgd_linen.stale_params(state)))

    for x, y in batches[:2]:
        state = step(state, x, y)
    return state, step, batches[2]


def test_orbax_checkpoint_recipe_resumes_bit_for_bit(tmp_path):
    state, step, (x, y) = _stale_train_state()
    block = _readme_blocks("Using asgd_jax with Flax")[2]
    ns = _Namespace(state=state, path=tmp_path / "ckpt")
    exec(block, ns)
    restored = ns["state"]
    _assert_trees_equal(restored, state)
    _assert_trees_equal(step(restored, x, y), step(state, x, y))


def test_msgpack_round_trips_a_train_state():
    state, step, (x, y) = _stale_train_state()
    data = flax.serialization.to_bytes(state)
    restored = flax.serialization.from_bytes(state, data)
    _assert_trees_equal(restored, state)
    _assert_trees_equal(step(restored, x, y), step(state, x, y))


# --------------------------------------------------------------------------------------------
# NNX: nnx.Optimizer.


class _NNXCNN(nnx.Module):
    def __init__(self, *, dropout: float, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.linear = nnx.Linear(4 * 4 * 4, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        x = nnx.avg_pool(x, (2, 2), (2, 2))
        return self.linear(self.dropout(x.reshape(x.shape[0], -1)))


def _nnx_ns(model, delay, code_subs=()):
    block = _readme_blocks("Using asgd_jax with Flax")[1]
    for old, new in code_subs:
        block = _substitute(block, old, new)
    ns = _Namespace(model=model, learning_rate=0.01, momentum=0.9, delay=delay)
    exec(block, ns)
    return ns


def _metrics():
    return nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))


def _run_nnx(ns, batches):
    metrics = _metrics()
    for images, labels in batches:
        ns["train_step"](ns["model"], ns["optimizer"], metrics, {"image": images, "label": labels})
    return metrics.compute()


def test_nnx_recipe_with_delay_zero_is_the_tutorial_bit_for_bit():
    batches = _batches(4)
    stale = _nnx_ns(_NNXCNN(dropout=0.2, rngs=nnx.Rngs(0)), delay=0)
    tutorial = _nnx_ns(
        _NNXCNN(dropout=0.2, rngs=nnx.Rngs(0)),
        delay=None,
        code_subs=[
            ("asgd.stale(optax.adamw(learning_rate, momentum), delay)", "optax.adamw(0.01, 0.9)"),
            ("asgd.nnx.stale_model(model, optimizer)", "model"),
        ],
    )
    _assert_trees_equal(_run_nnx(stale, batches), _run_nnx(tutorial, batches))
    # Parameters, BatchNorm statistics and RNG counts all agree bit for bit.
    _assert_trees_equal(nnx.state(stale["model"]), nnx.state(tutorial["model"]))
    assert int(stale["model"].dropout.rngs.count[...]) == 4
    metrics = _metrics()
    batch = {"image": batches[0][0], "label": batches[0][1]}
    stale["model"].eval()
    stale["eval_step"](stale["model"], metrics, batch)
    assert np.isfinite(float(metrics.compute()["loss"]))


def test_nnx_recipe_takes_the_gradient_at_the_stale_parameters():
    tau, learning_rate = 2, 0.01
    model = _NNXCNN(dropout=0.0, rngs=nnx.Rngs(1))
    ns = _nnx_ns(
        model,
        delay=asgd.delays.constant(tau),
        code_subs=[("optax.adamw(learning_rate, momentum)", "optax.sgd(learning_rate)")],
    )
    optimizer, metrics = ns["optimizer"], _metrics()
    live = [nnx.as_pure(nnx.state(model, nnx.Param))]
    for t, (images, labels) in enumerate(_batches(5, seed=3)):
        at = asgd_nnx.stale_params(model, optimizer)
        _assert_trees_equal(at, live[max(t - tau, 0)])
        assert int(asgd_nnx.staleness(optimizer)) == tau
        # The expected gradient, on a copy of the model set to W_{t−τ}.
        probe = nnx.clone(model)
        nnx.update(probe, at)
        loss_fn = lambda m, x=images, y=labels: ns["loss_fn"](m, {"image": x, "label": y})[0]
        expected = nnx.grad(loss_fn)(probe)
        ns["train_step"](model, optimizer, metrics, {"image": images, "label": labels})
        live.append(nnx.as_pure(nnx.state(model, nnx.Param)))
        step = jax.tree.map(lambda new, old: new - old, live[-1], live[-2])
        for s, g in zip(jax.tree.leaves(step), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(s, -learning_rate * g, rtol=1e-4, atol=1e-7)
        # The live model's BatchNorm statistics came from the forward pass at W_{t−τ}.
        for a, b in zip(
            jax.tree.leaves(nnx.state(model, nnx.BatchStat)),
            jax.tree.leaves(nnx.state(probe, nnx.BatchStat)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_nnx_readers_return_arrays_and_plain_optimizers_need_strict_false():
    model = _NNXCNN(dropout=0.1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, asgd.stale(optax.sgd(0.1), asgd.delays.uniform(0, 3)), wrt=nnx.Param
    )
    tau = asgd_nnx.staleness(optimizer)
    assert isinstance(tau, jax.Array) and tau.dtype == jnp.int32
    state = asgd_nnx.opt_state(optimizer)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    summary = asgd.staleness_summary(state.metrics.staleness_histogram)
    assert float(summary["mean"]) == 0.0
    stale = asgd_nnx.stale_model(model, optimizer)
    assert type(stale) is _NNXCNN and stale is not model
    assert stale.bn.mean is model.bn.mean and stale.bn.var is model.bn.var
    assert stale.dropout.rngs.count is model.dropout.rngs.count
    assert stale.conv.kernel is not model.conv.kernel

    plain = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    with pytest.raises(ValueError, match="has no asgd_jax.stale"):
        asgd_nnx.stale_model(model, plain)
    assert asgd_nnx.stale_model(model, plain, strict=False) is model
    with pytest.raises(ValueError, match="has no asgd_jax.stale"):
        asgd_nnx.staleness(plain)
    with pytest.raises(TypeError, match="nnx.Optimizer"):
        asgd_nnx.stale_model(model, optax.sgd(0.1))


def test_nnx_max_curvature_is_exact_on_least_squares_and_leaves_the_model_alone():
    x = jax.random.normal(jax.random.key(0), (32, 3))
    y = jnp.ones((32, 1))
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    before = nnx.as_pure(nnx.state(model))
    loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    top = asgd_nnx.max_curvature(model, loss_fn, x, y, num_iterations=200)
    design = jnp.concatenate([jnp.ones((32, 1)), x], axis=1)  # bias and kernel
    exact = float(jnp.linalg.eigvalsh(2.0 * design.T @ design / 32)[-1])
    assert top == pytest.approx(exact, rel=1e-4)
    _assert_trees_equal(nnx.as_pure(nnx.state(model)), before)

    cnn = _NNXCNN(dropout=0.0, rngs=nnx.Rngs(0))
    stats = nnx.as_pure(nnx.state(cnn, nnx.BatchStat))
    images, labels = _batches(1)[0]
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(images), labels).mean()
    assert asgd_nnx.max_curvature(cnn, loss, num_iterations=5) > 0
    _assert_trees_equal(nnx.as_pure(nnx.state(cnn, nnx.BatchStat)), stats)
