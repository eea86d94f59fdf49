"""Late multi-image fusion around any HuggingFace masked LM (BERT, RoBERTa, DistilBERT, ALBERT, ...).

The same model as :class:`models.fusion.causal.LateFusionLM`, with an encoder where the causal side has a
decoder (chosen by :func:`models.fusion.kinds.model_kind`; :func:`models.fusion.factory.load_late_fusion_model`
builds this class for a masked LM):

* ``lm``: the frozen ``AutoModelForMaskedLM``. Its encoder (the base model) gives the final hidden
  states ``H``, the input of its MLM head; ``L0 = head(H)`` is exactly the model's fill-mask logits.
* ``mm_proj``: as on the causal side (4d wide for BERT by default, like the first release).
* ``fusion_layer``: the encoder's own base-model class with one layer, no token embedding and no
  pooler (:func:`models.fusion.blocks.build_encoder_fusion_layer`). It attends bidirectionally over
  ``[V ; H]`` (visual prefix first, padded text masked) and numbers the positions itself from the first
  visual token, as its architecture does (BERT: 0, 1, ... with token type 0; RoBERTa: from its
  pad id + 1). For BERT its keys are the first release's: ``embeddings.position_embeddings``,
  ``embeddings.token_type_embeddings``, ``embeddings.LayerNorm`` and ``encoder.layer.0.*``.
  Architectures whose token embeddings are narrower than the encoder (ALBERT, ELECTRA's
  ``embedding_size``) get a block whose embedding width is the encoder's, since ``[V ; H]`` enters at
  that width.
* The frozen MLM head (whatever the architecture calls it: ``cls``, ``lm_head``, ``predictions``, or
  DistilBERT's four modules) reads the fused states at the text positions.

Training: cross-entropy of the fused logits at the masked text positions (labels are not shifted).
Inference: :meth:`mixed_logprobs` as on the causal side, at the mask positions; there is no generation.
"""
from __future__ import annotations

import torch
from torch import nn

from models.fusion.blocks import build_encoder_fusion_layer
from models.fusion.causal import LateFusionLM


class _GivenStates(nn.Module):
    """Stands in for a masked LM's encoder during one call of the LM's forward: it returns the given
    states, so the forward applies exactly the LM's own MLM head to them. Attributes the forward reads
    from its encoder (e.g. DeBERTa's embeddings) come from the real one."""

    def __init__(self, encoder: nn.Module, states: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "_encoder", encoder)  # not registered as a submodule
        object.__setattr__(self, "_states", states)

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput
        return BaseModelOutput(last_hidden_state=self._states)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_encoder"), name)


class MaskedLateFusionLM(LateFusionLM):
    """A frozen masked LM plus a trained projector and one fusion block (see the module docstring)."""

    kind = "masked"
    label_shift = 0  # a masked LM predicts the token at each masked position
    build_fusion = staticmethod(build_encoder_fusion_layer)

    @property
    def max_positions(self) -> int | None:
        """How many tokens the encoder (and so the fusion block, visual prefix included) can number."""
        cfg = self.lm.config
        limit = getattr(cfg, "max_position_embeddings", None)
        offset = getattr(getattr(self.lm.base_model, "embeddings", None), "padding_idx", None)
        return None if limit is None else limit - (offset + 1 if isinstance(offset, int) else 0)

    # ------------------------------------------------------------------ pieces
    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM's own frozen MLM head on states of any leading shape ``[..., d]``."""
        prefix = self.lm.base_model_prefix
        encoder = self.lm._modules[prefix]
        states = hidden.to(self.lm.dtype).reshape(1, -1, hidden.shape[-1])
        self.lm._modules[prefix] = _GivenStates(encoder, states)
        try:
            logits = self.lm(inputs_embeds=states).logits
        finally:
            self.lm._modules[prefix] = encoder
        return logits.reshape(*hidden.shape[:-1], logits.shape[-1])

    def text_hidden(self, input_ids, attention_mask, cache=None, position_ids=None, use_cache=False):
        """One pass of the frozen encoder, as the masked LM runs it: its final hidden states."""
        if cache is not None or use_cache or position_ids is not None:
            raise ValueError("a masked LM takes neither a cache nor position ids (it numbers its positions itself)")
        self.calls["lm"] += 1
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, None

    def fuse(self, visual: torch.Tensor | None, hidden: torch.Tensor, attention_mask: torch.Tensor,
             cache=None, past_mask: torch.Tensor | None = None):
        """Run the fusion block over ``[visual ; hidden]`` (both directions) and return its outputs at the
        text positions, no cache and the mask of the whole sequence."""
        if visual is None or cache is not None or past_mask is not None:
            raise ValueError("the masked fusion block takes the whole sequence at once: a visual prefix, no cache")
        self.calls["fusion"] += 1
        hidden = hidden.to(self.fusion_dtype)
        seq = torch.cat([visual.to(hidden.dtype), hidden], dim=1)
        mask = torch.cat([attention_mask.new_ones(visual.shape[:2]), attention_mask], dim=1)
        limit = self.max_positions
        if limit is not None and seq.shape[1] > limit:
            raise ValueError(f"{visual.shape[1]} visual + {hidden.shape[1]} text tokens exceed the "
                             f"{limit} positions of the {self.model_type} fusion block")
        if self.fusion_input_scale != 1.0:
            seq = seq * torch.tensor(self.fusion_input_scale, dtype=seq.dtype)
        out = self.fusion_layer(inputs_embeds=seq, attention_mask=mask)
        return out.last_hidden_state[:, visual.shape[1]:], None, mask

    def generate(self, *args, **kwargs):
        raise ValueError("generation needs a causal LM; a masked LM fills masks (see models.scoring.masked)")
