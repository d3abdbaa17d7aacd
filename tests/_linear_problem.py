"""The small linear regression the hogwild tests train (threads, rules and Ray alike)."""

import jax.numpy as jnp
import numpy as np

NUM_FEATURES = 6
PARAMS0 = {"w": jnp.zeros(NUM_FEATURES, jnp.float32), "b": jnp.zeros((), jnp.float32)}


def regression(num_examples=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, NUM_FEATURES)).astype(np.float32)
    w = rng.normal(size=NUM_FEATURES).astype(np.float32)
    y = (x @ w + 0.5 + 0.1 * rng.normal(size=num_examples)).astype(np.float32)
    return x, y


def squared_loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)
