"""Output directories: checked before anything is written, never emptied without --overwrite."""

from __future__ import annotations

import argparse
import datetime
import os

from asgd_jax import train as train_lib
from asgd_jax.cli._flags import UsageError

__all__ = ["make_dir", "output_dir", "run_dir"]


def output_dir(
    path: str | None, overwrite: bool, *, allow_existing: bool = False, hint: str = ""
) -> str:
    """The output directory, checked but not created (see :func:`make_dir`).

    A non-empty directory is refused unless ``overwrite`` or ``allow_existing``; ``hint``
    replaces the default advice in that error.
    """
    if path is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = os.path.join("runs", stamp)
        suffix = 1
        while os.path.exists(path):
            path = os.path.join("runs", f"{stamp}-{suffix}")
            suffix += 1
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not (overwrite or allow_existing):
        raise UsageError(
            f"output directory {path} exists and is not empty; "
            + (hint or "pass --overwrite to write into it, or choose another --out")
        )
    return path


def run_dir(args: argparse.Namespace) -> str:
    """``run``'s output directory: never loses checkpoints or results without --overwrite.

    Without ``--resume``, a directory holding checkpoints points at ``--resume`` first
    (naming the step it would continue from). With ``--resume``, a non-empty directory
    holding no checkpoints is refused (there is nothing to continue; its results stay).
    """
    if args.resume_step is not None and not args.resume:
        raise UsageError("--resume-step needs --resume")
    hint = ""
    if args.out is not None and not args.resume:
        checkpoint_dir = os.path.join(args.out, "checkpoints")
        step = train_lib.latest_checkpoint(checkpoint_dir)
        if step is not None:
            hint = (
                f"it holds checkpoints of a run, the newest complete one at step {step}: pass "
                f"--resume to continue from step {step}, or --overwrite to start afresh "
                "(which discards the checkpoints)"
            )
    out = output_dir(args.out, args.overwrite, allow_existing=args.resume, hint=hint)
    checkpoint_dir = os.path.join(out, "checkpoints")
    if args.resume and os.path.isdir(out) and os.listdir(out):
        if not (os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir)):
            raise UsageError(
                f"--resume: {out} holds no checkpoints to continue from (its run saved none; "
                "see --checkpoint-every); nothing was changed. Choose another --out, or pass "
                "--overwrite without --resume to start afresh there"
            )
    return out


def make_dir(path: str) -> str:
    """Creates the output directory once the configuration has been checked."""
    os.makedirs(path, exist_ok=True)
    return path
