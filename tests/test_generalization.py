"""Tests of the generalization-under-asynchrony study (small sizes: a few compilations)."""

import jax.numpy as jnp
import numpy as np
import pytest

from asgd_jax import data
from asgd_jax import train as train_lib
from asgd_jax.experiments import generalization


def test_scaled_learning_rate():
    assert generalization.scaled_learning_rate(0.5, 0, "fixed") == 0.5
    assert generalization.scaled_learning_rate(0.5, 16, "fixed") == 0.5
    assert generalization.scaled_learning_rate(0.5, 0, "inverse_delay") == 0.5
    assert generalization.scaled_learning_rate(0.5, 1, "inverse_delay") == 0.5
    assert generalization.scaled_learning_rate(0.5, 8, "inverse_delay") == 0.0625
    with pytest.raises(ValueError, match="schedule"):
        generalization.scaled_learning_rate(0.5, 8, "sqrt")
    with pytest.raises(ValueError, match="learning_rate"):
        generalization.scaled_learning_rate(0.0, 8, "fixed")
    with pytest.raises(ValueError, match="mean_delay"):
        generalization.scaled_learning_rate(0.5, -1, "fixed")


def test_delay_config_has_the_requested_mean():
    base = train_lib.TrainConfig()
    assert generalization.delay_config(base, 0).delay == "none"
    uniform = generalization.delay_config(base, 8, "uniform")
    assert (uniform.delay, uniform.min_delay, uniform.max_delay) == ("uniform", 0, 16)
    assert train_lib.make_delay_model(uniform).pmf @ np.arange(17) == pytest.approx(8.0)
    constant = generalization.delay_config(base, 8, "constant")
    assert (constant.delay, constant.max_delay) == ("constant", 8)
    workers = generalization.delay_config(base, 8, "workers")
    assert (workers.delay, workers.num_workers, workers.protocol) == ("workers", 9, "async")
    with pytest.raises(ValueError, match="delay_law"):
        generalization.delay_config(base, 8, "pareto")


def test_parameter_distance():
    a = {"w": jnp.array([[0.0, 0.0], [1.0, 1.0]]), "b": jnp.array([[0.0], [2.0]])}
    b = {"w": jnp.array([[3.0, 0.0], [1.0, 1.0]]), "b": jnp.array([[4.0], [2.0]])}
    np.testing.assert_allclose(generalization.parameter_distance(a, b), [5.0, 0.0])
    single = generalization.parameter_distance(
        {"w": jnp.array([3.0]), "b": jnp.array(4.0)},
        {"w": jnp.array([0.0]), "b": jnp.array(0.0)},
        batched=False,
    )
    assert float(single) == 5.0
    with pytest.raises(ValueError, match="structure"):
        generalization.parameter_distance(a, {"w": a["w"]})


def test_study_arguments_are_checked():
    with pytest.raises(ValueError, match="delays"):
        generalization.generalization_study(delays=())
    with pytest.raises(ValueError, match="schedules"):
        generalization.generalization_study(schedules=("cosine",))
    with pytest.raises(ValueError, match="multiple of eval_every"):
        generalization.generalization_study(num_steps=250, eval_every=100)
    with pytest.raises(ValueError, match="stability_points"):
        generalization.generalization_study(num_steps=200, eval_every=100, stability_points=3)
    with pytest.raises(TypeError, match="base_config"):
        generalization.generalization_study(base_config={"model": "mlp"})


@pytest.fixture(scope="module")
def study():
    dataset = data.load("digits")
    return generalization.generalization_study(
        delays=(0, 4),
        schedules=("inverse_delay",),
        learning_rate=0.5,
        seeds=(0, 1),
        train_size=64,
        num_steps=60,
        eval_every=30,
        stability_points=2,
        batch_size=8,
        dataset=dataset,
    )


def test_study_shapes_and_consistency(study):
    shape = (1, 2, 2, 3)  # schedules, delays, seeds, evaluations
    for name in ("train_loss", "test_loss", "test_accuracy", "generalization_gap"):
        assert getattr(study, name).shape == shape, name
    np.testing.assert_array_equal(study.steps, [0, 30, 60])
    np.testing.assert_array_equal(study.stability_steps, [30, 60])
    assert study.stability.shape == (1, 2, 2, 2)
    np.testing.assert_array_equal(
        study.generalization_gap, np.abs(study.test_loss - study.train_loss)
    )
    np.testing.assert_array_equal(study.learning_rates, [[0.5, 0.125]])
    # Synchronous runs are never stale; the uniform{0..8} ones are, on average about 4.
    np.testing.assert_array_equal(study.mean_staleness[:, 0], 0.0)
    assert np.all((study.mean_staleness[:, 1] > 2.5) & (study.mean_staleness[:, 1] < 5.5))
    # S and S' differ in one example, so the runs separate, but not by much.
    assert np.all(study.stability > 0)
    assert np.all(np.isfinite(study.stability))
    # Training lowers the training loss from its value at initialization.
    assert np.all(study.train_loss[..., -1] < study.train_loss[..., 0])
    assert len(study.summary()) == 2
    assert "inverse_delay" in study.table()


def test_study_matches_train_on_the_subset(study):
    """The gap curve of one setting is train()'s history on S = the first 64 examples."""
    dataset = data.load("digits")
    config = generalization.delay_config(study.config, 4).replace(learning_rate=0.125)
    first, _ = data.neighbouring_pair(dataset, 0, train_size=64)
    direct = train_lib.train(config, seeds=(0, 1), dataset=first, progress=False)
    np.testing.assert_array_equal(study.train_loss[0, 1], direct.history["train_loss"])
    np.testing.assert_array_equal(study.test_loss[0, 1], direct.history["test_loss"])
