"""Everything the package writes or resumes from: written completely or not at all, found again, room checked first.

- Output folders: `check_output_folder` probes that a folder can be written and has room for the run
  (`training_footprint`), before the first step rather than at the first save.
- Atomic folder writes: `write_folder_atomically` lets one process or all of them write into a hidden staging folder
  beside the target, then renames it into place, so the target is either absent, the old one or the complete new
  one. The converted checkpoints of `scripts/convert_checkpoint.py` and the Accelerate loop's `step_N` checkpoints
  are written this way; `staging_folder` is the throw-away folder a Hub upload is assembled in.
- Checkpoints: Trainer's `checkpoint-N` (transformers' `PREFIX_CHECKPOINT_DIR`) and the Accelerate loop's `step_N`.
  Each scheme writes one file last (`trainer_state.json`, `training_progress.json`), so a folder with a readable one
  is complete. transformers' `get_last_checkpoint` takes the highest `checkpoint-N` complete or not, so the search
  here (`newest_complete_checkpoint`, `resolve_resume_checkpoint`) checks that file first.
- Interruptions: `TrainingInterrupted` and `interrupted_message` name the checkpoint that survived Ctrl-C.

A model folder's own atomic `save_pretrained` lives in `modeling_vit_custom.py`, not here: that file ships inside
every saved model for `trust_remote_code` and so must not import this package.
"""

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

# What `--resume_from_checkpoint` accepts for "the newest complete checkpoint in the output folder".
LATEST = ("latest", "true", "True")


@dataclass(frozen=True)
class CheckpointScheme:
    """How one training loop names its checkpoint folders (`{prefix}{step}`) and which file it writes last."""

    prefix: str
    last_file: str

    def folder(self, output_dir: str | os.PathLike, step: int) -> Path:
        return Path(output_dir) / f"{self.prefix}{step}"


TRAINER_CHECKPOINTS = CheckpointScheme(f"{PREFIX_CHECKPOINT_DIR}-", "trainer_state.json")
ACCELERATE_CHECKPOINTS = CheckpointScheme("step_", "training_progress.json")


class OutputFolderError(OSError):
    """The output folder cannot take what the run will write: found before training rather than at the first save."""


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


# What a write stopped by a full disk raises: the OS's errors, and torch's zip writer's own words for them.
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
FULL_DISK_MESSAGES = ("unexpected pos", "file write failed", "No space left on device")


def full_disk_error(error: BaseException, output_dir: str | os.PathLike, needed_bytes: int) -> OutputFolderError | None:
    """An `OutputFolderError` naming the folder and the room the run needs when `error` is a write stopped by a full
    disk (torch's save says only "enforce fail ... unexpected pos"), else `None`."""
    if not (
        (isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS)
        or (isinstance(error, (OSError, RuntimeError)) and any(text in str(error) for text in FULL_DISK_MESSAGES))
    ):
        return None
    free = shutil.disk_usage(output_dir).free if Path(output_dir).exists() else 0
    return OutputFolderError(
        f"The disk filled up while writing to {str(output_dir)!r}: the run needs about {needed_bytes / 2**20:.1f} MiB "
        f"and {free / 2**20:.1f} MiB are free. The earlier checkpoints and model are intact; free some space and "
        "continue with `--resume_from_checkpoint latest`."
    )


def training_footprint(num_parameters: int, checkpoints_kept: int | None, weight_average: bool = False) -> int:
    """Bytes a run writes, roughly: fp32 weights plus two AdamW moments per checkpoint kept, and the final model;
    a `weight_average` (`--ema_decay`) adds a copy of the weights to each.

    `checkpoints_kept=None` means no limit is known; one checkpoint is counted, plus one being written.
    """
    weights_bytes = (2 if weight_average else 1) * 4 * num_parameters
    checkpoint_bytes = weights_bytes + 2 * 4 * num_parameters
    return ((checkpoints_kept if checkpoints_kept is not None else 1) + 1) * checkpoint_bytes + weights_bytes


def _no_one_to_wait_for() -> None:
    """The barrier of a single process."""


def write_folder_atomically(
    folder: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    overwrite: bool = True,
    is_main_process: bool = True,
    wait_for_everyone: Callable[[], None] = _no_one_to_wait_for,
) -> Path:
    """Let every process `write` into `.{name}.partial` beside `folder`, then rename it to `folder`.

    The staging name is the same on every process, so that all of them write into one folder; the rename waits until
    all have finished. A staging folder a killed run left behind is cleared first, and one whose `write` raised
    (Ctrl-C, a full disk) is removed. An existing `folder` is replaced; with `overwrite=False` a non-empty one raises
    `FileExistsError` before anything is written.
    """
    folder = Path(folder)
    if not overwrite and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not empty")
    staging = folder.with_name(f".{folder.name}.partial")
    if is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
    wait_for_everyone()
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    wait_for_everyone()
    if is_main_process:
        if folder.exists():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            replaced = folder.with_name(f".{folder.name}.replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(folder, replaced)
            os.replace(staging, folder)
            shutil.rmtree(replaced)
        else:
            os.replace(staging, folder)
    wait_for_everyone()
    return folder


@contextlib.contextmanager
def staging_folder(prefix: str) -> Iterator[Path]:
    """A fresh folder in the system's temporary folder, removed on exit: for files that are assembled, not kept."""
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as staging:
        yield Path(staging)


def is_complete_checkpoint(folder: str | os.PathLike, scheme: CheckpointScheme) -> bool:
    """Whether the loop finished writing `folder`: its last file exists and parses."""
    try:
        json.loads((Path(folder) / scheme.last_file).read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoints(output_dir: str | os.PathLike, scheme: CheckpointScheme) -> list[tuple[int, Path]]:
    """`(step, folder)` of every checkpoint folder of `scheme` in `output_dir`, complete or not, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(scheme.prefix)}(\d+)")
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if path.is_dir() and (match := pattern.fullmatch(path.name))
    ]
    return sorted(found)


def newest_complete_checkpoint(output_dir: str | os.PathLike, scheme: CheckpointScheme) -> Path | None:
    """The complete checkpoint of `scheme` with the highest step in `output_dir`, or `None`."""
    complete = [folder for _, folder in checkpoints(output_dir, scheme) if is_complete_checkpoint(folder, scheme)]
    return complete[-1] if complete else None


def discard_incomplete_checkpoints(output_dir: str | os.PathLike, scheme: CheckpointScheme) -> list[Path]:
    """Delete the checkpoint folders a killed save left half-written; return them.

    Trainer writes its checkpoints in place: left there, a half-written one would be resumed from and break, or push
    a complete checkpoint out of `save_total_limit`.
    """
    discarded = [folder for _, folder in checkpoints(output_dir, scheme) if not is_complete_checkpoint(folder, scheme)]
    for folder in discarded:
        logger.warning("Removing the incomplete checkpoint %s (its save was interrupted).", folder)
        shutil.rmtree(folder)
    return discarded


def prune_checkpoints(output_dir: str | os.PathLike, scheme: CheckpointScheme, keep: int | None) -> None:
    """Delete all but the newest `keep` complete checkpoints (`save_total_limit`; `None` keeps them all)."""
    if keep is None:
        return
    complete = [folder for _, folder in checkpoints(output_dir, scheme) if is_complete_checkpoint(folder, scheme)]
    for folder in complete[: max(len(complete) - keep, 0)]:
        shutil.rmtree(folder)


def check_output_folder_is_free(
    output_dir: str | os.PathLike, scheme: CheckpointScheme, resuming: bool, overwrite: bool
) -> None:
    """Refuse an `output_dir` that holds an earlier run's model or checkpoints, unless this run resumes that run or
    the user asked for `--overwrite_output_dir`: the save would replace the model, and `save_total_limit` rotation would
    delete checkpoints this run did not write.
    """
    root = Path(output_dir)
    if resuming or overwrite or not root.is_dir():
        return
    held = [name for name in ("config.json", "model.safetensors", "pytorch_model.bin") if (root / name).exists()]
    held += [folder.name for _, folder in checkpoints(root, scheme)]
    if held:
        listed = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise OutputFolderError(
            f"{str(output_dir)!r} already holds an earlier run's {listed}: resume it with `--resume_from_checkpoint "
            "latest`, replace it with `--overwrite_output_dir`, or choose another `--output_dir`."
        )


def check_checkpoint_fits(
    checkpoint: str | os.PathLike, model: torch.nn.Module, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Raise a `ValueError` when the weights in `checkpoint` do not fit `model` (a checkpoint of another architecture
    in the output folder), before the loop's own loading fails with a size mismatch deep inside torch.

    Reads the shapes from the safetensors header only (`model` may live on the meta device); keys starting with
    `ignore_prefixes` are not compared. Checkpoints without a `model.safetensors` (FSDP's sharded state) are left to
    the loop's loading.
    """
    weights = Path(checkpoint) / "model.safetensors"
    if not weights.is_file():
        return
    with safe_open(weights, framework="pt") as file:
        saved = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
    expected = {
        key: tuple(tensor.shape) for key, tensor in model.state_dict().items() if not key.startswith(ignore_prefixes)
    }
    wrong = [
        f"{key}: {saved[key]} saved, {shape} here" for key, shape in expected.items() if saved.get(key, shape) != shape
    ]
    if wrong or not saved.keys() & expected.keys():
        detail = wrong[0] if wrong else "no weight of this model in it"
        raise ValueError(
            f"The checkpoint {str(checkpoint)!r} is of another architecture than this run's model ({detail}); resume "
            "it with the flags it was trained with, or train afresh in another `--output_dir`."
        )


def resolve_resume_checkpoint(
    resume_from_checkpoint: str | None, output_dir: str | os.PathLike, scheme: CheckpointScheme
) -> Path | None:
    """Turn `--resume_from_checkpoint` into a complete checkpoint folder, or raise a `ValueError` that says why not.

    `latest` (or `true`) means the newest complete checkpoint in `output_dir`; an explicit folder must be complete.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint in LATEST:
        checkpoint = newest_complete_checkpoint(output_dir, scheme)
        if checkpoint is None:
            raise ValueError(f"No complete {scheme.prefix}N folder to resume from in {str(output_dir)!r}.")
        return checkpoint
    folder = Path(resume_from_checkpoint)
    if not folder.is_dir():
        raise ValueError(f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a folder.")
    if not is_complete_checkpoint(folder, scheme):
        raise ValueError(
            f"`resume_from_checkpoint` {resume_from_checkpoint!r} is incomplete or not a checkpoint of this loop (no "
            f"readable {scheme.last_file}). Resume from `latest` to take the newest complete one."
        )
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
    "ACCELERATE_CHECKPOINTS",
    "LATEST",
    "TRAINER_CHECKPOINTS",
    "CheckpointScheme",
    "OutputFolderError",
    "TrainingInterrupted",
    "check_checkpoint_fits",
    "check_output_folder",
    "check_output_folder_is_free",
    "checkpoints",
    "discard_incomplete_checkpoints",
    "full_disk_error",
    "interrupted_message",
    "is_complete_checkpoint",
    "newest_complete_checkpoint",
    "prune_checkpoints",
    "resolve_resume_checkpoint",
    "staging_folder",
    "training_footprint",
    "write_folder_atomically",
]
