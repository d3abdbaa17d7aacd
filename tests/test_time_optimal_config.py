"""Rennala SGD and Ringmaster ASGD through TrainConfig, the builder and the CLI flags."""

import jax
import numpy as np
import pytest

from asgd_jax import train as train_lib
from asgd_jax import workers
from asgd_jax.cli import _flags

FIXED = dict(compute_time="deterministic", num_workers=5, num_steps=40, eval_every=40)


def test_ringmaster_config_builds_the_simulated_protocol():
    config = train_lib.TrainConfig(protocol="ringmaster", threshold=4, stops=True, **FIXED)
    model = train_lib.make_delay_model(config)
    direct = workers.parameter_server(
        5, workers.deterministic(1.0), protocol="ringmaster", threshold=4, stops=True
    )
    assert model.max_delay == direct.max_delay == 3  # τ < R by construction
    ours = workers.simulate(model, jax.random.key(7), 60)
    theirs = workers.simulate(direct, jax.random.key(7), 60)
    np.testing.assert_array_equal(np.asarray(ours.staleness), np.asarray(theirs.staleness))
    assert int(np.max(np.asarray(ours.staleness))) < 4
    assert config.gradients_per_update == 1


def test_rennala_config_averages_s_gradients_at_zero_staleness():
    config = train_lib.TrainConfig(protocol="rennala", k=3, **FIXED)
    assert config.gradients_per_update == 3
    model = train_lib.make_delay_model(config)
    assert model.max_delay == 0
    run = train_lib.train(config)
    assert float(np.max(run.max_staleness)) == 0.0


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(protocol="rennala"), "needs k"),
        (dict(protocol="ringmaster", k=2), "k applies to"),
        (dict(protocol="ringmaster", max_staleness=2), "max_staleness does not apply"),
        (dict(protocol="rennala", k=2, max_staleness=2), "max_staleness does not apply"),
        (dict(threshold=3), "threshold applies to"),
        (dict(protocol="ringmaster", threshold=0), "threshold"),
        (dict(stops=True), "stops applies to"),
        (dict(protocol="ringmaster", delay="none", stops=True), "stops applies to"),
    ],
)
def test_bad_combinations_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        train_lib.TrainConfig(**changes)


def test_stops_is_a_boolean_field_and_a_flag():
    with pytest.raises(TypeError, match="stops must be true or false"):
        train_lib.TrainConfig(protocol="ringmaster", stops="yes")
    spec = {s.name: s for s in train_lib.TrainConfig.schema()}["stops"]
    assert spec.type is bool and spec.default is False
    parse = _flags._value_parser(spec)
    assert parse("true") is True and parse("off") is False
    with pytest.raises(Exception, match="true or false"):
        parse("maybe")
    config = train_lib.TrainConfig.from_dict(
        train_lib.TrainConfig(protocol="ringmaster", threshold=2, stops=True).to_dict()
    )
    assert config.stops is True and config.threshold == 2
