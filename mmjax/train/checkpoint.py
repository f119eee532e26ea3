"""Orbax checkpoints of the train state together with the Grain iterator state,
and recovery from damaged ones.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`; Orbax writes each step
into a temporary directory, renames it and leaves `commit_success.txt` in it
once every item is written. Saves are asynchronous.

Recovery (`restore_latest`): a step directory without that commit marker is
partial (a copy cut short, a file system without atomic renames) and is
never taken as the latest: it is moved to `WORKDIR/checkpoints_damaged/`.
A committed checkpoint that fails to restore (a missing, truncated or
overwritten array file, unreadable metadata or data-iterator state) is
reported in one sentence naming the step, the file and why; with
`train.on_bad_checkpoint="previous"` the next older one is tried and the
damaged directories are moved aside once one restores, with `"stop"` the run
refuses to start. Nothing is deleted.

The workdir may be a bucket (`gs://...`, `mmjax.paths`): Orbax writes the
arrays through tensorstore and everything here goes through `epath`; on a
bucket a move aside is a copy and a delete, not an atomic rename.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Callable

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from mmjax.errors import CheckpointError
from mmjax.paths import is_remote, move_tree, workdir_path

COMMIT_MARKER = "commit_success.txt"
DAMAGED_DIR = "checkpoints_damaged"
_STATUS = {"NOT_FOUND": "is missing", "OUT_OF_RANGE": "is truncated", "DATA_LOSS": "is corrupt"}


class RestoreFailed(Exception):
    """One checkpoint could not be restored; the message is one sentence."""


class Checkpointer:
    """Saves/restores `{"state": train state, "data": grain iterator}`."""

    def __init__(self, workdir, keep: int = 3, async_save: bool = True, on_bad: str = "previous",
                 log: Callable[[str], None] = print):
        workdir = workdir_path(workdir, check=False)
        self.directory = os.fspath(workdir / "checkpoints")
        self.damaged_directory = os.fspath(workdir / DAMAGED_DIR)
        self.on_bad, self.log = on_bad, log
        self.recovered: list[dict] = []  # what restore_latest moved aside, for the summary
        self._set_aside_partial()
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
        `data_iterator` in place; returns the state. RestoreFailed (one
        sentence: the step, the file, why) when the checkpoint is damaged."""
        step_dir = _join(self.directory, str(step))
        _quiet_aborted_restore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except Exception as err:  # orbax/tensorstore raise many types; name the file and the cause
            raise RestoreFailed(f"checkpoint step {step} ({step_dir}) cannot be restored: "
                                f"{describe_damage(step_dir, err)}") from err
        return restored["state"]

    def restore_latest(self, abstract_state, data_iterator):
        """(state, step) from the newest checkpoint that restores, or (None, 0)
        when the workdir has none. Damaged ones are handled as the module doc
        says; CheckpointError when none can be restored or `on_bad="stop"`."""
        damaged: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract_state, data_iterator)
            except RestoreFailed as err:
                if self.on_bad == "stop":
                    raise CheckpointError(f"{err}; config.train.on_bad_checkpoint='stop', so the run does not "
                                          "start ('previous' resumes from the newest checkpoint that restores)."
                                          ) from None
                self.log(f"warning: {err}; trying the previous checkpoint.")
                damaged.append((step, str(err)))
                continue
            for bad_step, reason in damaged:
                moved = self._move_aside(bad_step)
                self.recovered.append({"step": bad_step, "reason": reason, "moved_to": moved})
                self.log(f"warning: moved the damaged checkpoint of step {bad_step} to {moved}; "
                         f"resuming from step {step}.")
            if damaged:
                _sync("mmjax_damaged_checkpoints_set_aside")
                self.manager.reload()
            return state, step
        if damaged:
            raise CheckpointError(f"none of the {len(damaged)} checkpoints in {self.directory} can be restored "
                                  f"(newest: {damaged[0][1]}); nothing was moved; move the folder away to start "
                                  "from scratch.")
        return None, 0

    def _set_aside_partial(self) -> None:
        """Moves step directories without the commit marker aside (process 0;
        the others wait), before Orbax lists the steps."""
        directory = epath.Path(self.directory)
        if not directory.is_dir():
            return
        partial = [p.name for p in directory.iterdir() if p.name.isdigit()
                   and not (p / COMMIT_MARKER).exists()]
        for name in sorted(partial, key=int):
            reason = f"step directory {_join(self.directory, name)} has no {COMMIT_MARKER} (a partial checkpoint)"
            moved = self._move_aside(int(name))
            self.recovered.append({"step": int(name), "reason": reason, "moved_to": moved})
            self.log(f"warning: {reason}; moved to {moved}, it is not taken as the latest.")
        if partial:
            _sync("mmjax_partial_checkpoints_set_aside")

    def _move_aside(self, step: int) -> str:
        """Renames `checkpoints/<step>` to `checkpoints_damaged/<step>[-n]` (process 0); returns the new path."""
        target = _join(self.damaged_directory, str(step))
        n = 1
        while epath.Path(target).exists():
            target = _join(self.damaged_directory, f"{step}-{n}")
            n += 1
        if jax.process_index() == 0:
            move_tree(_join(self.directory, str(step)), target)
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


_quieted = False


def _closed_loop_error(exc) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _AbortedReadFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for Orbax's reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("exception was never retrieved" in text
                    and any(word in text for word in ("orbax", "OCDBT", "tensorstore")))


def _quiet_aborted_restore() -> None:
    """Installed before the first restore. After a read fails, Orbax closes its event loop while tensorstore is
    still reading the other arrays; each of those reads then fails to call
    back into the closed loop (`RuntimeError: Event loop is closed`, printed
    with a traceback from tensorstore's threads, one per array), and asyncio
    logs the other failed reads as never retrieved. Both say nothing beyond
    the one sentence the restore reports, so they are dropped from here on;
    every other exception is printed as before."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, traceback):
        if not _closed_loop_error(value):
            previous_excepthook(kind, value, traceback)

    def unraisablehook(unraisable):
        if not _closed_loop_error(unraisable.exc_value):
            previous_unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    logging.getLogger("asyncio").addFilter(_AbortedReadFilter())


def _sync(name: str) -> None:
    """All processes wait here (after process 0 moved directories)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def describe_damage(step_dir: str, err: BaseException) -> str:
    """Which file of a checkpoint is damaged and how, from the restore error
    (tensorstore names the file) or by reading the JSON files it holds."""
    messages = []
    while err is not None and len(messages) < 8:
        messages.append(" ".join(str(err).split()))
        err = err.__cause__ or err.__context__
    for text in messages:
        text = re.split(r" \[tensorstore_spec", text)[0]
        files = re.findall(r'local file "([^"]+)"', text)
        if files:
            path = files[-1]
            code = re.match(r"'?([A-Z_]+): ", text)
            how = _STATUS.get(code.group(1), "cannot be read") if code else "cannot be read"
            detail = text.split(f'"{path}"', 1)[1].lstrip(": ").strip("'") if f'"{path}"' in text else ""
            return f"{_relative(path, step_dir)} {how}" + (f" ({detail.rstrip('.')})" if detail else "")
    for rel in _json_files(step_dir):
        try:
            json.loads(epath.Path(_join(step_dir, rel)).read_text())
        except (OSError, ValueError) as bad:
            return f"{rel} is not valid JSON ({' '.join(str(bad).split())})"
    for item in ("state", "data"):
        if not epath.Path(_join(step_dir, item)).is_dir():
            return f"the {item!r} item is missing"
    first = messages[0] if messages else "unknown error"
    return first[:300] + ("..." if len(first) > 300 else "")


def _json_files(step_dir: str) -> list[str]:
    out = ["_CHECKPOINT_METADATA", "state/_METADATA", "state/_sharding"]
    data = epath.Path(_join(step_dir, "data"))
    if data.is_dir():
        out += [f"data/{name}" for name in sorted(p.name for p in data.iterdir()) if name.endswith(".json")]
    return [rel for rel in out if epath.Path(_join(step_dir, rel)).exists()]


def _join(folder: str, *names: str) -> str:
    """`folder/name` for a local folder or a bucket prefix."""
    return os.fspath(epath.Path(folder).joinpath(*names))


def _relative(path: str, folder: str) -> str:
    """`path` relative to `folder` (tensorstore names a bucket object `gs://...` or by its key)."""
    if is_remote(folder):
        key = folder.removeprefix("gs://").split("/", 1)[-1]
        for prefix in (folder + "/", key + "/"):
            if prefix in path:
                return path.split(prefix, 1)[1]
        return path
    return os.path.relpath(path, folder)
