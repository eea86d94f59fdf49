"""The training loop: epochs of optimizer steps over the prepared model, data and optimiser, with the
checkpoints (every ``--checkpointing_steps``) and weights (each epoch's end) it saves on the way."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from models.distributed import step
from models.training.errors import InputError
from models.training.run_config import RECORDED_ARGS, TRAIN_CONFIG, config_yaml

logger = logging.getLogger("train")  # one logger for the whole run: its lines read "train: ..."


BAD_INPUT = (InputError,)  # with ValueError (CheckpointError included) and OSError: see models.distributed


def together_batches(loader):
    """The loader's batches, each fetched in a step of every rank (:func:`models.distributed.step`): an
    unreadable run of images on one rank stops every rank at that batch. Every rank has as many batches
    (Accelerate's ``even_batches``)."""
    from data.captions import NoReadableImage

    batches, end = iter(loader), object()
    while True:
        with step(BAD_INPUT):
            try:
                batch = next(batches, end)
            except NoReadableImage as err:
                raise InputError(NoReadableImage.message_of(err)) from None
        if batch is end:
            return
        yield batch


class TrainingLoop:
    """The loop and what it saves (checkpoints, weights), for one run of
    :func:`models.training.run.run_training`, which sets up (and, on a resume, restores) what it is given."""

    def __init__(self, args, accelerator, model, encoder, optimizer, train_dataloader, lr_scheduler, state,
                 budget, config, resume_path, output_dir, masker=None, validator=None):
        self.args, self.accelerator, self.model, self.encoder = args, accelerator, model, encoder
        self.masker = masker  # masked LMs: the MLM masking of each batch
        self.validator = validator  # models/training/validation.py: the validation losses, or None
        self.optimizer, self.train_dataloader, self.lr_scheduler = optimizer, train_dataloader, lr_scheduler
        self.state, self.budget, self.config = state, budget, config
        self.resume_path, self.output_dir = resume_path, output_dir
        self.last_saved = state.completed_steps if resume_path is not None else None  # step of the newest checkpoint

    def save_checkpoint(self) -> Path:
        """The training state at this step, as ``checkpoint-<step>/`` (at most --checkpoints_total_limit kept)."""
        from models.checkpoints.training_state import save_training_checkpoint

        trainer_state = {**self.state.state_dict(), "accumulation_step": self.accelerator.step,
                         "images_seen": self.budget.seen, "bad_images": self.budget.bad, "config": self.config}
        if self.validator is not None:  # the measurements so far: a resumed run's weights record them all
            trainer_state["validation"] = self.validator.state_dict()
        path = save_training_checkpoint(self.accelerator, self.output_dir, self.state.completed_steps,
                                        model=self.model, optimizer=self.optimizer, scheduler=self.lr_scheduler,
                                        trainer_state=trainer_state, total_limit=self.args.checkpoints_total_limit)
        self.last_saved = self.state.completed_steps
        return path

    def save_weights(self, epoch: int) -> Path:
        """The trainable weights as ``<run_name>_<epoch>/``, the run's arguments in its config.json."""
        args, accelerator = self.args, self.accelerator
        from models.checkpoints.training_state import gathered_state

        path = self.output_dir / f"{args.run_name}_{epoch}"
        # FSDP2: every process takes part in gathering the shards; the main process writes
        state = gathered_state(accelerator.unwrap_model(self.model).trainable_state_dict(),
                               keep=accelerator.is_main_process)
        with step(BAD_INPUT):  # a full disk there stops every process
            if accelerator.is_main_process:
                self._write_weights(path, state)
        return path

    def _write_weights(self, path: Path, state: dict) -> None:
        from models.checkpoints.weights import save_trainable

        args, accelerator = self.args, self.accelerator
        run_args = {k: getattr(args, k) for k in RECORDED_ARGS}
        run_args.update(completed_steps=self.state.completed_steps, num_processes=accelerator.num_processes,
                        images_seen=self.budget.seen, bad_images=self.budget.bad,
                        resumed_from=None if self.resume_path is None else str(self.resume_path))
        extra = {"run_args": run_args}
        if self.validator is not None:  # every measurement so far, the last one at these weights' step
            extra["validation"] = list(self.validator.history)
        save_trainable(accelerator.unwrap_model(self.model), path, base_model=args.model_name_or_path,
                       vision_encoder=args.vision_encoder, extra=extra,
                       files={TRAIN_CONFIG: config_yaml(args)}, state=state)
        logger.info("saved trainable weights to %s", path)

    def count_images(self, seen: int, bad: int) -> None:
        """Add this optimizer step's image counts of every process; stop when too many images were bad."""
        import torch

        counts = torch.tensor([seen, bad], dtype=torch.long, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        self.budget.add(*(int(c) for c in counts.tolist()))
        if self.budget.exceeded():
            raise InputError(self.budget.message())

    def train(self, max_train_steps, num_epochs, total_batch, step_callback) -> dict:
        """Train from where the state stands to ``max_train_steps``; returns the steps' losses and learning
        rates, the completed steps, the saved weights' folders and the run's lengths."""
        import torch
        from tqdm.auto import tqdm

        from data.masking import batch_seed
        from models.fusion.memo import HiddenStateMemo

        args, accelerator, model, state = self.args, self.accelerator, self.model, self.state
        optimizer, lr_scheduler, train_dataloader = self.optimizer, self.lr_scheduler, self.train_dataloader
        encoder = self.encoder
        params = accelerator.unwrap_model(model).trainable_parameters()
        memo = HiddenStateMemo(limit_bytes=2**62) if args.cache_lm_states else None
        losses, lrs, saved = [], [], []
        window_loss, window_steps = 0.0, 0
        bar = tqdm(total=max_train_steps, initial=state.completed_steps, desc="train", unit="step",
                   disable=not accelerator.is_local_main_process)
        started, steps_run = time.perf_counter(), 0
        try:
            for epoch in range(state.epoch, num_epochs):
                if state.completed_steps >= max_train_steps:
                    break
                model.train()
                train_dataloader.set_epoch(epoch)
                skip = state.batches_in_epoch if epoch == state.epoch else 0
                loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
                batch_index, micro_losses, seen, bad = skip, [], 0, 0
                for batch in together_batches(loader):
                    batch_index += 1
                    with step(BAD_INPUT):  # this rank's own work, before the model's collectives
                        if self.masker is not None:  # seeded by the batch's place in the run: a resume masks alike
                            batch["input_ids"], batch["labels"] = self.masker(
                                batch["input_ids"], batch["labels"],
                                batch_seed(args.seed, epoch, batch_index, accelerator.process_index))
                        skipped = batch.pop("bad_images")
                        self.budget.log(skipped)
                        seen, bad = seen + len(batch["input_ids"]) + len(skipped), bad + len(skipped)
                        with torch.no_grad():
                            patches, _ = encoder.encode_images(batch["pixel_values"].to(encoder.device, encoder.dtype))
                    with accelerator.accumulate(model):
                        with step(BAD_INPUT):  # the forward pass, before the backward pass's gradient reduction
                            hidden = None if memo is None else memo(accelerator.unwrap_model(model),
                                                                    batch["input_ids"], batch["attention_mask"])
                            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         image_patches=patches, labels=batch["labels"], hidden=hidden).loss
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and args.max_grad_norm is not None:
                            accelerator.clip_grad_norm_(params, args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                        optimizer.zero_grad()
                    micro_losses.append(loss.detach().float())
                    if not accelerator.sync_gradients:
                        continue

                    self.count_images(seen, bad)
                    seen, bad = 0, 0
                    state.completed_steps += 1
                    state.epoch, state.batches_in_epoch = epoch, batch_index
                    if batch_index == len(train_dataloader):
                        state.epoch, state.batches_in_epoch = epoch + 1, 0
                    step_loss = torch.stack(micro_losses).mean().item()
                    micro_losses = []
                    losses.append(step_loss)
                    lrs.append(lr_scheduler.get_last_lr()[0])
                    steps_run += 1
                    window_loss, window_steps = window_loss + step_loss, window_steps + 1
                    samples_per_s = steps_run * total_batch / (time.perf_counter() - started)
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}", samples_per_s=f"{samples_per_s:.1f}")
                    if state.completed_steps % args.logging_steps == 0 or state.completed_steps == max_train_steps:
                        window = torch.tensor(window_loss / window_steps, device=accelerator.device)
                        mean_loss = accelerator.reduce(window, reduction="mean").item()
                        if args.with_tracking:
                            accelerator.log({"train_loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0],
                                             "epoch": epoch, "samples_per_second": samples_per_s},
                                            step=state.completed_steps)
                        window_loss, window_steps = 0.0, 0
                    if self.validator is not None and self.validator.due(state.completed_steps, max_train_steps):
                        self.validator.measure(model, state.completed_steps)
                    every = args.checkpointing_steps
                    if isinstance(every, int) and state.completed_steps % every == 0:
                        self.save_checkpoint()
                    if step_callback is not None:
                        step_callback(state.completed_steps)
                    if state.completed_steps >= max_train_steps:
                        break
                if args.checkpointing_steps == "epoch" and self.last_saved != state.completed_steps:
                    self.save_checkpoint()
                saved.append(self.save_weights(epoch))
        finally:  # a stop mid-run ends the progress bar's line before the error line
            bar.close()
        if not saved:  # resumed at the very end: nothing to train, but the run still ends with its weights
            if self.validator is not None and self.validator.last_step != state.completed_steps:
                self.validator.measure(model, state.completed_steps)
            saved.append(self.save_weights(max(state.epoch - 1, 0)))
        return {"losses": losses, "lrs": lrs, "completed_steps": state.completed_steps, "saved": saved,
                "max_train_steps": max_train_steps, "num_epochs": num_epochs}
