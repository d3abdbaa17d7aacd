"""Tests for asgd_jax.models: shapes, plain-dict parameters, losses, validation, registry."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import asgd_jax as asgd
from asgd_jax import models

KEY = jax.random.key(0)


def _shapes(params):
    return jax.tree_util.tree_map(lambda a: a.shape, params)


def _assert_plain_float32_dict(tree):
    assert type(tree) is dict
    for value in tree.values():
        if isinstance(value, dict):
            _assert_plain_float32_dict(value)
        else:
            assert value.dtype == jnp.float32


@pytest.mark.parametrize(
    "model, input_shape, expected, count",
    [
        (
            models.logistic_regression(),
            (8, 8, 1),
            {"logits": {"kernel": (64, 10), "bias": (10,)}},
            650,
        ),
        (
            models.mlp((32, 16), num_classes=3),
            (8, 8, 1),
            {
                "hidden_0": {"kernel": (64, 32), "bias": (32,)},
                "hidden_1": {"kernel": (32, 16), "bias": (16,)},
                "logits": {"kernel": (16, 3), "bias": (3,)},
            },
            64 * 32 + 32 + 32 * 16 + 16 + 16 * 3 + 3,
        ),
        (  # the classic Hogwild MNIST net: 320 flattened features, 21,840 parameters
            models.cnn(),
            (28, 28, 1),
            {
                "conv_0": {"kernel": (5, 5, 1, 10), "bias": (10,)},
                "conv_1": {"kernel": (5, 5, 10, 20), "bias": (20,)},
                "hidden": {"kernel": (320, 50), "bias": (50,)},
                "logits": {"kernel": (50, 10), "bias": (10,)},
            },
            21840,
        ),
        (  # 8x8 digits: 'auto' padding is SAME, 2*2*20 = 80 features
            models.cnn(),
            (8, 8, 1),
            {
                "conv_0": {"kernel": (5, 5, 1, 10), "bias": (10,)},
                "conv_1": {"kernel": (5, 5, 10, 20), "bias": (20,)},
                "hidden": {"kernel": (80, 50), "bias": (50,)},
                "logits": {"kernel": (50, 10), "bias": (10,)},
            },
            260 + 5020 + 80 * 50 + 50 + 510,
        ),
    ],
)
def test_parameter_and_logit_shapes(model, input_shape, expected, count):
    # Shapes by abstract evaluation: no compilation, so the CNN cases cost only a trace.
    params = jax.eval_shape(lambda key: model.init(key, input_shape), KEY)
    _assert_plain_float32_dict(params)
    assert _shapes(params) == expected
    assert models.num_params(params) == count
    logits = jax.eval_shape(
        model.apply, params, jax.ShapeDtypeStruct((5, *input_shape), jnp.float32)
    )
    assert logits.shape == (5, model.num_classes) and logits.dtype == jnp.float32


def test_cnn_runs_on_digits_sized_images():
    model = models.cnn(channels=(3, 4), hidden_size=6, num_classes=5)
    # Parameters of the right shapes without compiling the initializer (init's numerics are
    # covered by the MLP tests); one compiled forward pass.
    abstract = jax.eval_shape(lambda key: model.init(key, (8, 8, 1)), KEY)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32), abstract
    )
    x = rng.uniform(size=(4, 8, 8, 1)).astype(np.float32)
    logits = jax.jit(model.apply)(params, x)
    assert logits.shape == (4, 5) and bool(jnp.all(jnp.isfinite(logits)))
    assert not np.allclose(logits[0], logits[1])  # the output depends on the image


def test_cnn_on_cifar_shapes_and_explicit_padding():
    def init_shapes(model, input_shape):
        return _shapes(jax.eval_shape(lambda key: model.init(key, input_shape), KEY))

    assert init_shapes(models.cnn(), (32, 32, 3))["hidden"]["kernel"] == (5 * 5 * 20, 50)
    same = init_shapes(models.cnn(padding="SAME", channels=(4, 6), hidden_size=7), (28, 28, 1))
    assert same["hidden"]["kernel"] == (7 * 7 * 6, 7)
    with pytest.raises(ValueError, match="too small"):
        init_shapes(models.cnn(padding="VALID"), (8, 8, 1))
    with pytest.raises(ValueError, match="height, width, channels"):
        init_shapes(models.cnn(), (64,))


def _reduce_window_pool(x):
    import flax.linen as nn

    return nn.max_pool(x, (2, 2), strides=(2, 2))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 9, 2), (1, 2, 2, 1)])
def test_max_pool_forward_equals_reduce_window(shape):
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    pooled = jax.jit(models.max_pool_2x2)(x)
    assert pooled.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
    np.testing.assert_array_equal(pooled, _reduce_window_pool(x))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 9, 2)])
def test_max_pool_gradient_equals_reduce_window_without_ties(shape):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(np.float32)
    rows, cols = shape[1] // 2, shape[2] // 2
    windows = x[:, : 2 * rows, : 2 * cols].reshape(shape[0], rows, 2, cols, 2, shape[3])
    top_two = np.sort(windows.transpose(0, 1, 3, 5, 2, 4).reshape(-1, 4), axis=1)[:, -2:]
    assert np.all(top_two[:, 0] < top_two[:, 1])  # no window has a tied maximum
    cotangent = rng.standard_normal((shape[0], rows, cols, shape[3])).astype(np.float32)
    (ours,) = jax.vjp(models.max_pool_2x2, x)[1](cotangent)
    (reference,) = jax.vjp(_reduce_window_pool, x)[1](cotangent)
    np.testing.assert_array_equal(ours, reference)


def test_max_pool_gradient_splits_ties():
    # One 2×2 window with all four entries equal, one with two tied maxima.
    x = np.array([[1.0, 1.0, 5.0, 0.0], [1.0, 1.0, 5.0, -1.0]], np.float32)[None, :, :, None]
    cotangent = np.array([[[[8.0], [6.0]]]], np.float32)
    (ours,) = jax.vjp(models.max_pool_2x2, x)[1](cotangent)
    expected = np.array([[2.0, 2.0, 3.0, 0.0], [2.0, 2.0, 3.0, 0.0]], np.float32)
    np.testing.assert_array_equal(ours[0, :, :, 0], expected)
    (reference,) = jax.vjp(_reduce_window_pool, x)[1](cotangent)
    # reduce_window gives each window's gradient to one of the tied elements; both keep the sum.
    assert sorted(np.asarray(reference)[0, :, :2, 0].ravel().tolist()) == [0.0, 0.0, 0.0, 8.0]
    np.testing.assert_array_equal(ours.sum(), reference.sum())


def test_cnn_matches_reduce_window_pooling(monkeypatch):
    model = models.cnn(channels=(3, 4), hidden_size=6)
    rng = np.random.default_rng(4)
    abstract = jax.eval_shape(lambda key: model.init(key, (12, 12, 1)), KEY)
    params = jax.tree_util.tree_map(
        lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32), abstract
    )
    batch = (rng.uniform(size=(5, 12, 12, 1)).astype(np.float32), np.arange(5) % 10)
    logits, grads = jax.jit(lambda p: (model.apply(p, batch[0]), jax.grad(model.loss)(p, batch)))(
        params
    )
    monkeypatch.setattr(models, "max_pool_2x2", _reduce_window_pool)
    old = models.cnn(channels=(3, 4), hidden_size=6)
    old_logits, old_grads = jax.jit(
        lambda p: (old.apply(p, batch[0]), jax.grad(old.loss)(p, batch))
    )(params)
    np.testing.assert_array_equal(logits, old_logits)
    chex.assert_trees_all_close(grads, old_grads, rtol=1e-6, atol=1e-7)


# One small model and input shape shared by the numerical tests, so that the jitted init,
# loss and steps compile once for the whole file.
MLP = models.mlp((8,), num_classes=4)
SHAPE = (3, 3, 1)


@pytest.fixture(scope="module")
def problem():
    x = np.random.default_rng(1).uniform(size=(40, *SHAPE)).astype(np.float32)
    y = np.arange(40, dtype=np.int32) % 4
    return x, y


def test_init_is_pure_in_the_key_and_vmaps():
    keys = jax.random.split(KEY, 3)
    stacked = jax.vmap(lambda k: MLP.init(k, SHAPE))(keys)
    singles = [MLP.init(k, SHAPE) for k in keys]
    for i, single in enumerate(singles):
        chex.assert_trees_all_equal(jax.tree_util.tree_map(lambda s, i=i: s[i], stacked), single)
    chex.assert_trees_all_equal(models.mlp((8,), num_classes=4).init(keys[0], SHAPE), singles[0])
    assert not np.array_equal(singles[0]["hidden_0"]["kernel"], singles[1]["hidden_0"]["kernel"])


def test_loss_and_accuracy_helpers():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 5.0]])
    labels = jnp.array([0, 1, 0, 2])
    loss, acc = jax.jit(lambda z, y: (models.loss_fn(z, y), models.accuracy(z, y)))(logits, labels)
    expected = -np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(4), labels])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(acc) == 0.5  # row 1 ties and argmax picks class 0: rows 0 and 3 are right
    uniform = jax.jit(models.loss_fn)(jnp.zeros((3, 10)), jnp.arange(3))
    np.testing.assert_allclose(uniform, np.log(10.0), rtol=1e-6)


def test_model_loss_evaluate_and_training_step(problem):
    x, y = problem
    params = MLP.init(KEY, SHAPE)

    @jax.jit
    def metrics(params):
        whole = MLP.evaluate(params, x, y)
        chunked = MLP.evaluate(params, x, y, batch_size=16)  # 16 does not divide 40
        direct = (MLP.loss(params, (x, y)), MLP.accuracy(params, (x, y)))
        return whole, chunked, direct

    whole, chunked, direct = metrics(params)
    np.testing.assert_allclose(whole[0], direct[0], rtol=1e-6)
    np.testing.assert_allclose(chunked[0], direct[0], rtol=1e-5)
    assert float(whole[1]) == float(chunked[1]) == float(direct[1])
    with pytest.raises(ValueError, match="batch_size"):
        MLP.evaluate(params, x, y, batch_size=0)

    tx = optax.sgd(0.5)

    def step(carry, _):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(MLP.loss)(params, (x, y))
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (trained, _), losses = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=30))(params)
    assert float(losses[-1]) < float(losses[0])
    assert jax.tree_util.tree_structure(trained) == jax.tree_util.tree_structure(params)


def test_params_compose_with_stale_params(problem):
    x, y = problem
    params = MLP.init(KEY, SHAPE)
    tx = asgd.stale(optax.sgd(0.1), delay=asgd.delays.constant(1))

    @jax.jit
    def two_steps(params):
        state = tx.init(params)
        stale_reads = []
        for _ in range(2):
            stale = asgd.stale_params(state, params)
            grads = jax.grad(MLP.loss)(stale, (x, y))
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            stale_reads.append(stale)
        return params, stale_reads

    final, (stale0, stale1) = two_steps(params)
    # With delay 1 both gradients are taken at W_0 (the first has no older snapshot).
    chex.assert_trees_all_equal(stale0, params)
    chex.assert_trees_all_equal(stale1, params)
    assert jax.tree_util.tree_structure(final) == jax.tree_util.tree_structure(params)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: models.logistic_regression(num_classes=1), ValueError, "num_classes"),
        (lambda: models.mlp((0,)), ValueError, r"hidden_sizes\[0\]"),
        (lambda: models.mlp(()), ValueError, "at least one layer"),
        (lambda: models.mlp(64), TypeError, "hidden_sizes"),
        (lambda: models.mlp((32, 1.5)), TypeError, r"hidden_sizes\[1\]"),
        (lambda: models.mlp((8,), activation="swish7"), ValueError, "activation"),
        (lambda: models.cnn(channels=(10,)), ValueError, "two entries"),
        (lambda: models.cnn(hidden_size=0), ValueError, "hidden_size"),
        (lambda: models.cnn(padding="FULL"), ValueError, "padding"),
        (lambda: models.mlp((4,)).init(KEY, ()), ValueError, "input_shape"),
        (lambda: models.mlp((4,)).init(KEY, (0, 3)), ValueError, "input_shape"),
    ],
)
def test_argument_validation(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_get_model_registry():
    assert models.MODELS == ("logreg", "mlp", "cnn")
    assert models.get_model("logreg").name == "logistic_regression"
    assert models.get_model("logistic_regression", num_classes=3).num_classes == 3
    assert models.get_model("mlp", hidden_sizes=[64, 32]).name == "mlp(64,32)"
    assert models.get_model("hogwild_cnn").name == "cnn(10,20,50)"
    with pytest.raises(ValueError, match="model must be one of"):
        models.get_model("resnet")
    with pytest.raises(TypeError, match="unknown argument"):
        models.get_model("mlp", widths=(3,))
