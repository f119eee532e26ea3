"""Orbax checkpoints of the train state together with the Grain iterator state.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. Saves are asynchronous;
`latest_step` finds the step to resume from.
"""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves/restores `{"state": train state, "data": grain iterator}`."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, force: bool = True) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores the state onto `abstract_state`'s shardings and rewinds
        `data_iterator` in place; returns the state."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except Exception as err:  # name the checkpoint, keep the cause
            raise RuntimeError(
                f"checkpoint {os.path.join(self.directory, str(step))} could not be restored: {err}"
            ) from err
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
