"""``--image_source generate``: a text-to-image generator (``--image_generator``) behind the PNG cache."""
from __future__ import annotations

from models.images.sources import SourceSpec


def build(args, device, *, dtype=None, encoder=None):
    """An :class:`~models.images.provider.ImageProvider` from the generation flags; the cache folder is
    created, the generator checked, nothing loaded (a pipeline loads on its first image)."""
    from models.images import generators  # looked up when called: benchmarks swap build_generator
    from models.images.cache import ImageCache
    from models.images.provider import ImageProvider

    knobs = {"vae": getattr(args, "vae", None), "channels_last": getattr(args, "channels_last", False),
             "compile": getattr(args, "compile", False)}
    generator = generators.build_generator(args.image_generator, device=device, dtype=dtype,
                                           noise=args.toyworld_noise, **knobs)
    return ImageProvider(generator, ImageCache(args.image_cache), image_size=args.image_size,
                         num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                         seed=args.seed, gen_batch_size=args.gen_batch_size)


SOURCE = SourceSpec("generate", "generate images with --image_generator, cached by key under --image_cache", build)
