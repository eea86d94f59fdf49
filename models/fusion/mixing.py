"""CLIP confidence weights and the two ways of mixing k fused predictions with the text-only one.

With text-only logits ``L0``, fused logits ``L_i`` of image i and weights ``s_i`` (docs/method.md, section 2):

* ``logits`` (what both releases compute, the default)::

      z = (1/k) * sum_i [ s_i * L_i + (1 - s_i) * L0 ]        ->  log_softmax(z)

* ``probs`` (the paper's Eq. 2 wording), with s_i clipped to [0, 1]::

      p = (1/k) * sum_i [ s_i * softmax(L_i) + (1 - s_i) * softmax(L0) ]   ->  log(p)

Both functions return log-probabilities. With k = 0 the result is ``log_softmax(L0)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads on first use: the flag parser imports MIX_MODES, and --help needs no torch
    import torch

MIX_MODES = ("logits", "probs")
UNIFORM_WEIGHT = 0.5


def clip_weights(cosine: torch.Tensor, tau: float = 2.0, uniform: bool = False) -> torch.Tensor:
    """``s_i = tau * max(0, cos_i)``, or 0.5 everywhere with ``uniform`` (LaMI's --no_clip_rescaling)."""
    import torch

    if uniform:
        return torch.full_like(cosine, UNIFORM_WEIGHT, dtype=torch.float32)
    return tau * cosine.float().clamp(min=0.0)


def mix_logprobs(text_logits: torch.Tensor, image_logits: torch.Tensor | None,
                 weights: torch.Tensor | None, mode: str = "logits") -> torch.Tensor:
    """Mix the text-only prediction with k fused ones.

    Args:
        text_logits: ``L0``, shape ``[B, ..., V]``.
        image_logits: ``L_i`` stacked as ``[B, k, ..., V]``, or None (k = 0).
        weights: ``s_i``, shape ``[B, k]``.
        mode: ``"logits"`` or ``"probs"``.
    Returns:
        log-probabilities ``[B, ..., V]`` in float32.
    """
    import torch

    if mode not in MIX_MODES:
        raise ValueError(f"unknown mix mode {mode!r}; choose one of {', '.join(MIX_MODES)}")
    l0 = text_logits.float()
    if image_logits is None or image_logits.shape[1] == 0:
        return torch.log_softmax(l0, dim=-1)
    li = image_logits.float()
    k = li.shape[1]
    w = weights.float().reshape(weights.shape[0], k, *([1] * (li.dim() - 2)))
    if mode == "logits":
        z = (w * li).mean(1) + (1.0 - w.mean(1)) * l0
        return torch.log_softmax(z, dim=-1)
    w = w.clamp(0.0, 1.0)
    terms = torch.log(w / k) + torch.log_softmax(li, dim=-1)            # [B, k, ..., V]
    text_term = torch.log(1.0 - w.mean(1)) + torch.log_softmax(l0, dim=-1)  # [B, ..., V]
    return torch.logsumexp(torch.cat([terms, text_term.unsqueeze(1)], dim=1), dim=1)


