"""The demo's output folder: never mixed with another run, never silently overwritten, never left half written.

A run works in a staging folder beside the target (``.<name>.partial-<pid>``) while it holds a lock file beside it
(``.<name>.lock``, created exclusively, holding the process id). Only a run that finishes moves its staging folder
into place, in one rename; a run that fails or is interrupted removes it. A second run aimed at the same folder while
the first holds the lock is refused at once, and a folder that already holds files (an earlier run) is refused
unless ``--overwrite`` says to replace it; even then it is replaced only when the new run has finished.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peft_perft.cli.inputs import InputError


def require_usable_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a folder another run is writing to, and one holding files unless ``overwrite`` (checked before any
    work starts; `claim_output_dir` checks the files again under its lock)."""
    owner = _lock_owner(_lock_path(output_dir))
    if owner is not None:
        raise _busy(output_dir, owner)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output-dir {output_dir} is a file, not a folder; choose another --output-dir.")
    _refuse_existing_files(output_dir, overwrite)


@contextmanager
def claim_output_dir(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Lock ``output_dir`` and yield a staging folder to write into; on success it becomes ``output_dir``."""
    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(output_dir)
    _take_lock(lock, output_dir)
    staging = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}"
    try:
        _refuse_existing_files(output_dir, overwrite)  # another run may have finished there since the first check
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        yield staging
        _move_into_place(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.unlink(missing_ok=True)


def _take_lock(lock: Path, output_dir: Path) -> None:
    """Create the lock file exclusively with this process's id; a lock left by a dead process is taken over."""
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner = _lock_owner(lock)
        if owner is not None:
            raise _busy(output_dir, owner) from None
        lock.unlink(missing_ok=True)
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(str(os.getpid()))


def _refuse_existing_files(output_dir: Path, overwrite: bool) -> None:
    if not overwrite and output_dir.is_dir() and any(output_dir.iterdir()):
        raise InputError(
            f"--output-dir {output_dir} already holds files (an earlier run?); pass --overwrite to replace them once "
            f"this run has finished, or choose another --output-dir."
        )


def _busy(output_dir: Path, owner: int | str) -> InputError:
    return InputError(
        f"--output-dir {output_dir} is being written by another run (process {owner}); wait for it to finish, or "
        f"choose another --output-dir."
    )


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Replace ``output_dir`` by the finished staging folder: the old one is renamed away first, then removed."""
    replaced = output_dir.parent / f".{output_dir.name}.replaced-{os.getpid()}"
    if output_dir.exists():
        output_dir.rename(replaced)
    staging.rename(output_dir)
    shutil.rmtree(replaced, ignore_errors=True)


def _lock_path(output_dir: Path) -> Path:
    output_dir = output_dir.resolve()
    return output_dir.parent / f".{output_dir.name}.lock"


def _lock_owner(lock: Path) -> int | str | None:
    """The live process holding ``lock`` (its id, or "unknown" while it is still writing it), or None when there
    is no lock or its process is gone."""
    try:
        text = lock.read_text().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        return "unknown"
    owner = int(text)
    if owner == os.getpid():
        return None
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return owner
    return owner
