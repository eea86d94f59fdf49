"""``--image_source retrieve``: the best images of an image index (``--image_index``) for each prompt."""
from __future__ import annotations

from models.images.sources import SourceSpec


def build(args, device, *, dtype=None, encoder=None):
    """An :class:`~models.images.retrieval.ImageRetriever` over ``--image_index`` (opened and checked
    now); without ``encoder`` it ranks nothing until one is bound. The generation dtype does not apply."""
    from models.images.retrieval import build_retriever

    return build_retriever(args, encoder, device=device)


SOURCE = SourceSpec("retrieve", "retrieve the best images of --image_index (--retrieve_by clip or caption)", build)
