"""Train the late-fusion projector and fusion block (docs/method.md, "Training") with Accelerate.

The same command runs under ``python train.py``, ``accelerate launch train.py`` (one or many GPUs,
DDP through Accelerate's config) and ``torchrun --nproc_per_node N train.py`` (on CPUs with gloo)::

    # stage 1: Visual Genome regions
    accelerate launch train.py --run_name test --dataset_name cropped_vg --vg_dir data/vg \\
        --model_name_or_path meta-llama/Meta-Llama-3-8B --output_dir output/llama3 --report_to wandb \\
        --per_device_train_batch_size 64 --num_train_epochs 1 --run_bf16 --learning_rate 5e-4 --with_tracking
    # stage 2: WikiText-103 (200K chunks, one generated image each) + LAION-220, from the stage-1 weights
    accelerate launch train.py --run_name ft_wiki_laion_220 --dataset_name wiki_laion_220 \\
        --max_elements 200000 --laion_image_root data/coco --pretrained_model output/llama3/test_0 ...

Only ``mm_proj`` and ``fusion_layer`` train (fp32, under autocast with ``--mixed_precision``/``--run_bf16``);
the LM and the vision encoder stay frozen in ``--lm_dtype`` and in eval mode.

A masked LM (``--model_name_or_path bert-base-uncased``, RoBERTa, ...) trains with the masked-LM objective
instead of next-token prediction: ``--mlm_probability`` of the caption tokens are masked (80% mask token,
10% random, 10% unchanged; ``data.masking``), the draws seeded per batch, and the loss is taken at those
positions only (``docs/masked_lm.md``).

Outputs under ``--output_dir``:

* ``checkpoint-<step>/``: the training state (trainable weights, optimizer, scheduler, RNG states, data
  position, the run's config) in safetensors and JSON only (``models/checkpoints/training_state.py``), every
  ``--checkpointing_steps`` steps or each epoch, written atomically; at most ``--checkpoints_total_limit``
  kept. ``--resume_from_checkpoint latest|PATH`` resumes exactly: the resumed run ends with the same weights
  as an uninterrupted one. A resume with settings that change the result is refused unless
  ``--ignore_config_mismatch``; a new run into a folder holding checkpoints or this run's weights is refused
  unless ``--overwrite_output_dir``. A checkpoint whose state (learning rate, step, epoch) is not what the
  flags' schedule gives at its step is refused, even when the hashes of its files were recomputed.
* ``<run_name>_<epoch>/``: the trainable weights (safetensors + config.json), written at each epoch's end
  and at the end of the run; ``eval_scripts/* --pretrained_model`` takes this path. Its ``config.json``
  records the run's settings, how many training images were unreadable and skipped (``bad_images``) and,
  with validation captions, every validation measurement so far (``validation``); its ``README.md`` is the
  model card (:mod:`models.card`), and the final folder's ``train_results.json`` holds the final training loss.
  ``--push_to_hub --hub_model_id ORG/NAME`` uploads the final folder (``python -m models.hub push`` does the
  same later).

Validation: ``--validation_file F`` (``--train_file``'s format) or ``--validation_split_percentage P`` (P% of the
training set held out, seeded), measured every ``--eval_steps`` optimizer steps and at the end: the fused
model's mean loss over every caption token (``validation_loss``) and the frozen LM's on the same tokens
(``validation_loss_text_only``), logged to the trackers.

Bad input is one ``error: ...`` line (exit status 2), found before anything is written; under torchrun
rank 0 prints it and every rank exits with it (a failure on one rank is shared with the others). Mid-run,
every micro-batch is a step of every rank (``models/distributed.py``): unreadable images or a full disk on
one rank stop every rank at that step, with one line and the same exit status.

Multi-process runs: DDP, or FSDP2 (``accelerate config`` with ``fsdp_version: 2``), whose checkpoints gather
the sharded trainable part and optimizer state into the same files; FSDP1, DeepSpeed and Megatron-LM train
but refuse ``--checkpointing_steps``/``--resume_from_checkpoint``.

Wiki images: each WikiText chunk's image is generated from one of its sentences and stored in the
content-addressed ``--image_cache``. Fill the cache first (sharded over processes, then exit) with the
training command plus ``--pregenerate_images``; images still missing are generated inline by the
DataLoader workers. ``python -m models.images.pregenerate --prompts_file P --image_prompt full --k 1
--seed S`` fills the same cache entries for a file P of prompts.

Where the code lives (``models/training/``):

* ``options.py``: its options, declared once (:mod:`models.options`), and their resolution (:func:`parse_args`);
* ``run.py``: one run in order (:func:`run_training`): set up, resume, train, end;
* ``setup.py``: the accelerator, the training data, the models, the masked-LM objective, the DataLoader and
  the optimiser;
* ``wiki_images.py``: the wiki chunks' image source, ``--pregenerate_images``, retrieved-image prefetch;
* ``loop.py``: the training loop and what it saves (:class:`TrainingLoop`);
* ``state.py``: where training stands (:class:`TrainState`), saved in each checkpoint;
* ``run_folder.py``: ``--output_dir`` policy: resuming, refusing or clearing a previous run;
* ``run_config.py``: what a run records (checkpoint config, saved weights' run arguments, tracker config);
* ``validation.py``: the validation captions and losses;
* ``ranks.py`` and ``errors.py``: bad input as one ``InputError`` line, agreed across ranks (on top of
  ``models/distributed.py``, which also stops every rank together mid-run).
"""
from __future__ import annotations

from models.cli import report_error
from models.training.errors import InputError
from models.training.options import parse_args
from models.training.run import run_training

__all__ = ["main", "parse_args"]


def main(argv=None, *, step_callback=None) -> dict:
    """Parse ``argv``, train, and return ``{"losses", "completed_steps", "model", "saved", ...}``.

    ``losses`` and ``lrs`` hold each optimizer step's mean training loss (on this process) and the learning
    rate after it, for the steps this invocation ran.
    ``step_callback(completed_steps)``, when given, runs after each optimizer step (tests use it to
    simulate an interruption).
    """
    args = parse_args(argv)
    try:
        result = run_training(args, step_callback)
        if result.get("saved"):
            publish(args, result)
        return result
    except InputError as err:
        import torch

        report_error(str(err))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # every rank is here: exit cleanly, not in gloo's teardown
        raise SystemExit(2) from None
    except Exception as err:  # noqa: BLE001 - under torchrun, every rank must hear of it
        stop_every_rank(err)
        raise


def stop_every_rank(err: Exception) -> None:
    """Under torchrun: end every rank for ``err``, which escaped this one (a peer's failure agreed at a
    check-in, or this rank's own, offered at its peers' next check-in): rank 0 prints one line, every rank
    exits with the agreed status (2 for bad input). With one process: returns (the caller re-raises)."""
    from models.checkpoints.weights import CheckpointError
    from models.distributed import RankFailure, agree_on, close, report, world

    if world()[1] == 1 and not isinstance(err, RankFailure):
        return
    failure = agree_on(err, (InputError, CheckpointError))
    report(failure)
    close()
    raise SystemExit(failure.status) from None


def publish(args, result: dict) -> None:
    """On rank 0: the final weights folder's training loss (``train_results.json``) and model card, then, with
    ``--push_to_hub``, its upload to ``--hub_model_id``."""
    from models.cli import is_rank0
    from models.hub import push, record_training

    if not is_rank0():
        return
    folder = result["saved"][-1]
    losses = result.get("losses") or []
    record_training(folder, losses[-1] if losses else None, result.get("completed_steps"),
                    repo_id=args.hub_model_id)
    if not args.push_to_hub:
        return
    try:
        url = push(folder, args.hub_model_id, private=args.hub_private_repo)
    except ValueError as err:  # the folder or the repo id
        raise InputError(f"--push_to_hub: {err}") from None
    except Exception as err:  # noqa: BLE001 - the hub's errors (network, auth, quota) come in many types
        report_error(f"--push_to_hub {args.hub_model_id}: {' '.join(str(err).split()) or type(err).__name__} "
                     f"(the weights are in {folder}; python -m models.hub push uploads them later)")
        raise SystemExit(1) from None
    print(f"pushed {folder} to {args.hub_model_id}: {url}")


if __name__ == "__main__":
    main()
