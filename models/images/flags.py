"""The command-line flags of the image sources: generation (shared by pre-generation, the evaluation scripts
and train.py) and retrieval (the evaluation scripts and train.py), with their range checks.

Apart from the image code, so that building a parser (``--help``) imports neither numpy nor torch.
"""
from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from models.images.generators import DEFAULT_GENERATOR
from models.images.sources import image_source_names

if TYPE_CHECKING:
    import torch

RETRIEVE_BY = ("clip", "caption")
DEFAULT_DEDUP = 0.95
DEFAULT_FAISS_THRESHOLD = 1_000_000


def add_generation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Image generation flags shared by the pre-generation, evaluation and training scripts."""
    group = parser.add_argument_group("image generation")
    group.add_argument(
        "--image_generator",
        default=DEFAULT_GENERATOR,
        help="diffusers text-to-image pipeline (hub id or local dir), or 'toyworld' for the embedded offline world",
    )
    group.add_argument("--image_cache", default="output/image_cache", help="directory of the content-addressed PNG cache")
    group.add_argument("--image_size", type=int, default=512)
    group.add_argument("--num_inference_steps", type=int, default=1)
    group.add_argument("--guidance_scale", type=float, default=0.0)
    group.add_argument("--gen_batch_size", type=int, default=8, help="images generated per pipeline call")
    group.add_argument("--toyworld_noise", type=float, default=0.3, help="error rate of the toyworld generator")
    return parser


def check_generation_args(args: argparse.Namespace) -> None:
    """One-line ValueError for a generation flag of :func:`add_generation_args` out of range."""
    for name in ("image_size", "num_inference_steps", "gen_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not math.isfinite(args.guidance_scale) or args.guidance_scale < 0:
        raise ValueError(f"--guidance_scale must be a finite number >= 0, got {args.guidance_scale}")
    if not 0.0 <= args.toyworld_noise <= 1.0:  # also false for NaN
        raise ValueError(f"--toyworld_noise must be between 0 and 1, got {args.toyworld_noise}")


def check_device(spec: "str | None") -> "torch.device | None":
    """``--device`` as a torch.device (None: the default), or one-line ValueError when unknown or absent."""
    if spec is None:
        return None
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec!r}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise ValueError(f"--device {spec!r}: not supported here (use cpu, cuda or cuda:N)")
    return device


def add_retrieval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Image source flags shared by the evaluation scripts and train.py."""
    g = parser.add_argument_group("image retrieval")
    g.add_argument("--image_source", choices=image_source_names(), default="generate",
                   help="generate images with --image_generator, or retrieve them from --image_index")
    g.add_argument("--image_index", default=None, help="an index folder (python -m models.images.index build)")
    g.add_argument("--retrieve_by", choices=RETRIEVE_BY, default="clip",
                   help="clip: CLIP text-image cosine; caption: BM25 between the prompt and the captions")
    g.add_argument("--dedup_threshold", type=float, default=DEFAULT_DEDUP,
                   help="pass over images whose CLIP cosine with an image already taken exceeds this (1: off)")
    g.add_argument("--faiss_threshold", type=int, default=DEFAULT_FAISS_THRESHOLD,
                   help="use faiss (when installed) for indexes of more images than this")
    return parser
