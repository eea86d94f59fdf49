"""Memoised hidden states of the frozen LM, so that a text it has seen is not run through it again."""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from models.fusion.causal import LateFusionLM


class HiddenStateMemo:
    """The frozen LM's final hidden states per token sequence, computed once and reused.

    Training and evaluation often run the frozen LM over the same texts again (repeated captions,
    the same prompts at several k). ``memo(model, input_ids, attention_mask)`` returns the hidden
    states of a RIGHT-padded batch, running the LM only on the rows it has not seen (as one
    sub-batch). Entries are evicted oldest-first beyond ``limit_bytes``. ``key`` separates models.
    """

    def __init__(self, limit_bytes: int = 512 * 2**20):
        self.limit_bytes = limit_bytes
        self.rows: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def clear(self) -> None:
        self.rows.clear()
        self.bytes = 0

    @torch.no_grad()
    def __call__(self, model: "LateFusionLM", input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 key=None) -> torch.Tensor:
        lengths = attention_mask.sum(-1).tolist()
        keys = [(key, tuple(row[:n].tolist())) for row, n in zip(input_ids, lengths)]
        missing = list(OrderedDict.fromkeys(k for k in keys if k not in self.rows))
        if missing:
            width = max(len(k[1]) for k in missing)
            ids = input_ids.new_zeros(len(missing), width)
            mask = attention_mask.new_zeros(len(missing), width)
            for i, k in enumerate(missing):
                ids[i, :len(k[1])] = torch.tensor(k[1], dtype=ids.dtype)
                mask[i, :len(k[1])] = 1
            hidden, _ = model.text_hidden(ids, mask)
            for row, k in zip(hidden, missing):
                self.rows[k] = row[:len(k[1])].clone()
                self.bytes += self.rows[k].numel() * self.rows[k].element_size()
        out = self.rows[keys[0]].new_zeros(*input_ids.shape, self.rows[keys[0]].shape[-1])
        for i, k in enumerate(keys):
            self.rows.move_to_end(k)
            out[i, :len(k[1])] = self.rows[k]
        while self.bytes > self.limit_bytes and len(self.rows) > len(keys):
            _, old = self.rows.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        return out
