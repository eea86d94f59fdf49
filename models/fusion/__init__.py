"""The late-fusion model: a frozen LM, a trained projector and one fusion block, and how its predictions mix.

One concern per module (import from them; this package imports nothing, so that the flag parser's
``from models.fusion.mixing import MIX_MODES`` loads no torch):

* :mod:`~models.fusion.factory`: ``load_late_fusion_model``, the one place that loads an LM and picks its wrapper;
* :mod:`~models.fusion.causal`: ``LateFusionLM``, the wrapper around a causal LM (training, mixing, generation);
* :mod:`~models.fusion.masked`: ``MaskedLateFusionLM``, the same around a masked LM;
* :mod:`~models.fusion.kinds`: ``model_kind``, ``check_supported``: which LMs are wrapped, as which kind (no torch);
* :mod:`~models.fusion.loading`: ``load_lm``, the frozen LM with every failure one line;
* :mod:`~models.fusion.projector`: ``VisualProjector``, CLIP patch tokens into the LM's width;
* :mod:`~models.fusion.blocks`: the fusion block built from the LM's own config, position ids;
* :mod:`~models.fusion.mixing`: CLIP weights and the ``logits`` / ``probs`` mixing rules (no torch at import);
* :mod:`~models.fusion.memo`: ``HiddenStateMemo``, the frozen LM's hidden states computed once per text.
"""
