"""The visual projector ``mm_proj``: CLIP patch tokens into the LM's hidden width (docs/method.md, section 1).

``Linear(d_clip -> m) -> GELU -> Linear(m -> d)``, trained; its width ``m`` defaults to what the released
vLMIG checkpoints use, so they load into it.
"""
from __future__ import annotations

from torch import nn

# vLMIG used a 4d-wide projector for GPT-2 (and BERT) and a d-wide one for the rest.
_WIDE_PROJECTOR_TYPES = {"gpt2", "bert"}


def default_proj_hidden(model_type: str, hidden_size: int) -> int:
    """Projector width that matches the released vLMIG checkpoints."""
    return 4 * hidden_size if model_type in _WIDE_PROJECTOR_TYPES else hidden_size


class VisualProjector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.linear2 = nn.Linear(hidden, out_dim)

    def forward(self, x):
        return self.linear2(self.act(self.linear1(x)))
