"""Every public name of every module stays importable from the same path.

``tests/data/public_api.json`` is the snapshot of each public module's ``__all__`` taken
before the modules were split into packages; a refactor may add names, never drop one.
"""

import importlib
import json
import pathlib

import pytest

SNAPSHOT = json.loads((pathlib.Path(__file__).parent / "data" / "public_api.json").read_text())


@pytest.mark.parametrize("module_name", sorted(SNAPSHOT))
def test_every_snapshotted_name_is_importable(module_name):
    module = importlib.import_module(module_name)
    exported = set(getattr(module, "__all__", ()))
    missing_from_all = sorted(set(SNAPSHOT[module_name]) - exported)
    assert not missing_from_all, f"{module_name}.__all__ lost {missing_from_all}"
    for name in SNAPSHOT[module_name]:
        assert hasattr(module, name), f"{module_name}.{name} is not importable"


def test_snapshot_is_not_empty():
    # A snapshot that lists nothing would make the test above pass vacuously.
    assert sum(len(names) for names in SNAPSHOT.values()) > 150
    assert "stale" in SNAPSHOT["asgd_jax"]
