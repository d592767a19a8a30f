"""Orbax checkpoints of the whole run state, one per finished epoch.

A checkpoint contains the train state (prompt and adapter parameters, optimizer state, step), the
host loop state (next epoch, main-sample leaderboard, confident counts) and a small JSON record
that identifies the run (model, class names, paradigm, trainable tree layout). That is all the
next epoch needs: its margin is recomputed from the parameters, leaderboard and counts, and its
data order and augmentations are seeded by (seed, epoch).

Orbax writes each checkpoint into a temporary folder (`<epoch>.orbax-checkpoint-tmp*`) and
renames it when complete, so a process killed at any moment leaves the previous checkpoint
readable. Such leftover temporary folders are ignored by restore and deleted when the next
`RunCheckpointer` opens the directory. State is saved from the host (device 0's copy), so it
restores onto any number of devices.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from cap_jax.loop import LoopState

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """Raised when a checkpoint belongs to another model, class list or parameter layout."""


def _manager(directory: str, max_to_keep: int = 2,
             read_only: bool = False) -> ocp.CheckpointManager:
    if read_only:
        # Not Orbax's read_only option, which logs three warnings each time.
        options = ocp.CheckpointManagerOptions(create=False)
    else:
        # Deletes the temporary folders of saves that a killed process left unfinished.
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def remove_unfinished_saves(directory: str) -> None:
    """Delete the temporary folders that a killed save left in `directory`.

    Orbax's own `cleanup_tmp_directories` missed a folder named `3.orbax-checkpoint-tmp` in one
    of several runs of the kill test, so the run removes them itself. Only one process writes a
    run's checkpoints, so no save is in progress when a run opens the folder.
    """
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if ".orbax-checkpoint-tmp" in name:
            log.info("removing the unfinished checkpoint %s", os.path.join(directory, name))
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def tree_layout(tree: Any) -> list[str]:
    """Describe a pytree as 'path shape dtype' strings, to detect incompatible checkpoints."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [f"{jax.tree_util.keystr(path)} {tuple(np.shape(leaf))} {np.asarray(leaf).dtype}"
            for path, leaf in leaves]


class RunCheckpointer:
    """Save and restore the run state under `directory` (typically `<workdir>/checkpoints`)."""

    def __init__(self, directory: str, identity: dict[str, Any], max_to_keep: int = 2):
        self.directory = directory
        self.identity = identity
        remove_unfinished_saves(directory)
        self._manager = _manager(directory, max_to_keep)

    def latest_epoch(self) -> Optional[int]:
        """Return the number of finished epochs in the latest checkpoint, or None."""
        return self._manager.latest_step()

    def check_identity(self, epoch: Optional[int] = None) -> None:
        """Compare the identity record of a checkpoint (default: the latest) with this run's.

        Reads only the small JSON record, so a run can call it before any compute. Does nothing
        when there is no checkpoint.

        Raises:
          CheckpointMismatchError: when the checkpoint was written for another model, class
            list, paradigm or dataset.
        """
        epoch = self.latest_epoch() if epoch is None else epoch
        if epoch is not None:
            self._check_meta(self._read_meta(epoch), epoch)

    def _read_meta(self, epoch: int) -> dict:
        return self._manager.restore(
            epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def save(self, state: Any, loop_state: LoopState) -> None:
        """Write the checkpoint of a finished epoch (`loop_state.epoch` epochs done) and wait."""
        state = jax.tree.map(np.asarray, state)
        loop_tree = {
            "epoch": np.asarray(loop_state.epoch, np.int64),
            "leaderboard": np.asarray(loop_state.leaderboard, np.int64),
            "counts": np.asarray(loop_state.counts, np.int64),
        }
        meta = dict(self.identity, layout=tree_layout(state))
        self._manager.save(
            loop_state.epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                loop=ocp.args.StandardSave(loop_tree),
                meta=ocp.args.JsonSave(meta),
            ),
        )
        self._manager.wait_until_finished()

    def restore(self, target_state: Any, epoch: Optional[int] = None) -> tuple[Any, LoopState]:
        """Restore the state of `epoch` (default: the latest) into the structure of `target_state`.

        Raises:
          FileNotFoundError: when there is no checkpoint.
          CheckpointMismatchError: when the checkpoint was written for another model, class list,
            paradigm or parameter layout.
        """
        epoch = self.latest_epoch() if epoch is None else epoch
        if epoch is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        meta = self._read_meta(epoch)
        self._check_meta(meta, epoch)
        self._check_layout(meta, target_state, epoch)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), target_state)
        restored = self._manager.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                loop=ocp.args.StandardRestore(),
            ),
        )
        loop_tree = restored["loop"]
        loop_state = LoopState(
            epoch=int(loop_tree["epoch"]),
            leaderboard=np.asarray(loop_tree["leaderboard"], np.int64),
            counts=np.asarray(loop_tree["counts"], np.int64),
        )
        state = jax.tree.map(np.asarray, restored["state"])
        return state, loop_state

    def _check_meta(self, meta: dict, epoch: int) -> None:
        where = os.path.join(self.directory, str(epoch))
        for key, expected in self.identity.items():
            found = meta.get(key)
            if found != expected:
                raise CheckpointMismatchError(
                    f"checkpoint {where} was written with {key}={found!r}, but this run has "
                    f"{key}={expected!r}; use another --workdir or delete the checkpoints")

    def _check_layout(self, meta: dict, target_state: Any, epoch: int) -> None:
        where = os.path.join(self.directory, str(epoch))
        layout = tree_layout(jax.tree.map(np.asarray, target_state))
        if meta.get("layout") != layout:
            saved = meta.get("layout") or []
            diff = sorted(set(saved) ^ set(layout))[:4]
            raise CheckpointMismatchError(
                f"checkpoint {where} has a different parameter layout than this run "
                f"(first differences: {diff}); use another --workdir or delete the checkpoints")

    def close(self) -> None:
        self._manager.close()


def read_checkpoint(directory: str, epoch: Optional[int] = None) -> dict[str, Any]:
    """Read a run checkpoint without a target structure, e.g. to inspect or compare runs.

    Args:
      directory: the checkpoint folder (`<workdir>/checkpoints`).
      epoch: which checkpoint (the number of finished epochs); default the latest.

    Returns:
      {'epoch': int, 'state': the train state as nested dicts of numpy arrays,
       'loop': {'epoch', 'leaderboard', 'counts'} numpy arrays, 'meta': the identity record}.

    Raises:
      FileNotFoundError: when the folder contains no checkpoint.
    """
    manager = _manager(directory, read_only=True)
    try:
        epoch = manager.latest_step() if epoch is None else epoch
        if epoch is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        restored = manager.restore(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(),
                loop=ocp.args.StandardRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
    finally:
        manager.close()
    return {
        "epoch": epoch,
        "state": jax.tree.map(np.asarray, restored["state"]),
        "loop": jax.tree.map(np.asarray, restored["loop"]),
        "meta": restored["meta"],
    }
