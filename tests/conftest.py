"""Test configuration: 8 virtual CPU devices, set before jax is imported.

``ASGD_JAX_TEST_DEVICES=native`` runs the tests on the machine's own devices instead (a GPU,
say; ``benchmarks/device_check.sh`` sets it when it finds one): then neither the forced CPU
devices nor ``JAX_PLATFORMS=cpu`` is applied. Tests that need 8 devices need 8 there too.
"""

import os
import shutil
import tempfile

if os.environ.get("ASGD_JAX_TEST_DEVICES", "cpu") != "native":
    _FLAG = "--xla_force_host_platform_device_count=8"
    if _FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Never touch the network from tests (tfds, orbax, ...).
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")
# One persistent XLA compilation cache per test run, shared by the xdist workers and by the
# subprocesses and notebook kernels the tests start (they inherit the environment): the
# same programs compiled in several processes compile once (about a tenth of the suite's
# CPU time on 2 cores). The controlling process created it and removes it at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="asgd-jax-test-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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


def pytest_sessionfinish(session):
    # Only the process that made the cache removes it (xdist workers have `workerinput`).
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
