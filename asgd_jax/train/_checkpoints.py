"""Orbax checkpoints of a run, checked before anything is read or changed.

A step's folder holds the state's leaves and JSON metadata (the fingerprint of the
configuration, the leaves' shapes and dtypes, the metric history, a SHA-256 digest of the
state), plus a manifest of the size and SHA-256 of every file orbax wrote. The manifest is
written last, after orbax has committed the step: a folder without one is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax._logging import quiet
from asgd_jax.train._config import TrainConfig, fields_with_role
from asgd_jax.train._program import TrainState
from asgd_jax.train._results import plain

__all__ = [
    "CheckpointError",
    "Checkpoints",
    "fingerprint",
    "latest_checkpoint",
    "leaf_signature",
]

CHECKPOINT_FORMAT = 1
# Fields that do not change a run's trajectory: a checkpoint written under other values of
# them resumes the same run (e.g. a longer `num_steps` extends it).
_TRAJECTORY_FREE = fields_with_role("length", "checkpoint")
_MANIFEST = "asgd_manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed: corrupted, or written by another configuration."""


def fingerprint(config: TrainConfig, seeds: tuple[int, ...] | None) -> dict[str, Any]:
    """What a checkpoint must have been written by to be resumed: the trajectory's fields."""
    values = {k: v for k, v in config.to_dict().items() if k not in _TRAJECTORY_FREE}
    values["seeds"] = None if seeds is None else list(seeds)
    return values


def leaf_signature(state: TrainState) -> list[list[Any]]:
    """``[shape, dtype]`` of every leaf of a state."""
    return [[list(np.shape(x)), str(np.asarray(x).dtype)] for x in jax.tree.leaves(state)]


def _digest(leaves: Sequence[np.ndarray]) -> str:
    sha = hashlib.sha256()
    for leaf in leaves:
        leaf = np.ascontiguousarray(leaf)
        sha.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        sha.update(leaf.tobytes())
    return sha.hexdigest()


def _file_digests(root: str) -> dict[str, list[Any]]:
    """``{relative path: [size, sha256]}`` of every file under ``root`` but the manifest."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            if relative == _MANIFEST:
                continue
            sha = hashlib.sha256()
            with open(path, "rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    sha.update(block)
            out[relative] = [os.path.getsize(path), sha.hexdigest()]
    return out


def history_to_json(history: Mapping[str, list]) -> dict[str, Any]:
    """The metric history (lists of per-evaluation arrays) as JSON, dtypes kept."""
    out = {}
    for name, values in history.items():
        stacked = np.stack(values, axis=-1)
        out[name] = {"dtype": stacked.dtype.str, "values": plain(stacked)}
    return out


def history_from_json(saved: Mapping[str, Any]) -> dict[str, list]:
    """The inverse of :func:`history_to_json` (bitwise: NaN comes back as NaN)."""
    history = {}
    for name, entry in saved.items():
        stacked = np.asarray(entry["values"], dtype=np.dtype(entry["dtype"]))
        history[name] = [stacked[..., i] for i in range(stacked.shape[-1])]
    return history


def _is_complete(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, _MANIFEST))


def latest_checkpoint(directory: str | os.PathLike) -> int | None:
    """The step a resume in ``directory`` would continue from: its newest complete checkpoint.

    Reads folder names and manifests only (creates, opens and changes nothing). A checkpoint
    without its manifest is incomplete — the run stopped while saving it — and is skipped,
    as :func:`asgd_jax.train.train` skips it when resuming.

    Returns:
      The step, or ``None`` when ``directory`` holds no complete checkpoint (or does not
      exist).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return None
    steps = [
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and _is_complete(os.path.join(directory, name))
    ]
    return max(steps, default=None)


class Checkpoints:
    """Orbax checkpoints of one run: the state's leaves plus JSON metadata per step.

    Each step's folder also holds a manifest of the size and SHA-256 of every file orbax
    wrote, checked before orbax reads anything: a damaged checkpoint is reported as such
    (naming the file) instead of surfacing as a storage-layer error. The manifest is written
    after orbax has committed the step, so a crash in between leaves a checkpoint that is
    reported as incomplete, and the earlier ones intact.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int):
        import orbax.checkpoint as ocp

        logging.getLogger("absl").setLevel(logging.ERROR)
        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: TrainState, metadata: dict[str, Any]) -> None:
        leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
        metadata = dict(metadata, digest=_digest(leaves), step=step, format=CHECKPOINT_FORMAT)
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(leaves),
            meta=self._ocp.args.JsonSave(metadata),
        )
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()
        step_dir = self._step_dir(step)
        manifest = {"format": CHECKPOINT_FORMAT, "files": _file_digests(step_dir)}
        partial = os.path.join(step_dir, _MANIFEST + ".partial")
        with open(partial, "w", encoding="utf-8") as file:
            json.dump(manifest, file)
        os.replace(partial, os.path.join(step_dir, _MANIFEST))

    def newest_complete(self) -> tuple[int | None, list[int]]:
        """The newest step whose save completed, and the newer steps whose save did not.

        A kill between orbax's commit of a step and the manifest (or during the manifest)
        leaves a step without a manifest: a resume falls back to the step before it.
        """
        incomplete = []
        for step in reversed(self.steps()):
            if _is_complete(self._step_dir(step)):
                return step, incomplete[::-1]
            incomplete.append(step)
        return None, incomplete[::-1]

    def _error(self, step: int, reason: str, *, damaged: bool = True) -> CheckpointError:
        others = [s for s in self.steps() if s != step]
        if not damaged:
            hint = "resume with the configuration that wrote it"
        elif others:
            hint = (
                f"the other checkpoints (steps {', '.join(map(str, others))}) are untouched: "
                "resume from one with resume_step (--resume-step)"
            )
        else:
            hint = "no other checkpoint exists"
        return CheckpointError(
            f"checkpoint at step {step} in {self.directory} cannot be resumed: {reason}. "
            f"Nothing was deleted; {hint}, or start afresh in another directory."
        )

    def verify_files(self, step: int) -> None:
        step_dir = self._step_dir(step)
        try:
            with open(os.path.join(step_dir, _MANIFEST), encoding="utf-8") as file:
                manifest = json.load(file)
            expected = manifest["files"]
        except FileNotFoundError:
            raise self._error(step, "it is incomplete (no manifest)") from None
        except (ValueError, KeyError, TypeError):
            raise self._error(step, "its manifest is unreadable") from None
        found = _file_digests(step_dir)
        for relative, (size, sha) in sorted(expected.items()):
            if relative not in found:
                raise self._error(step, f"the file {relative} is missing")
            if found[relative][0] != size:
                raise self._error(
                    step, f"the file {relative} has {found[relative][0]} bytes, not {size}"
                )
            if found[relative][1] != sha:
                raise self._error(step, f"the file {relative} is corrupted (checksum mismatch)")

    def read_metadata(self, step: int) -> dict[str, Any]:
        self.verify_files(step)
        try:
            with _quiet_storage():
                restored = self.manager.restore(
                    step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
                )
            meta = restored["meta"]
        except Exception as error:  # orbax raises many types for damaged files
            raise self._error(step, f"its metadata is unreadable ({_one_line(error)})") from None
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise self._error(step, "its metadata is not an asgd_jax checkpoint")
        return meta

    def check(self, step: int, template: TrainState, fingerprint: dict[str, Any]) -> dict:
        meta = self.read_metadata(step)
        saved = meta.get("fingerprint", {})
        changed = [
            f"{k}: {saved.get(k)!r} -> {v!r}"
            for k, v in fingerprint.items()
            if saved.get(k, "<missing>") != v
        ]
        if changed:
            raise self._error(
                step,
                "it was written by a different configuration ("
                + "; ".join(changed[:6])
                + ("; …" if len(changed) > 6 else "")
                + ")",
                damaged=False,
            )
        if meta.get("leaves") != leaf_signature(template):
            raise self._error(
                step, "its state has other shapes or dtypes than this run's", damaged=False
            )
        return meta

    def restore(self, step: int, template: TrainState, meta: dict[str, Any]) -> TrainState:
        leaves, treedef = jax.tree.flatten(template)
        abstract = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in leaves]
        try:
            with _quiet_storage():
                restored = self.manager.restore(
                    step,
                    args=self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract)),
                )["state"]
            host = [np.asarray(x) for x in restored]
        except Exception as error:
            raise self._error(step, f"its arrays are unreadable ({_one_line(error)})") from None
        if len(host) != len(leaves) or _digest(host) != meta.get("digest"):
            raise self._error(step, "its arrays do not match the digest saved with them")
        return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in host])

    def delete_after(self, step: int) -> None:
        for later in self.steps():
            if later > step:
                self.manager.delete(later)

    def close(self) -> None:
        self.manager.close()


def _quiet_storage():
    """Silences the asyncio task errors the storage layer logs when a read fails."""
    return quiet("asyncio", logging.CRITICAL)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:200]}"
