"""The fusion block ``fusion_layer``: one new layer of the LM's own architecture (docs/method.md, section 1).

The LM's *base model* class built from its config with one layer and no token embedding: a decoder block
for a causal LM (:func:`build_fusion_layer`), an encoder block without pooler for a masked LM
(:func:`build_encoder_fusion_layer`). Also the position numbering both the LM and the block use.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def hidden_size(config) -> int:
    """The model width ``d`` of a config, whatever the architecture calls it."""
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return getattr(config, name)
    raise ValueError(f"cannot tell the hidden size of a {config.model_type!r} config")


def build_fusion_layer(lm_config, keep_pad_id: bool = False) -> tuple[nn.Module, float]:
    """The LM's base-model class with one layer and no token embedding.

    Returns the module and the scale the architecture applies to its input embeddings (Gemma
    multiplies them by sqrt(d); the released Gemma fusion layer does too), which the caller applies.
    ``keep_pad_id``: keep the config's pad id, for architectures that number positions after it
    (RoBERTa); otherwise the block is built without one.
    """
    from transformers import AutoModel

    cfg = copy.deepcopy(lm_config.get_text_config() if hasattr(lm_config, "get_text_config") else lm_config)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, name):
            setattr(cfg, name, 1)
    if isinstance(getattr(cfg, "layer_types", None), (list, tuple)):
        cfg.layer_types = list(cfg.layer_types[:1])
    # A one-row embedding (then removed) instead of a vocabulary-sized one: no 525M-parameter
    # allocation for Llama-3. The pad id must fit in it.
    pad = cfg.pad_token_id if keep_pad_id else None
    cfg.vocab_size = 1 if pad is None else pad + 1
    cfg.pad_token_id = pad
    if getattr(cfg, "use_cache", None) is None:
        cfg.use_cache = True
    layer = AutoModel.from_config(cfg)
    emb = layer.get_input_embeddings()
    scale = float(getattr(emb, "scalar_embed_scale", 1.0))
    for parent in layer.modules():
        for child_name, child in list(parent.named_children()):
            if child is emb:
                setattr(parent, child_name, None)
    return layer, scale


def build_encoder_fusion_layer(lm_config) -> tuple[nn.Module, float]:
    """The encoder's base-model class with one layer, no token embedding and no pooler.

    Architectures whose token embeddings are narrower than the encoder (ALBERT, ELECTRA's
    ``embedding_size``) get a block whose embedding width is the encoder's, since ``[V ; H]`` enters
    at that width; the pad id stays, since RoBERTa numbers its positions after it."""
    cfg = copy.deepcopy(lm_config.get_text_config() if hasattr(lm_config, "get_text_config") else lm_config)
    if getattr(cfg, "embedding_size", None) is not None:
        cfg.embedding_size = hidden_size(cfg)
    layer, scale = build_fusion_layer(cfg, keep_pad_id=True)
    if getattr(layer, "pooler", None) is not None:
        layer.pooler = None
    return layer, scale


def positions_from_mask(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position ids that skip padding (left or right): valid tokens count 0, 1, 2, ..."""
    pos = mask.long().cumsum(-1) - 1
    return (pos + offset).clamp(min=0)
