"""One training run, in order: set up from the parsed flags, resume, run :class:`TrainingLoop`, end.

Bad input found on the way is an InputError on every process (``train.main`` prints it as one line);
nothing is written under ``--output_dir`` before every check has passed.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from models.distributed import barrier
from models.training.errors import InputError
from models.training.loop import TrainingLoop
from models.training.options import SCHEDULERS
from models.training.ranks import agreed
from models.training.run_config import TRACKER_PROJECT, run_config, tracker_config
from models.training.run_folder import (check_output_dir, check_resume_config, clear_previous_run,
                                        read_resume_checkpoint, resolve_resume)
from models.training.setup import (build_dataloader, build_optimizer, load_models, load_pretrained, make_accelerator,
                                   masked_lm_setup, prepare_data)
from models.training.state import TrainState
from models.training.validation import Validator, split_validation
from models.training.wiki_images import prefetch_wiki_images, pregenerate_wiki_images

logger = logging.getLogger("train")  # one logger for the whole run: its lines read "train: ..."


def check_resume_state(args, ckpt: dict, config: dict, max_train_steps: int, steps_per_epoch: int) -> None:
    """The checkpoint's JSON state against the schedule of this run's flags (its step, epoch and learning rate;
    :func:`models.checkpoints.training_state.check_training_state`), whatever its marker's hashes say.

    With ``--ignore_config_mismatch`` the run may have other settings than the checkpoint (``config``: this
    run's): its state is then checked against the schedule recorded in it (the one it was made with; the
    differences were warned about), and its epoch against its step only when no setting differs."""
    from models.checkpoints.training_state import check_training_state, config_differences
    from models.checkpoints.weights import CheckpointError

    saved = ckpt["trainer_state"]["config"]
    schedule = {"learning_rate": args.learning_rate, "lr_scheduler_type": args.lr_scheduler_type,
                "num_warmup_steps": args.num_warmup_steps, "max_train_steps": max_train_steps,
                "num_processes": config["num_processes"]}
    if args.ignore_config_mismatch:
        schedule.update({k: saved.get(k) for k in ("learning_rate", "lr_scheduler_type", "num_warmup_steps",
                                                   "num_processes")},
                        max_train_steps=saved.get("max_train_steps") or max_train_steps)
    whole = lambda v, low: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    valid = {"learning_rate": lambda v: isinstance(v, float) and math.isfinite(v) and v > 0,
             "lr_scheduler_type": lambda v: v in SCHEDULERS, "num_warmup_steps": lambda v: whole(v, 0),
             "max_train_steps": lambda v: whole(v, 1), "num_processes": lambda v: whole(v, 1)}
    bad = next((k for k, ok in valid.items() if not ok(schedule[k])), None)
    if bad is not None:
        raise InputError(f"--resume_from_checkpoint: {ckpt['path']}/trainer_state.json: its config's {bad} "
                         f"{str(schedule[bad])[:40]!r} is not a valid value")
    same = not config_differences(saved, config)
    try:
        check_training_state(ckpt, **schedule, steps_per_epoch=steps_per_epoch if same else None,
                             gradient_accumulation_steps=args.gradient_accumulation_steps)
    except CheckpointError as err:
        raise InputError(f"--resume_from_checkpoint: {err}") from None


def run_training(args, step_callback=None) -> dict:
    """Train with the parsed ``args``; returns what ``train.main`` returns (``{"pregenerated": stats}`` for
    ``--pregenerate_images``). ``step_callback(completed_steps)`` runs after each optimizer step."""
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    from data.captions import BadImageBudget, NoReadableImage
    from models.checkpoints.training_state import restore_training_checkpoint

    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if accelerator.is_local_main_process else logging.ERROR)
    hf_logging.set_verbosity_error()
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    resume_path = None
    if not args.pregenerate_images:  # which writes to the image cache only
        resume_path = agreed(accelerator, resolve_resume, args.resume_from_checkpoint, output_dir)
        agreed(accelerator, check_output_dir, args, resume_path)
    ckpt = None if resume_path is None else agreed(accelerator, read_resume_checkpoint, accelerator, resume_path)
    early = None
    if ckpt is not None:  # the flags first: a resume with other settings fails before any data or model loads
        early = run_config(args, accelerator, ckpt["trainer_state"]["config"].get("training_set_size"))
        agreed(accelerator, check_resume_config, args, ckpt, early)
    pretrained = None if args.pretrained_model is None else agreed(accelerator, load_pretrained, args.pretrained_model)
    lm_config, tokenizer, dataset, provider = prepare_data(args, accelerator)
    if args.pregenerate_images:
        stats = pregenerate_wiki_images(accelerator, dataset, provider)
        logger.info("image cache %s: %s", provider.cache.root, stats)
        return {"pregenerated": stats}
    # the validation captions are read (or held out) before any model loads: bad ones stop the run here
    train_set, validation_set = agreed(accelerator, split_validation, args, dataset)
    config = run_config(args, accelerator, len(dataset))
    if ckpt is not None and config != early:  # the data read is another size than the checkpoint's
        agreed(accelerator, check_resume_config, args, ckpt, config)
    encoder, model = agreed(accelerator, load_models, args, accelerator, lm_config, pretrained)
    del pretrained
    if provider is not None and args.image_source == "retrieve":
        logger.info("retrieved the images of %d wiki prompts from %s",
                    prefetch_wiki_images(accelerator, dataset, provider, encoder), args.image_index)
    masker, args = masked_lm_setup(args, accelerator.unwrap_model(model), encoder, tokenizer)

    train_dataloader = build_dataloader(args, accelerator, train_set, tokenizer, encoder, provider, masker)
    validator = None if validation_set is None else Validator(args, accelerator, validation_set, tokenizer, encoder,
                                                              provider, masker)
    optimizer, lr_scheduler, max_train_steps = build_optimizer(args, accelerator, model, train_dataloader)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

    state = TrainState()
    budget = BadImageBudget(args.max_bad_images, len(train_set))
    if ckpt is not None:
        agreed(accelerator, check_resume_state, args, ckpt, config, max_train_steps, steps_per_epoch)
        logger.info("resuming from %s", resume_path)
        agreed(accelerator, restore_training_checkpoint, ckpt, accelerator, model, optimizer, lr_scheduler)
        state.load_state_dict(ckpt["trainer_state"])
        if validator is not None:
            agreed(accelerator, validator.load_state_dict, ckpt["trainer_state"].get("validation"),
                   f"{resume_path}/trainer_state.json", state.completed_steps)
        budget.add(ckpt["trainer_state"]["images_seen"], ckpt["trainer_state"]["bad_images"])
        del ckpt

    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            clear_previous_run(args)
        output_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    if args.with_tracking:
        accelerator.init_trackers(TRACKER_PROJECT, tracker_config(args), init_kwargs={
            "wandb": {"name": args.run_name, "dir": str(output_dir)}})
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("%d epochs, %d optimizer steps of %d samples (%d per device x %d processes x %d accumulation)",
                num_epochs, max_train_steps, total_batch, args.per_device_train_batch_size,
                accelerator.num_processes, args.gradient_accumulation_steps)
    loop = TrainingLoop(args, accelerator, model, encoder, optimizer, train_dataloader, lr_scheduler, state, budget,
                        config, resume_path, output_dir, masker, validator)
    try:
        result = loop.train(max_train_steps, num_epochs, total_batch, step_callback)
    except NoReadableImage as err:
        raise InputError(NoReadableImage.message_of(err)) from None
    barrier()
    accelerator.end_training()
    result["model"] = accelerator.unwrap_model(model)
    result["bad_images"] = budget.bad
    result["validation"] = [] if validator is None else validator.history
    return result
