"""Executes every notebook in colabs/ top to bottom; any cell error fails the test.

The notebooks run with ``ASGD_JAX_QUICK=1`` (their small settings), in a temporary working
directory, on a kernel started from this interpreter, with a per-notebook time limit.
"""

import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
CELL_TIMEOUT = 240  # seconds for one cell with the quick settings
NOTEBOOK_TIMEOUT = 300


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert len(names) >= 6, f"expected the six notebooks in {COLABS}, found {sorted(names)}"


def test_notebooks_have_no_outputs():
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, f"{path.name}: outputs must be stripped"
                assert cell.execution_count is None, f"{path.name}: execution count set"


def _kernel_manager_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ASGD_JAX_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # The kernel must import this checkout's package, whatever its working directory.
    root = str(COLABS.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


@pytest.mark.timeout(NOTEBOOK_TIMEOUT + 30)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

    _kernel_manager_env(monkeypatch, tmp_path)

    class _ThisPython(KernelSpecManager):
        """The python3 kernel of the running interpreter (the test's virtualenv)."""

        def get_kernel_spec(self, kernel_name):
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name="Python 3",
                language="python",
            )

    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        allow_errors=False,
        kernel_manager_class=_kernel_manager(_ThisPython),
    )
    failure = None
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        failure = str(error)[-3000:]
    if failure is not None:
        pytest.fail(f"{path.name} failed:\n{failure}", pytrace=False)


def _kernel_manager(spec_manager_class):
    from jupyter_client.manager import KernelManager

    class _Manager(KernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.kernel_spec_manager = spec_manager_class()

    return _Manager
