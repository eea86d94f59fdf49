"""The generating image source: images for lists of prompts from the PNG cache, the missing ones generated.

Image i of an item uses the item's prompt i, with the prompt's occurrence number in the item's list as
key index (:func:`occurrence_indices`): a prompt repeated k times gives k different images, and a longer
list of the same prompts reuses the images of a shorter one. The key (:meth:`models.images.cache.ImageCache.key`)
fixes the image's seed (:func:`seed_for`).

New images are handed to the caller at once; their PNGs are written behind the work by a background
thread (:mod:`models.write_behind`).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import TYPE_CHECKING, Iterable

from models import write_behind
from models.images.cache import ImageCache
from models.images.generators import ImageGenerator
from models.images.source import SLOT_ORIGINS, ImageRef, ImageRoot, ServedImage, check_k, tally

if TYPE_CHECKING:  # PIL loads on first use
    from PIL import Image


def seed_for(key: str) -> int:
    """A 63-bit seed taken from the key's hex digest."""
    return int(key[:16], 16) & (2**63 - 1)


def occurrence_indices(prompts: list[str]) -> list[int]:
    """For each prompt, how many times it already occurred earlier in the list: [a, b, a, a] -> [0, 0, 1, 2]."""
    seen: Counter = Counter()
    indices = []
    for prompt in prompts:
        indices.append(seen[prompt])
        seen[prompt] += 1
    return indices


class ImageProvider:
    """Serves images for lists of prompts from the cache, generating the missing ones (the ``generate``
    :class:`models.images.source.ImageSource`).

    Identical keys (across items, templates, answer options) are looked up and generated once per call;
    slots with the same key share one PIL image object. New images are returned at once; until their
    PNGs are written they are served from memory.

    Counters (:meth:`stats`): the slots :meth:`get` served, each counted once as ``generated``,
    ``from_cache`` or ``reused`` (see :data:`models.images.source.SLOT_ORIGINS`), so they add up to
    ``slots``; and ``pipeline_loads``, the pipelines the generator loaded.
    """

    def __init__(
        self,
        generator: ImageGenerator,
        cache: ImageCache,
        *,
        image_size: int = 512,
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
        seed: int = 0,
        gen_batch_size: int = 8,
    ):
        if gen_batch_size < 1:
            raise ValueError(f"gen_batch_size must be >= 1, got {gen_batch_size}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.generator = generator
        self.cache = cache
        self.image_size = image_size
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.gen_batch_size = gen_batch_size
        self.counts = {"slots": 0, **{o: 0 for o in SLOT_ORIGINS}, "pngs_decoded": 0}
        self._keys: dict[tuple[str, int], str] = {}
        self._seen: set[str] = set()  # keys whose image this provider has served
        self._pending: dict[str, Image.Image] = {}  # generated, PNG not written yet
        self._lock = threading.Lock()

    def check_k(self, k: int) -> None:
        check_k(k)

    def image_root(self) -> ImageRoot:
        """The PNG cache: every image path handed out lies under it."""
        return ImageRoot.of(self.cache.root, "cache")

    def bind(self, encoder) -> "ImageProvider":
        """Generated images need no vision encoder (the source interface)."""
        return self

    def key(self, prompt: str, index: int) -> str:
        key = self._keys.get((prompt, index))
        if key is None:
            key = self.cache.key(
                self.generator.generator_id,
                prompt,
                index,
                self.image_size,
                self.num_inference_steps,
                self.guidance_scale,
                self.seed,
                getattr(self.generator, "key_dtype", None),
            )
            if len(self._keys) > 100_000:
                self._keys.clear()
            self._keys[(prompt, index)] = key
        return key

    def refs(self, prompt_lists: list[list[str]]) -> list[list[ImageRef]]:
        """The image slots of each prompt list, without touching the disk."""
        return [
            [ImageRef(key, prompt, self.cache.path_str(key))
             for prompt, key in ((p, self.key(p, i)) for p, i in zip(prompts, occurrence_indices(prompts)))]
            for prompts in prompt_lists
        ]

    def images(self, refs: Iterable[ImageRef], write: bool = True) -> dict:
        """``{key: (image, origin, png_stat)}`` for the distinct keys of ``refs``; origin is ``memory``
        (generated earlier, PNG still being written), ``disk`` (a valid cached PNG, whose stat is given)
        or ``generated``. With ``write=False`` the caller must hand each generated image to
        :meth:`write_later` (it stays in memory until then)."""
        out: dict = {}
        missing: dict[str, str] = {}  # key -> prompt, in first-seen order
        for ref in refs:
            if ref.key in out or ref.key in missing:
                continue
            with self._lock:
                image = self._pending.get(ref.key)
            if image is not None:
                out[ref.key] = (image, "memory", None)
                continue
            found = self.cache.read(ref.key, self.image_size)
            if found is None:
                missing[ref.key] = ref.prompt
            else:
                out[ref.key] = (found[0], "disk", found[1])
        self._generate(missing, out, write)
        return out

    def write_later(self, key: str, image: "Image.Image", then=None):
        """Write ``image``'s PNG in the background; then call ``then(png_stat)`` there (e.g. to store its
        vision features, which must not be trusted before the PNG they belong to exists)."""
        with self._lock:
            self._pending[key] = image

        def task():
            try:
                stat = self.cache.write(key, image)
            finally:
                with self._lock:
                    self._pending.pop(key, None)
            if then is not None:
                then(stat)
            return stat

        return write_behind.submit(task)

    def get(self, prompt_lists: list[list[str]]) -> list[list[ServedImage]]:
        refs = self.refs(prompt_lists)
        flat = [r for item in refs for r in item]
        found = self.images(flat)
        origin = {"memory": "reused", "disk": "from_cache", "generated": "generated"}
        self.counts["pngs_decoded"] += sum(o == "disk" for _, o, _ in found.values())
        tally(self.counts, (r.key for r in flat), {k: origin[o] for k, (_, o, _) in found.items()}, self._seen)
        return [[ServedImage(r.path, r.prompt, found[r.key][0], r.key) for r in item] for item in refs]

    def prefetch(self, prompt_lists: list[list[str]], chunk: int = 256) -> None:
        """Generate the images of the prompt lists that are not all in the cache yet, ``chunk`` lists per
        call (so that one chunk of images is held in memory); counted in :meth:`stats` as :meth:`get`."""
        missing = [prompts for prompts, refs in zip(prompt_lists, self.refs(prompt_lists))
                   if not all(os.path.isfile(r.path) for r in refs)]
        for start in range(0, len(missing), chunk):
            self.get(missing[start:start + chunk])

    def _generate(self, missing: dict[str, str], out: dict, write: bool) -> None:
        pending = list(missing.items())
        for start in range(0, len(pending), self.gen_batch_size):
            batch = pending[start : start + self.gen_batch_size]
            generated = self.generator.generate(
                [prompt for _, prompt in batch],
                [seed_for(key) for key, _ in batch],
                image_size=self.image_size,
                num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale,
            )
            if len(generated) != len(batch):
                raise RuntimeError(f"generator returned {len(generated)} images for {len(batch)} prompts")
            for (key, _), image in zip(batch, generated):
                if image.mode != "RGB":
                    image = image.convert("RGB")
                if image.size != (self.image_size, self.image_size):
                    raise RuntimeError(f"generator returned a {image.size[0]}x{image.size[1]} image for "
                                       f"image size {self.image_size}")
                out[key] = (image, "generated", None)
                if write:
                    self.write_later(key, image)
                else:
                    with self._lock:
                        self._pending[key] = image

    def flush(self) -> None:
        """Wait until every image handed out so far is on disk."""
        write_behind.flush()

    def stats(self) -> dict:
        # generators that load no pipeline (toyworld, test and benchmark stand-ins) need not say so
        loads = getattr(self.generator, "pipeline_loads", 0)
        return {**{k: self.counts[k] for k in ("slots", *SLOT_ORIGINS)}, "pipeline_loads": loads}
