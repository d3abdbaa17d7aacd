"""Test configuration: 8 virtual CPU devices, set before jax is imported.

``ASGD_JAX_TEST_DEVICES=native`` runs the tests on the machine's own devices instead (a GPU,
say; ``benchmarks/device_check.sh`` sets it when it finds one): then neither the forced CPU
devices nor ``JAX_PLATFORMS=cpu`` is applied. Tests that need 8 devices need 8 there too.
"""

import os

if os.environ.get("ASGD_JAX_TEST_DEVICES", "cpu") != "native":
    _FLAG = "--xla_force_host_platform_device_count=8"
    if _FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never touch the network from tests (tfds, orbax, ...).
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS directory with the bundled digits prepared (modules may define their own)."""
    from asgd_jax import data

    directory = str(tmp_path_factory.mktemp("tfds"))
    data.prepare_bundled("digits", directory)
    return directory
