"""Images: where a run's images come from, and what the vision encoder made of them.

* ``source.py``: the :class:`~models.images.source.ImageSource` protocol (what the evaluation, the feature
  cache, pre-generation and training call) and its slot counters;
* ``sources/``: one module per image source (``generate``, ``retrieve``), found by a scan;
  :func:`~models.images.sources.build_image_source` builds the one the flags name;
* ``provider.py`` (the generating source), over ``generators.py`` (text-to-image generators, the
  generation dtype) and ``cache.py`` (the content-addressed PNG cache);
* ``retrieval.py`` (the retrieving source), over ``index.py`` (a CLIP index of an image collection, and
  its ``python -m models.images.index build`` command);
* ``features.py``: the vision-feature cache (patch tokens and CLIP embeddings per image, on disk);
* ``toyworld.py``: the embedded offline world of ``make demo`` (its generator and data files);
* ``pregenerate.py``: ``python -m models.images.pregenerate``, the images of a prompts file into the cache;
* ``device.py``: the image tools' ``--device`` check (their options are declared in :mod:`models.options.catalog`).
"""
