"""What a run records: the result-changing settings in its checkpoints (a resume must match them), the run's
arguments in its saved weights, and the config its tracker logs."""
from __future__ import annotations

from pathlib import Path

from models.training.setup import resolve_lm_dtype

TRACKER_PROJECT = "late-fusion"  # the project name under --report_to (wandb, tensorboard, ...)
# Run arguments recorded in the saved weights' config.json.
RECORDED_ARGS = ("run_name", "dataset_name", "max_elements", "max_train_samples", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "num_warmup_steps",
                 "weight_decay", "max_train_steps", "num_train_epochs", "max_length", "mixed_precision",
                 "lm_dtype", "seed", "image_generator", "image_size", "num_inference_steps", "max_bad_images",
                 "image_source", "image_index", "retrieve_by", "mlm_probability")
# Flags that change what a run computes: a checkpoint records them, and a resume must match them
# (with the resolved mixed precision and LM dtype, the device type, the process count and the data size).
RESULT_ARGS = ("model_name_or_path", "config_name", "tokenizer_name", "vision_encoder", "proj_hidden",
               "pretrained_model", "dataset_name", "vg_dir", "laion_file", "laion_image_root", "wiki_file",
               "wiki_num", "wiki_chunk_tokens", "train_file", "max_elements", "max_train_samples", "shuffle_data",
               "skip_invalid_boxes", "max_length", "image_generator", "image_size", "num_inference_steps",
               "guidance_scale", "toyworld_noise", "image_source", "image_index", "retrieve_by", "dedup_threshold",
               "per_device_train_batch_size", "gradient_accumulation_steps",
               "learning_rate", "weight_decay", "lr_scheduler_type", "num_warmup_steps", "num_train_epochs",
               "max_train_steps", "max_grad_norm", "seed", "mlm_probability")
_PATH_ARGS = ("model_name_or_path", "config_name", "tokenizer_name", "pretrained_model", "vg_dir", "laion_file",
              "laion_image_root", "wiki_file", "train_file", "image_generator", "image_index")


def _normalised(name: str, value):
    """Local paths made absolute, so that a resume from another working directory compares equal."""
    if isinstance(value, str) and name in _PATH_ARGS and Path(value).exists():
        return str(Path(value).resolve())
    if name == "vision_encoder" and isinstance(value, str) and value.startswith("local-dir:"):
        return "local-dir:" + str(Path(value[len("local-dir:"):]).resolve())
    return value


def run_config(args, accelerator, dataset_size: int) -> dict:
    """The settings that change what this run computes, as recorded in its checkpoints."""
    config = {name: _normalised(name, getattr(args, name)) for name in RESULT_ARGS}
    config.update(mixed_precision=str(accelerator.mixed_precision),
                  lm_dtype=str(resolve_lm_dtype(args.lm_dtype, accelerator.device)).removeprefix("torch."),
                  device=accelerator.device.type, num_processes=accelerator.num_processes,
                  training_set_size=dataset_size)
    return config


def tracker_config(args) -> dict:
    """Every flag, as the trackers log it (numbers, strings and booleans as they are, anything else as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}

