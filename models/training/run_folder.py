"""What ``--output_dir`` may hold: the checkpoint a run resumes from, and the refusal (or deletion, with
``--overwrite_output_dir``) of a previous run's checkpoints and weights."""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from models.training.errors import InputError

logger = logging.getLogger("train")  # one logger for the whole run: its lines read "train: ..."


def list_checkpoints(output_dir) -> list[Path]:
    """The complete ``checkpoint-<step>`` folders of ``output_dir``, oldest (lowest step) first."""
    from models.checkpoints.training_state import scan_checkpoints

    return scan_checkpoints(output_dir)[0]


def resolve_resume(resume: str | None, output_dir) -> Path | None:
    """The checkpoint folder to resume from (None: start afresh); incomplete ones are skipped with a warning."""
    from models.checkpoints.weights import FORMAT, CheckpointError, read_checkpoint_config
    from models.checkpoints.training_state import check_resumable, latest_checkpoint

    if not resume:
        return None
    if resume == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s; starting a new run",
                           output_dir)
        return path
    path = Path(resume)
    try:
        if path.is_dir() and read_checkpoint_config(path).get("format") == FORMAT:
            raise InputError(f"--resume_from_checkpoint {resume}: holds saved weights, not a training checkpoint "
                             "(give it as --pretrained_model to start from these weights)")
        check_resumable(path)
    except CheckpointError as err:
        raise InputError(f"--resume_from_checkpoint {resume}: {err}") from None
    return path


def _run_weights(output_dir: Path, run_name: str) -> list[Path]:
    """This run's saved weights ``<run_name>_<epoch>/`` in ``output_dir``."""
    if not output_dir.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(run_name)}_\d+")
    return sorted(d for d in output_dir.iterdir() if d.is_dir() and pattern.fullmatch(d.name))


def _previous_run(args) -> list[Path]:
    """Checkpoints (complete or not) and this run's weights already in ``--output_dir``."""
    output_dir = Path(args.output_dir)
    from models.checkpoints.training_state import scan_checkpoints

    complete, incomplete = scan_checkpoints(output_dir)
    return complete + incomplete + _run_weights(output_dir, args.run_name)


def check_output_dir(args, resume_path: Path | None) -> None:
    """Refuse a new run into a folder holding checkpoints or this run's weights (they would be mixed with the
    new run's, resumed by mistake or overwritten), unless resuming or ``--overwrite_output_dir``."""
    found = _previous_run(args)
    if not found or resume_path is not None or args.overwrite_output_dir:
        return
    names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    if args.resume_from_checkpoint:  # 'latest' found nothing complete to resume
        raise InputError(f"--output_dir {args.output_dir} holds no complete checkpoint to resume, but {names}: "
                         "replace them with --overwrite_output_dir, or choose another --output_dir")
    raise InputError(f"--output_dir {args.output_dir} already holds {names}: resume with --resume_from_checkpoint "
                     "PATH|latest, replace them with --overwrite_output_dir, or choose another --output_dir")


def clear_previous_run(args) -> None:
    """``--overwrite_output_dir``: delete the checkpoints and this run's weights (main process only)."""
    for path in _previous_run(args):
        logger.warning("--overwrite_output_dir: deleting %s", path)
        shutil.rmtree(path)


def read_resume_checkpoint(accelerator, path: Path) -> dict:
    """Read and verify every file of the checkpoint this process needs (before any data or model loads)."""
    from models.checkpoints.weights import CheckpointError
    from models.checkpoints.training_state import read_training_checkpoint

    try:
        return read_training_checkpoint(path, accelerator.process_index)
    except CheckpointError as err:
        raise InputError(f"--resume_from_checkpoint: {err}") from None


def check_resume_config(args, ckpt: dict, config: dict) -> None:
    """Refuse a checkpoint made with other result-changing settings, unless --ignore_config_mismatch."""
    from models.checkpoints.training_state import config_differences

    diffs = config_differences(ckpt["trainer_state"]["config"], config)
    if diffs and not args.ignore_config_mismatch:
        raise InputError(f"--resume_from_checkpoint {ckpt['path']} was made with other settings: {'; '.join(diffs)} "
                         "(resume with the same flags, or pass --ignore_config_mismatch)")
    if diffs:
        logger.warning("--ignore_config_mismatch: resuming %s despite other settings: %s", ckpt["path"],
                       "; ".join(diffs))

