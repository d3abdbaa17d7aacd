"""The ``asgd-jax`` command run in this process, for the CLI test modules."""

from asgd_jax import cli


def run_main(capsys, *argv):
    """Runs the command in this process; returns (exit status, stdout, stderr)."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err
