"""Which LMs late fusion wraps, and as which kind: the one place that decides what the wrapper accepts.

:func:`model_kind` reads a config (``"causal"`` or ``"masked"``); :func:`check_supported` turns a config it
cannot wrap into one :class:`UnsupportedModelError` line before any weight is read. Importing this module
imports no torch (transformers loads when a config is read).
"""
from __future__ import annotations

SUPPORTED_MODELS = ("a causal LM (AutoModelForCausalLM: GPT-2, Llama, Gemma, OPT, Qwen2, ...) or a masked LM "
                    "with its MLM head (AutoModelForMaskedLM: BERT, RoBERTa, DistilBERT, ALBERT, ...)")


class UnsupportedModelError(ValueError):
    """The model given as the frozen LM is neither a causal LM nor a masked LM with its MLM head."""


def model_kind(config) -> str:
    """``"causal"`` or ``"masked"``: which kind of LM a config describes, i.e. which wrapper it gets.

    Decided by ``config.architectures`` (the head class the checkpoint was saved with) when it names a
    causal-LM or masked-LM class (or a masked-LM type's ``...ForPreTraining``, which holds an MLM head),
    else by ``config.model_type``: a type the masked Auto class does not know is causal (the causal Auto
    class then loads it or says why not); a type both know (BERT's ``BertLMHeadModel``) is causal only
    with ``is_decoder``. An encoder-decoder model, or a masked-LM type saved without its MLM head
    (``BertModel``, ``...ForSequenceClassification``), is a ValueError naming what is supported.
    """
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    mtype = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{mtype!r} is an encoder-decoder model, which late fusion does not support; "
                         f"use {SUPPORTED_MODELS}")
    causal, masked = mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, mtype in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
        if (arch in MODEL_FOR_MASKED_LM_MAPPING_NAMES.values() or arch.endswith("ForMaskedLM")
                or (masked and arch.endswith("ForPreTraining"))):
            return "masked"
    if not masked:
        return "causal"
    if not archs:
        return "causal" if causal and getattr(config, "is_decoder", False) else "masked"
    what = f"{mtype!r} ({', '.join(archs)})" if archs else repr(mtype)
    raise ValueError(f"{what} is neither a causal LM nor a masked LM with its MLM head (an encoder without "
                     f"an MLM head?); late fusion supports {SUPPORTED_MODELS}")


def check_supported(config, name: str = "the model") -> str:
    """The kind of LM a config describes (:func:`model_kind`), or one line saying why late fusion cannot
    wrap it, before any weight is read. This and :func:`model_kind` are the one place that decides what
    the wrapper accepts: a causal LM needs a causal-LM class for its ``model_type`` (or remote code that
    declares one); a masked LM needs its MLM head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None) or "unknown"
    try:
        kind = model_kind(config)
    except ValueError as e:
        raise UnsupportedModelError(f"{name}: {e}") from None
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if kind == "causal" and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise UnsupportedModelError(f"{name} is not a causal LM (model_type {model_type!r}); late fusion "
                                    f"supports {SUPPORTED_MODELS}")
    return kind
