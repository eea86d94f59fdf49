"""Masked-language-modelling inputs for training a masked LM's fusion block (``train.py``).

Each maskable token is chosen with probability ``probability`` (``--mlm_probability``, 0.15 by
default, BERT's rate); a row where none was chosen gets one of its maskable tokens chosen at random
(short captions such as Visual Genome's phrases would otherwise often add no loss). A chosen token
becomes the mask token 80% of the time, a random token 10% of the time, and stays unchanged 10% of
the time, and is the only kind of position with a label. Special tokens ([CLS], [SEP], <s>, ...),
padding and an item's context prompt (label -100 from the collator) are never chosen. See
``docs/masked_lm.md`` for the first release's choices.

The draws come from a generator the caller seeds per batch (:func:`batch_seed`), so a batch is
masked the same way in a resumed run, on any process count, whatever else used the global RNG.
"""
from __future__ import annotations

import numpy as np
import torch

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen tokens; the rest (0.1) stay unchanged


def batch_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, epoch, batch index, process index)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class MLMMasker:
    """``masker(input_ids, labels, seed) -> (masked input_ids, MLM labels)`` for one batch.

    ``labels`` are the collator's (``-100`` on padding and context): a position is maskable when its
    label is set and its token is not special. Returned labels hold the original token at the chosen
    positions and -100 elsewhere.
    """

    def __init__(self, tokenizer, probability: float = 0.15):
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token: masked-LM training needs one")
        if not 0.0 < probability < 1.0:
            raise ValueError(f"--mlm_probability must lie strictly between 0 and 1, got {probability}")
        self.probability = probability
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def maskable(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (labels != -100) & ~torch.isin(input_ids, self.special_ids.to(input_ids.device))

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        shape = input_ids.shape
        choose, share, pick = (torch.rand(shape, generator=g) for _ in range(3))
        random_ids = torch.randint(self.vocab_size, shape, generator=g)
        device = input_ids.device
        maskable = self.maskable(input_ids, labels)
        chosen = maskable & (choose < self.probability).to(device)
        # a row with maskable tokens but none chosen: choose one of them at random
        forced = pick.to(device).masked_fill(~maskable, -1.0).argmax(1, keepdim=True)
        none = (~chosen.any(1, keepdim=True)) & maskable.any(1, keepdim=True)
        chosen = chosen | (torch.zeros_like(chosen).scatter(1, forced, True) & none)
        to_mask = chosen & (share < MASK_SHARE).to(device)
        to_random = chosen & ((share >= MASK_SHARE) & (share < MASK_SHARE + RANDOM_SHARE)).to(device)
        masked = input_ids.masked_fill(to_mask, self.mask_id)
        masked = torch.where(to_random, random_ids.to(device), masked)
        return masked, input_ids.masked_fill(~chosen, -100)
