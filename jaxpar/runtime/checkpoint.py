"""Save and restore a train state with orbax, each device reading and writing only its shard.

Orbax writes a step to a temporary directory and renames it when complete, so a run
that dies mid-save still leaves the previous checkpoint intact. Make one with
`Parallelized.checkpointer`, which knows the state's layout.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """Checkpoints in `directory`: every `save_every` steps and on `force`, the last `keep`;
    restored as `abstract_state` (ShapeDtypeStructs whose shardings decide what each device
    reads)."""

    def __init__(self, directory: str | os.PathLike, save_every: int, abstract_state: Any,
                 keep: int = 2):
        if save_every < 1:
            raise ValueError(f"save_every={save_every}: save at least every step (>= 1)")
        self.save_every = save_every
        self.abstract_state = abstract_state
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def restore(self) -> Any | None:
        """The latest checkpoint in the state's layout, or None if there is none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        return self.manager.restore(step, args=ocp.args.StandardRestore(self.abstract_state))

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        """Start saving `state` as `step` if `step` is a multiple of `save_every` or `force`.
        Arrays are copied off the devices before this returns, so `state` may be donated."""
        if step % self.save_every and not force:
            return False
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def close(self) -> None:
        """Wait for pending writes to finish, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
