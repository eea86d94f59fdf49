"""Validation during training: the loss of the fused model, and of the frozen LM alone, on held-out captions.

The held-out captions are ``--validation_file`` (the format of ``--train_file``: JSONL/CSV rows of ``image``,
``caption`` and optional ``crop``/``prompt``) or ``--validation_split_percentage`` P: P% of the training set,
drawn with ``--seed`` and taken out of training (as the Hugging Face example scripts do). Every
``--eval_steps`` optimizer steps and once at the end, :class:`Validator` measures

* ``validation_loss``: the fused model's mean next-token loss (masked LMs: MLM loss) over every caption token
  of the validation set, each token counting once (the mean one batch holding every caption would give, so
  it does not depend on the batch size or the number of processes), and
* ``validation_loss_text_only``: the frozen LM's own loss on the same tokens (no image): the gap between the
  two is what the images add.

Both come from one pass of the LM per batch, in eval mode under ``torch.no_grad`` (train mode is restored
afterwards), in the run's autocast. Each process measures its share of the captions (every
``num_processes``-th one) and the sums are added over processes, so every process gets the same numbers.
Masked LMs mask each validation batch with seeds fixed for the run, so every measurement sees the same masks.
Nothing here draws from a global RNG: a run with validation trains exactly as one without. The measurements
so far are kept in every checkpoint (``trainer_state.json``, with what they are of); a resume on the same
captions continues them, each record checked, so a resumed run's weights record the whole history.
"""
from __future__ import annotations

import logging
import math

from models.training.errors import InputError

logger = logging.getLogger("train")  # one logger for the whole run: its lines read "train: ..."

VALIDATION_SEED = 7_2021  # the masked-LM masks of validation batches: batch_seed(--seed, this, batch, rank)


def has_validation(args) -> bool:
    return args.validation_file is not None or args.validation_split_percentage is not None


def read_validation_file(args):
    """``--validation_file`` as a dataset of ``{"image", "text"[, "prompt"]}`` items, every row checked."""
    from data.captions import CaptionFile

    return CaptionFile(args.validation_file, flag="--validation_file")


def held_out_indices(size: int, percentage: float, seed: int) -> list[int]:
    """The indices of ``percentage``% of ``size`` items (at least one), drawn with ``seed``, in ascending order.
    An InputError when the split would leave no training item."""
    import numpy as np

    count = max(1, math.ceil(size * percentage / 100))
    if count >= size:
        raise InputError(f"--validation_split_percentage {percentage:g} of the {size} training items leaves none "
                         "to train on: use a smaller percentage, or --validation_file")
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(size)[:count])


def split_validation(args, dataset):
    """``(training set, validation set or None)``: the training set without the held-out items when
    ``--validation_split_percentage`` is given, the ``--validation_file`` items when that is given."""
    from torch.utils.data import Subset

    if args.validation_file is not None:
        return dataset, read_validation_file(args)
    if args.validation_split_percentage is None:
        return dataset, None
    held = held_out_indices(len(dataset), args.validation_split_percentage, args.seed)
    chosen = set(held)
    kept = [i for i in range(len(dataset)) if i not in chosen]
    logger.info("validation: %d of the %d training items held out (--validation_split_percentage %g)",
                len(held), len(dataset), args.validation_split_percentage)
    return Subset(dataset, kept), Subset(dataset, held)


class Validator:
    """Measures the validation losses (see the module docstring); :attr:`history` holds every measurement."""

    def __init__(self, args, accelerator, dataset, tokenizer, encoder, provider, masker):
        from torch.utils.data import Subset

        from models.training.setup import build_dataloader

        self.args, self.accelerator, self.encoder, self.masker = args, accelerator, encoder, masker
        self.size = len(dataset)
        mine = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
        settings = args.replace(shuffle_data=False, per_device_train_batch_size=args.per_device_eval_batch_size)
        self.loader = build_dataloader(settings, accelerator, Subset(dataset, mine), tokenizer, encoder, provider,
                                       masker)
        self.history: list[dict] = []

    def source(self) -> dict:
        """What the measurements are of (kept with them in checkpoints: a resume continues the history only
        when it measures the same captions)."""
        from pathlib import Path

        file = self.args.validation_file
        return {"validation_file": None if file is None else str(Path(file).resolve()),
                "validation_split_percentage": self.args.validation_split_percentage, "captions": self.size}

    def state_dict(self) -> dict:
        return {"source": self.source(), "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state, where: str, completed_steps: int) -> None:
        """Continue the history a checkpoint holds (``where`` names its file), each record checked; a history
        of other captions is not continued (said in one log line)."""
        if state is None:
            return
        if not isinstance(state, dict) or not isinstance(state.get("history"), list):
            raise InputError(f"--resume_from_checkpoint: {where}: its validation history is not a list")
        if state.get("source") != self.source():
            logger.info("validation: the checkpoint's measurements are of other captions; starting a new history")
            return
        last = 0
        for record in state["history"]:
            if not self._plausible(record, last, completed_steps):
                raise InputError(f"--resume_from_checkpoint: {where}: validation record {str(record)[:80]} is not "
                                 f"a measurement at a step after {last} and up to {completed_steps}")
            last = record["step"]
        self.history = [dict(r) for r in state["history"]]

    @staticmethod
    def _plausible(record, after: int, completed_steps: int) -> bool:
        keys = {"step", "validation_loss", "validation_loss_text_only", "tokens"}
        if not isinstance(record, dict) or set(record) != keys:
            return False
        whole = all(isinstance(record[k], int) and not isinstance(record[k], bool) for k in ("step", "tokens"))
        losses = all(isinstance(record[k], float) and math.isfinite(record[k]) and record[k] >= 0
                     for k in ("validation_loss", "validation_loss_text_only"))
        return whole and losses and after < record["step"] <= completed_steps and record["tokens"] >= 1

    @property
    def last_step(self) -> int | None:
        return self.history[-1]["step"] if self.history else None

    def due(self, step: int, max_train_steps: int) -> bool:
        """Whether ``step`` is one to measure at: every ``--eval_steps``, and the last one."""
        every = self.args.eval_steps
        return self.last_step != step and ((every is not None and step % every == 0) or step >= max_train_steps)

    def sums(self, model):
        """``[fused loss sum, text-only loss sum, tokens]`` over every process's captions (float64)."""
        import torch
        import torch.nn.functional as F

        from data.masking import batch_seed

        accelerator, encoder = self.accelerator, self.encoder
        net = accelerator.unwrap_model(model)
        totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), accelerator.autocast():
                for index, batch in enumerate(self.loader):
                    batch.pop("bad_images", None)
                    ids = batch["input_ids"].to(accelerator.device)
                    mask = batch["attention_mask"].to(accelerator.device)
                    labels = batch["labels"].to(accelerator.device)
                    if self.masker is not None:
                        ids, labels = self.masker(ids, labels, batch_seed(self.args.seed, VALIDATION_SEED, index,
                                                                          accelerator.process_index))
                    patches, _ = encoder.encode_images(batch["pixel_values"].to(encoder.device, encoder.dtype))
                    hidden, _ = net.text_hidden(ids, mask)
                    fused, _, _ = net.fuse(net.project(patches), hidden, mask)
                    width = labels.shape[1] - net.label_shift
                    targets = labels[:, net.label_shift:]
                    keep = targets != -100
                    if not keep.any():
                        continue
                    wanted = targets[keep]
                    totals[0] += F.cross_entropy(net.lm_head(fused[:, :width][keep]).float(), wanted,
                                                 reduction="sum").double()
                    totals[1] += F.cross_entropy(net.lm_head(hidden[:, :width][keep]).float(), wanted,
                                                 reduction="sum").double()
                    totals[2] += keep.sum()
        finally:
            model.train(was_training)
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        return totals

    def measure(self, model, step: int) -> dict:
        """The validation losses at ``step``, logged (and sent to the trackers with ``--with_tracking``)."""
        fused, text, tokens = (float(v) for v in self.sums(model).tolist())
        if tokens == 0:
            raise InputError(f"the {self.size} validation captions hold no token to predict (all cut or empty)")
        record = {"step": step, "validation_loss": fused / tokens, "validation_loss_text_only": text / tokens,
                  "tokens": int(tokens)}
        if not all(math.isfinite(record[k]) for k in ("validation_loss", "validation_loss_text_only")):
            raise InputError(f"step {step}: the validation loss is not finite ({record['validation_loss']}, text "
                             f"only {record['validation_loss_text_only']})")
        self.history.append(record)
        logger.info("step %d: validation loss %.4f (text only %.4f) over %d tokens of %d captions", step,
                    record["validation_loss"], record["validation_loss_text_only"], record["tokens"], self.size)
        if self.args.with_tracking:
            self.accelerator.log({"validation_loss": record["validation_loss"],
                                  "validation_loss_text_only": record["validation_loss_text_only"]}, step=step)
        return record
