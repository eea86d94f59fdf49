"""What an image source is: the interface through which a run gets its images, and the counters it keeps.

An image source serves one image per slot of a prompt list: image ``i`` of an item stands for the item's
prompt ``i``. Two sources implement :class:`ImageSource`:

* ``generate``: :class:`models.images.provider.ImageProvider`, a text-to-image generator behind the PNG
  cache (a prompt repeated k times gets k different images);
* ``retrieve``: :class:`models.images.retrieval.ImageRetriever`, the best images of an image index (a
  prompt repeated k times gets its k best images).

Which one a run uses is chosen by :func:`models.images.sources.build_image_source` from ``--image_source``.

Who calls what:

* the evaluation: :meth:`~ImageSource.check_k` before any model loads, :meth:`~ImageSource.bind` once the
  vision encoder is loaded, :meth:`~ImageSource.refs` per scoring batch (models/scoring/scorer.py), then the
  feature cache (models/images/features.py) :meth:`~ImageSource.images` with ``write=False`` for the
  images whose vision features it does not hold, and :meth:`~ImageSource.write_later` for each of those
  that was generated; :meth:`~ImageSource.flush` before the results are written;
* the harness adapter: :meth:`~ImageSource.prefetch` with every request's prompt lists (lm-eval hands
  them all at once), :meth:`~ImageSource.stats`;
* pre-generation and training (the wiki images): :meth:`~ImageSource.get`, :meth:`~ImageSource.stats`,
  :meth:`~ImageSource.flush`.

Counters (:meth:`ImageSource.stats`, keys :data:`SOURCE_COUNTERS`): every image slot that
:meth:`~ImageSource.get` serves counts once, under exactly one of :data:`SLOT_ORIGINS`, so ``slots =
generated + from_cache + reused``; ``pipeline_loads`` counts the text-to-image pipelines the source loaded
(0 for a source that generates nothing). :meth:`~ImageSource.refs` and :meth:`~ImageSource.images` count
nothing: their caller (the feature cache) counts the slots it serves itself, with :func:`tally`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, runtime_checkable

if TYPE_CHECKING:  # PIL loads on first use
    from PIL import Image


@dataclass(frozen=True)
class ImageRef:
    """One image slot before anything is read: its key (what the image is known by in caches), the
    prompt it stands for, and the path of its image file."""

    key: str
    prompt: str
    path: str


@dataclass(frozen=True)
class ImageRoot:
    """The folder a source's image files lie under: ``path`` (absolute) and ``kind`` (``cache``: the PNG
    cache of generated images; ``index``: the image collection an index was built from). Results name
    their images relative to it (:meth:`relative`), so a run folder moved with its cache still finds them."""

    path: str
    kind: str

    @classmethod
    def of(cls, folder: "str | os.PathLike", kind: str) -> "ImageRoot":
        return cls(os.path.abspath(os.path.expanduser(os.fspath(folder))), kind)

    def relative(self, file: "str | os.PathLike") -> str:
        """``file`` relative to the root, with POSIX separators; a ValueError if it is not under the root."""
        full = os.path.abspath(os.fspath(file))
        prefix = self.path.rstrip(os.sep) + os.sep
        if not full.startswith(prefix):
            raise ValueError(f"image {full} is not under the image {self.kind} {self.path}")
        return full[len(prefix):].replace(os.sep, "/")


@dataclass
class ServedImage:
    """One image slot with its image (what :meth:`ImageSource.get` returns)."""

    path: str
    prompt: str
    image: "Image.Image"
    key: str = ""


# Where the image of a slot came from. Every image slot of a request counts once, under exactly one of:
#   generated  - the image was generated now;
#   from_cache - the first time this run needed the image, it came from the disk (a cached PNG, an image
#                of the index, or the image's stored vision features);
#   reused     - this run already had the image (another slot of the same key, in this request or an
#                earlier one), and it was not generated again.
# So image slots = generated + from_cache + reused. Re-reading a PNG is counted apart (pngs_decoded).
SLOT_ORIGINS = ("generated", "from_cache", "reused")
SOURCE_COUNTERS = ("slots", *SLOT_ORIGINS, "pipeline_loads")


def tally(counts: dict, keys: Iterable[str], origin: dict[str, str], seen: set) -> None:
    """Count image slots (see :data:`SLOT_ORIGINS`). ``origin[key]``: ``generated``, ``from_cache`` or
    ``reused`` for how this request got the key's image; ``seen``: the keys this run had before (updated)."""
    here = set()
    for key in keys:
        counts["slots"] += 1
        if key in here:
            which = "reused"
        else:
            here.add(key)
            which = origin[key]
            if which == "from_cache" and key in seen:
                which = "reused"
            seen.add(key)
        counts[which] += 1


def check_k(k: int) -> int:
    if k < 1:
        raise ValueError("k must be >= 1 when images are requested")
    return k


@runtime_checkable
class ImageSource(Protocol):
    """Where a run's images come from (see the module docstring for who calls what)."""

    def check_k(self, k: int) -> None:
        """Raise a one-line ValueError if this source cannot serve ``k`` images per prompt list."""

    def image_root(self) -> ImageRoot:
        """The folder every image path this source hands out lies under (what results are relative to)."""

    def bind(self, encoder) -> "ImageSource":
        """Take the run's vision encoder once it is loaded (a retriever embeds prompts with it and checks
        that it built the index; a generator needs none); returns the source."""

    def refs(self, prompt_lists: list[list[str]]) -> list[list[ImageRef]]:
        """The image slots of each prompt list, without reading or generating any image. A source may
        give its refs more fields (a retrieved image's ``provenance``: its index row and score)."""

    def images(self, refs: Iterable[ImageRef], write: bool = True) -> dict:
        """``{key: (image, origin, file stat or None)}`` for the distinct keys of ``refs``; origin is
        ``memory`` (generated earlier in this run, file not written yet), ``disk`` (read from its file,
        whose stat is given) or ``generated`` (generated now). With ``write=False`` each generated image
        must be handed to :meth:`write_later`."""

    def write_later(self, key: str, image: "Image.Image", then: "Callable[[os.stat_result], None] | None" = None):
        """Write the file of a generated image behind the work, then call ``then(file stat)`` there."""

    def get(self, prompt_lists: list[list[str]]) -> list[list[ServedImage]]:
        """One image per slot of each prompt list, each distinct image read or generated once (counted in
        :meth:`stats`)."""

    def prefetch(self, prompt_lists: list[list[str]]) -> None:
        """Make the images of these prompt lists cheap to serve later (generate the missing ones into the
        cache; rank the prompts), in large batches."""

    def flush(self) -> None:
        """Wait until every file handed out so far is on disk."""

    def stats(self) -> dict[str, int]:
        """The counters :data:`SOURCE_COUNTERS` (see the module docstring)."""
