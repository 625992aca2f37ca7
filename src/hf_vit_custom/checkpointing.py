"""Checkpoints that survive a kill: written completely or not at all, found again on resume, room checked first.

Trainer writes `checkpoint-N/trainer_state.json` last, after the model, optimiser, scheduler and RNG states, so a
checkpoint folder holding a readable one is complete; a folder without it is what a kill mid-save left behind, and is
neither resumed from nor kept. The Accelerate loop writes each checkpoint into a hidden staging folder and renames it
into place once every process has finished writing, so a `step_N` folder is always complete. Model folders are
written atomically by `ViTCustomPreTrainedModel.save_pretrained` itself.
"""

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

TRAINER_CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE_NAME = "trainer_state.json"
# What `--resume_from_checkpoint` accepts for "the newest complete checkpoint in the output folder".
LATEST = ("latest", "true", "True")


class OutputFolderError(OSError):
    """The output folder cannot take what the run will write: found before training rather than at the first save."""


def is_complete_trainer_checkpoint(folder: Path) -> bool:
    """Whether Trainer finished writing `folder`: its last file, `trainer_state.json`, exists and parses."""
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return True


def trainer_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """`(step, folder)` of every `checkpoint-N` folder in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if path.is_dir() and (match := TRAINER_CHECKPOINT_PATTERN.fullmatch(path.name))
    ]
    return sorted(found)


def discard_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the `checkpoint-N` folders a killed save left half-written; return them.

    Left in place they would be resumed from and break, or push a complete checkpoint out of `save_total_limit`.
    """
    discarded = [folder for _, folder in trainer_checkpoints(output_dir) if not is_complete_trainer_checkpoint(folder)]
    for folder in discarded:
        logger.warning("Removing the incomplete checkpoint %s (its save was interrupted).", folder)
        shutil.rmtree(folder)
    return discarded


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-N` folder in `output_dir`, or `None`."""
    complete = [folder for _, folder in trainer_checkpoints(output_dir) if is_complete_trainer_checkpoint(folder)]
    return complete[-1] if complete else None


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> str | None:
    """Turn `--resume_from_checkpoint` into a complete checkpoint folder, or raise a `ValueError` that says why not.

    `latest` (or `true`) means the newest complete checkpoint in `output_dir`; an explicit folder must be complete.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint in LATEST:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(f"No complete checkpoint-N folder to resume from in {str(output_dir)!r}.")
        return str(checkpoint)
    folder = Path(resume_from_checkpoint)
    if not folder.is_dir():
        raise ValueError(f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a folder.")
    if not is_complete_trainer_checkpoint(folder):
        raise ValueError(
            f"`resume_from_checkpoint` {resume_from_checkpoint!r} is incomplete (no readable {TRAINER_STATE_NAME}): "
            "its save was interrupted. Resume from `latest` to take the newest complete one."
        )
    return str(folder)


def check_output_folder(output_dir: str | os.PathLike, needed_bytes: int) -> None:
    """Raise `OutputFolderError` when `output_dir` cannot be written or has less than `needed_bytes` free.

    A probe file is written and removed, which catches read-only file systems, missing permissions and paths through
    a file; the free space is compared with an estimate of what the run writes.
    """
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as error:
        raise OutputFolderError(f"Cannot write to the output folder {str(output_dir)!r}: {error}.") from error
    free = shutil.disk_usage(root).free
    if free < needed_bytes:
        raise OutputFolderError(
            f"Only {free / 2**20:.1f} MiB free in {str(output_dir)!r}, but the model and its checkpoints need about "
            f"{needed_bytes / 2**20:.1f} MiB; free some space or choose another `--output_dir`."
        )


def training_footprint(num_parameters: int, checkpoints_kept: int | None) -> int:
    """Bytes a run writes, roughly: fp32 weights plus two AdamW moments per checkpoint kept, and the final model.

    `checkpoints_kept=None` means no limit is known; one checkpoint is counted, plus one being written.
    """
    checkpoint_bytes = 3 * 4 * num_parameters
    return ((checkpoints_kept if checkpoints_kept is not None else 1) + 1) * checkpoint_bytes + 4 * num_parameters


def staging_path(folder: Path) -> Path:
    """The hidden sibling a checkpoint is written to before it is renamed to `folder` (the same for every process)."""
    return folder.with_name(f".{folder.name}.partial")


def write_checkpoint_atomically(
    folder: str | os.PathLike, write: Callable[[Path], None], is_main_process: bool, wait_for_everyone: Callable
) -> Path:
    """Let every process `write` into a staging folder, then rename it to `folder` once all have finished.

    The rename is atomic, so `folder` either does not exist or holds a complete checkpoint. An older `folder` of the
    same name is replaced.
    """
    folder = Path(folder)
    staging = staging_path(folder)
    if is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    wait_for_everyone()
    try:
        write(staging)
    except BaseException:  # Ctrl-C or a full disk: nothing half-written stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    wait_for_everyone()
    if is_main_process:
        if folder.exists():
            replaced = folder.with_name(f".{folder.name}.replaced")
            os.replace(folder, replaced)
            os.replace(staging, folder)
            shutil.rmtree(replaced)
        else:
            os.replace(staging, folder)
    wait_for_everyone()
    return folder


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the half-written checkpoint was removed; the message says how to go on."""


def interrupted_message(checkpoint: Path | None, output_dir: str | os.PathLike) -> str:
    """What to tell someone who pressed Ctrl-C: which checkpoint survived and how to continue from it."""
    if checkpoint is None:
        return f"Training interrupted; no complete checkpoint was saved in {str(output_dir)!r}."
    return (
        f"Training interrupted. The newest complete checkpoint is {str(checkpoint)!r}; continue with "
        "`--resume_from_checkpoint latest`."
    )


__all__ = [
    "OutputFolderError",
    "TrainingInterrupted",
    "check_output_folder",
    "discard_incomplete_checkpoints",
    "interrupted_message",
    "is_complete_trainer_checkpoint",
    "last_complete_checkpoint",
    "resolve_resume_checkpoint",
    "training_footprint",
    "write_checkpoint_atomically",
]
