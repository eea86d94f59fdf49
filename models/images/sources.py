"""Where a run's images come from: generated (the default) or retrieved from an image index.

The flags live here, apart from the retrieval code (:mod:`models.images.retrieval`), so that building a
parser (``--help``) imports neither numpy nor torch.
"""
from __future__ import annotations

import argparse

IMAGE_SOURCES = ("generate", "retrieve")
RETRIEVE_BY = ("clip", "caption")
DEFAULT_DEDUP = 0.95
DEFAULT_FAISS_THRESHOLD = 1_000_000


def add_retrieval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Image source flags shared by the evaluation scripts and train.py."""
    g = parser.add_argument_group("image retrieval")
    g.add_argument("--image_source", choices=IMAGE_SOURCES, default="generate",
                   help="generate images with --image_generator, or retrieve them from --image_index")
    g.add_argument("--image_index", default=None, help="an index folder (python -m models.images.index build)")
    g.add_argument("--retrieve_by", choices=RETRIEVE_BY, default="clip",
                   help="clip: CLIP text-image cosine; caption: BM25 between the prompt and the captions")
    g.add_argument("--dedup_threshold", type=float, default=DEFAULT_DEDUP,
                   help="pass over images whose CLIP cosine with an image already taken exceeds this (1: off)")
    g.add_argument("--faiss_threshold", type=int, default=DEFAULT_FAISS_THRESHOLD,
                   help="use faiss (when installed) for indexes of more images than this")
    return parser
