"""What a run records: the result-changing settings in its checkpoints (a resume must match them), the run's
arguments in its saved weights, and the config its tracker logs."""
from __future__ import annotations

from pathlib import Path

from models.options import keys
from models.training.options import OPTIONS
from models.training.setup import resolve_lm_dtype

TRACKER_PROJECT = "late-fusion"  # the project name under --report_to (wandb, tensorboard, ...)
TRAIN_CONFIG = "train_config.yaml"  # beside the saved weights: the settings, as --config reads them
# What the declarations say (models/training/options.py): the run arguments recorded in the saved weights'
# config.json, the settings that change what a run computes (a checkpoint records them and a resume must match
# them, with the resolved mixed precision and LM dtype, the device type, the process count and the data size),
# and the local paths among them (compared in absolute form)
RECORDED_ARGS = keys(OPTIONS, "record")
RESULT_ARGS = keys(OPTIONS, "results")
_PATH_ARGS = keys(OPTIONS, "path")


def _normalised(name: str, value):
    """Local paths made absolute, so that a resume from another working directory compares equal."""
    if isinstance(value, str) and name in _PATH_ARGS and Path(value).exists():
        return str(Path(value).resolve())
    if name == "vision_encoder" and isinstance(value, str) and value.startswith("local-dir:"):
        return "local-dir:" + str(Path(value[len("local-dir:"):]).resolve())
    return value


def run_config(args, accelerator, dataset_size: int | None) -> dict:
    """The settings that change what this run computes, as recorded in its checkpoints (``dataset_size``:
    the training set's size, None before the data is read)."""
    config = {name: _normalised(name, getattr(args, name)) for name in RESULT_ARGS}
    config.update(mixed_precision=str(accelerator.mixed_precision),
                  lm_dtype=str(resolve_lm_dtype(args.lm_dtype, accelerator.device)).removeprefix("torch."),
                  device=accelerator.device.type, num_processes=accelerator.num_processes,
                  training_set_size=dataset_size)
    return config


def tracker_config(args) -> dict:
    """Every flag, as the trackers log it (numbers, strings and booleans as they are, anything else as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


def config_yaml(args) -> str:
    """The settings this run used as a YAML file that ``train.py --config`` reads back."""
    from models.options import config_yaml as to_yaml

    return to_yaml(args, OPTIONS, "The settings of this train.py run, as used; give this file back as --config to run "
                                  "it again\n(with another --output_dir, or --overwrite_output_dir; flags given beside "
                                  "it win).")

