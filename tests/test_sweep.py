"""train(config, sweep=...): vmapped points equal the runs alone; shape fields loop; bad input.

What is exact and what is not. A point's delay stream, simulated clock, counters, staleness
histogram and the delay model's state are bit for bit those of ``train(point, seeds=...)``:
they are elementwise integer and float32 operations on data computed on the host as a single
run computes them. Parameters and losses go through matrix products that XLA batches over
the vmapped axis, and a batch of points × seeds may round differently from a batch of seeds
(as seeds under vmap do against single runs): they are compared to float32 rounding,
``rtol=1e-5, atol=1e-6`` over these short runs (measured: at most 3e-8 apart, often equal).
"""

import jax
import numpy as np
import pytest

from asgd_jax import train as train_lib
from asgd_jax.train import _sweep

SMALL = dict(hidden_sizes=(8,), batch_size=16, num_steps=12, eval_every=6)
EXACT = ("step", "time", "updates_applied", "updates_dropped", "gradients_dropped")
EXACT += ("staleness_clipped", "mean_staleness", "max_staleness")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def dataset():
    return train_lib.load_dataset(train_lib.TrainConfig())


def _assert_point_equals_alone(swept, point, dataset):
    config = swept.config.replace(**point)
    alone = train_lib.train(config, seeds=SEEDS, dataset=dataset, progress=False)
    mine = swept.result(**point)
    assert mine.config == config and mine.seeds == SEEDS
    assert set(mine.history) == set(alone.history)
    for key in EXACT:
        np.testing.assert_array_equal(mine.history[key], alone.history[key], err_msg=key)
    np.testing.assert_array_equal(mine.staleness_histogram, alone.staleness_histogram)
    delay_state = lambda r: train_lib.TrainState(*r.state).opt_state  # noqa: E731
    from asgd_jax import transforms

    a = transforms.find_stale_state(delay_state(mine))
    b = transforms.find_stale_state(delay_state(alone))
    assert a.delay == b.delay  # the point's own concrete model, as the run alone has
    for x, y in zip(jax.tree.leaves(a.delay_state), jax.tree.leaves(b.delay_state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for key in ("train_loss", "test_loss", "test_accuracy", "batch_loss"):
        np.testing.assert_allclose(mine.history[key], alone.history[key], rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(mine.params), jax.tree.leaves(alone.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    return mine


def test_learning_rate_and_delay_mean_in_one_program(dataset):
    base = train_lib.TrainConfig(delay="geometric", delay_mean=2.0, max_delay=8, **SMALL)
    sweep = {"learning_rate": [0.05, 0.3], "delay_mean": [1.0, 6.0]}
    swept = train_lib.train(base, sweep=sweep, seeds=SEEDS, dataset=dataset, progress=False)
    assert swept.num_programs == 1 and swept.vmapped == ("learning_rate", "delay_mean")
    assert swept.looped == () and len(swept) == 4
    assert [p for p, _ in swept] == [
        {"learning_rate": lr, "delay_mean": m} for lr in (0.05, 0.3) for m in (1.0, 6.0)
    ]
    point = _assert_point_equals_alone(swept, {"learning_rate": 0.3, "delay_mean": 6.0}, dataset)
    # The points really differ: the delay mean changes τ, the learning rate the parameters.
    other = swept.result(learning_rate=0.3, delay_mean=1.0)
    assert point.mean_staleness.mean() > other.mean_staleness.mean() + 2
    slow = swept.result(learning_rate=0.05, delay_mean=6.0)
    np.testing.assert_array_equal(slow.staleness_histogram, point.staleness_histogram)
    assert not np.allclose(
        slow.history["train_loss"][..., -1], point.history["train_loss"][..., -1]
    )


def test_worker_law_and_num_slow_in_one_program(dataset):
    base = train_lib.TrainConfig(num_workers=4, max_delay=40, **SMALL)
    sweep = {"compute_mean": [0.5, 2.0], "num_slow": [0, 2]}
    swept = train_lib.train(base, sweep=sweep, seeds=SEEDS, dataset=dataset, progress=False)
    assert swept.num_programs == 1 and swept.max_delays == (40,)
    point = _assert_point_equals_alone(swept, {"compute_mean": 2.0, "num_slow": 2}, dataset)
    fast = swept.result(compute_mean=0.5, num_slow=2)
    np.testing.assert_allclose(point.history["time"], 4 * fast.history["time"], rtol=1e-5)
    even = swept.result(compute_mean=2.0, num_slow=0)
    assert not np.array_equal(even.staleness_histogram, point.staleness_histogram)


def test_shape_fields_and_differing_bounds_loop_and_say_so(dataset):
    base = train_lib.TrainConfig(delay="uniform", max_delay=4, **SMALL)
    sweep = {"hidden_sizes": [(4,), (8,)], "learning_rate": [0.1, 0.2]}
    swept = train_lib.train(base, sweep=sweep, dataset=dataset, progress=False)
    assert swept.looped == ("hidden_sizes",) and swept.vmapped == ("learning_rate",)
    assert swept.groups == ((0, 1), (2, 3)) and swept.seeds is None
    assert "looped: hidden_sizes" in swept.describe() and "2 compiled programs" in swept.describe()
    result = swept.result(hidden_sizes=(4,), learning_rate=0.2)
    assert result.params["hidden_0"]["kernel"].shape[-1] == 4
    assert result.history["step"].tolist() == [0, 6, 12]  # no seed axis without seeds
    # num_slow is data, but the derived history bound 15·n·slow_factor differs from 15·n.
    workers = train_lib.TrainConfig(num_workers=2, **SMALL)
    split = train_lib.check_sweep(workers, {"num_slow": [0, 1, 2]})[2]
    bounds = [train_lib.make_delay_model(c).max_delay for c in split]
    assert bounds == [30, 120, 120]


def test_bad_sweeps_are_rejected_before_anything_is_built(dataset):
    base = train_lib.TrainConfig(**SMALL)
    builds = _sweep._SWEEP_ENTRIES.builds
    cases = [
        ({"learning_rat": [0.1]}, ValueError, "unknown config field 'learning_rat'"),
        ({"learning_rate": []}, ValueError, r"sweep\['learning_rate'\] must list at least one"),
        ({"learning_rate": 0.1}, TypeError, "must be a list of values"),
        ({"learning_rate": [0.1, -1.0]}, ValueError, r"learning_rate=-1.0: .*> 0"),
        ({"momentum": [0.5, 1.0]}, ValueError, r"momentum=1.0"),
        ({"learning_rate": [0.1, "fast"]}, TypeError, "learning_rate='fast': not a number"),
        ({"num_slow": [1, 1.5]}, TypeError, "num_slow=1.5: not an integer"),
        ({"delay_mean": [None]}, TypeError, "delay_mean=None: not a number"),
        ({"num_slow": [1, 9]}, ValueError, "num_slow=9: num_slow must be in"),
        ({"learning_rate": [0.1, 0.1]}, ValueError, "repeats a value"),
        ({"seed": [1, 2]}, ValueError, "seeds="),
        ({"num_workers": [0]}, ValueError, "num_workers=0"),
    ]
    for sweep, kind, message in cases:
        with pytest.raises(kind, match=message):
            train_lib.train(base, sweep=sweep, dataset=dataset, progress=False)
    geometric = base.replace(delay="geometric", delay_mean=1.0, max_delay=4)
    with pytest.raises(ValueError, match="delay_mean=9.0: .*max_delay"):
        train_lib.train(geometric, sweep={"delay_mean": [1.0, 9.0]}, dataset=dataset)
    with pytest.raises(ValueError, match="saves no checkpoints"):
        train_lib.train(base, sweep={"learning_rate": [0.1]}, checkpoint_dir="/nonexistent")
    assert _sweep._SWEEP_ENTRIES.builds == builds
