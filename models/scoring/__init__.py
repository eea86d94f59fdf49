"""Loading a late-fusion model for scoring, and scoring with it (one file per concern):

* ``runtime.py``: :class:`ModelRuntime`, the one way a model is loaded from settings (trained weights, image
  source, vision encoder, tokenizer, frozen LM) and the token/feature helpers every scorer uses;
* ``scorer.py``: :class:`Scorer`, the scoring primitives (candidates, continuations, generation);
* ``masked.py``: :class:`MaskedScorer`, fill-mask scoring for masked LMs.

The eval scripts (``eval_scripts/runtime.py``, ``scoring.py``) and the Python API (:mod:`models.pipeline`)
are both built on these.
"""
