"""Text-to-image generators and the content-addressed image cache.

An image is a pure function of its key: (generator id, prompt, occurrence index of
the prompt within an item's prompt list, image size, steps, guidance scale, base
seed, generation dtype). The key fixes the seed of the image's own ``torch.Generator``,
so images can be cached on disk and shared across prompt templates, answer options,
benchmarks and reruns, and a batch gives the same image as generating one by one.

The generation dtype is part of the key because fp16 and fp32 pipelines draw different
images. ``fp16`` (what ``--dtype auto`` gives on CUDA, where caches are filled) is the
default and is left out of the key, so keys made before the dtype was added keep their
meaning; ``fp32`` and ``bf16`` images get keys of their own. Generators without a dtype
(``toyworld``) leave it out too.

Trust: a cached PNG is used only if it decodes, is RGB and has the key's size; anything
else is logged and regenerated. Writes are atomic (:mod:`models.write_behind`): new
images are handed to the caller at once and written by a background thread.

Pre-generate the images of a prompts file (one text per line)::

    python -m models.images.generation --prompts_file texts.txt --image_prompt sentences --k 6
    accelerate launch -m models.images.generation --prompts_file texts.txt ...   # sharded over GPUs
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from models import write_behind

if TYPE_CHECKING:  # torch and PIL load on first use: ``--help`` and text-only runs never need them
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_GENERATOR = "stabilityai/sdxl-turbo"
DTYPE_NAMES = ("fp16", "bf16", "fp32")
DEFAULT_KEY_DTYPE = "fp16"  # left out of image keys (see the module docstring)

PIPELINE_LOADS = 0  # number of diffusers pipelines loaded by this process (tests count it)
_PIPELINES: dict[tuple, object] = {}  # (generator id, device, dtype) -> loaded pipeline, shared process-wide


def __getattr__(name: str):
    if name == "DTYPES":  # {name: torch dtype}, built when first asked for
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_device() -> "torch.device":
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: "str | torch.dtype | None", device: "str | torch.device") -> "torch.dtype":
    """'auto'/None -> fp16 on CUDA, fp32 elsewhere; 'fp16', 'bf16', 'fp32' or a torch.dtype as given."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, {', '.join(DTYPE_NAMES)}")
    return getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype])


def dtype_name(dtype: "torch.dtype") -> str:
    """torch.float16 -> 'fp16' (the names of ``--dtype``)."""
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(str(dtype), str(dtype))


class ImageGenerator:
    """Interface of a text-to-image generator.

    ``generator_id`` is a stable string that names the generator in cache keys; ``key_dtype`` the
    dtype its images depend on ('fp16', 'bf16', 'fp32'), or None when they depend on none.
    ``generate`` returns one RGB ``image_size`` x ``image_size`` image per (prompt, seed);
    each image depends only on its own prompt and seed, never on the rest of the batch.
    """

    generator_id: str
    key_dtype: "str | None" = None

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        image_size: int,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> "list[Image.Image]":
        raise NotImplementedError


class DiffusersGenerator(ImageGenerator):
    """A diffusers text-to-image pipeline (SDXL-Turbo by default), from a hub id or a local directory.

    The pipeline is loaded on the first ``generate`` call and then shared by every
    generator of this process with the same id, device and dtype.
    """

    def __init__(self, model_id: str = DEFAULT_GENERATOR, device=None, dtype=None):
        import torch

        self.model_id = str(model_id)
        path = Path(self.model_id).expanduser()
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ValueError(f"image generator {self.model_id!r}: directory has no model_index.json")
            self.generator_id = str(path.resolve())
        else:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.model_id)
            except HFValidationError:
                raise ValueError(
                    f"image generator {self.model_id!r}: no such directory, and not a hub model id"
                ) from None
            self.generator_id = self.model_id
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.key_dtype = dtype_name(self.dtype)
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            key = (self.generator_id, str(self.device), self.dtype)
            if key not in _PIPELINES:
                _PIPELINES[key] = _load_pipeline(self.model_id, self.device, self.dtype)
            self._pipe = _PIPELINES[key]
        return self._pipe

    def generate(self, prompts, seeds, *, image_size, num_inference_steps, guidance_scale):
        import torch

        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return []
        # CPU generators: the initial noise is the same on every device and for every batch layout.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        output = self._pipeline()(
            prompt=list(prompts),
            height=image_size,
            width=image_size,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
        )
        return [image.convert("RGB") for image in output.images]


def _load_pipeline(model_id: str, device: "torch.device", dtype: "torch.dtype"):
    global PIPELINE_LOADS
    with warnings.catch_warnings():
        # importing the auto pipelines imports every pipeline module; one of them (Kolors) calls the
        # deprecated torch.jit.script at import time. Not ours to fix, and not worth a line in every log.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        from diffusers import AutoPipelineForText2Image
        from diffusers.utils import logging as diffusers_logging

    if not sys.stderr.isatty():  # progress bars only on a terminal
        diffusers_logging.disable_progress_bar()
    PIPELINE_LOADS += 1
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(model_id, dtype=dtype)
    except (OSError, ValueError, KeyError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load text-to-image pipeline {model_id!r}: {reason}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def build_generator(spec: str, *, device=None, dtype=None, noise: float = 0.3) -> ImageGenerator:
    """'toyworld' -> the embedded offline world's generator; anything else -> a diffusers pipeline id or dir.

    Nothing heavy is loaded here: a diffusers pipeline loads on its first ``generate``.
    """
    if spec == "toyworld":
        from models.images.toyworld import ToyWorldGenerator

        return ToyWorldGenerator(noise=noise)
    return DiffusersGenerator(spec, device=device, dtype=dtype)


class ImageCache:
    """PNG files addressed by the sha256 of their key, under ``root/<first two hex digits>/``.

    On construction the temporary files that killed writers left behind (older than
    :data:`models.write_behind.STALE_TEMP_S`) are removed in the background.
    """

    def __init__(self, root: "str | os.PathLike"):
        self.root = Path(root).expanduser()
        self._root = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ValueError(f"image cache directory {self.root} is not writable: {err.strerror or err}") from None
        write_behind.submit(self.remove_stale_temps)

    def remove_stale_temps(self, older_than_s: float = write_behind.STALE_TEMP_S) -> int:
        """Remove this cache's old temporary files (``.<key>-*.tmp`` in the shard folders, ``.probe-*``)."""
        shards = [e.path for e in os.scandir(self.root) if e.is_dir() and len(e.name) == 2]
        return (write_behind.remove_stale_temps(shards, older_than_s)
                + write_behind.remove_stale_temps([self.root], older_than_s, _PROBE_NAME))

    @staticmethod
    def key(
        generator_id: str,
        prompt: str,
        index: int,
        image_size: int,
        num_inference_steps: int,
        guidance_scale: float,
        seed: int,
        dtype: "str | None" = None,
    ) -> str:
        fields = {
            "generator": str(generator_id),
            "prompt": str(prompt),
            "index": int(index),
            "image_size": int(image_size),
            "num_inference_steps": int(num_inference_steps),
            "guidance_scale": float(guidance_scale),
            "seed": int(seed),
        }
        if dtype not in (None, DEFAULT_KEY_DTYPE):
            fields["dtype"] = str(dtype)
        canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def path_str(self, key: str) -> str:
        return os.path.join(self._root, key[:2], f"{key}.png")

    def read(self, key: str, image_size: "int | None" = None) -> "tuple[Image.Image, os.stat_result] | None":
        """The cached RGB image and its file's stat, or None when absent, unreadable, not RGB or not
        ``image_size`` square (a wrong file is logged and treated as missing, so it is regenerated)."""
        from PIL import Image

        path = self.path_str(key)
        try:
            stat = os.stat(path)
        except OSError:
            return None
        try:
            with Image.open(path) as image:
                image.verify()  # checksums; the image must be reopened afterwards
            with Image.open(path) as image:
                image.load()
                if image.mode != "RGB" or (image_size is not None and image.size != (image_size, image_size)):
                    want = f"RGB {image_size}x{image_size}" if image_size is not None else "RGB"
                    logger.warning("image cache: %s is %s %dx%d, not %s; regenerating it",
                                   path, image.mode, *image.size, want)
                    return None
                return image.copy(), stat
        except Exception as err:  # PIL signals broken files with OSError, SyntaxError, struct.error, ...
            logger.warning("image cache: cannot read %s (%s); treating it as missing", path, err)
            return None

    def get(self, key: str, image_size: "int | None" = None) -> "Image.Image | None":
        """The cached RGB image, or None (see :meth:`read`)."""
        found = self.read(key, image_size)
        return None if found is None else found[0]

    @staticmethod
    def encode(image: "Image.Image") -> bytes:
        """PNG bytes. zlib's run-length strategy on PNG-filtered rows: for 512 px images it encodes in about
        2/3 of the time of level 1's default strategy and the files are 5-10% smaller (level 6: 2-4x slower,
        2-4% smaller)."""
        buf = io.BytesIO()
        # save() keeps its settings on the image object while it runs: a copy lets writer threads encode an
        # image that is also being read elsewhere (or one object shared by several keys)
        image.copy().save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
        return buf.getvalue()

    def write(self, key: str, image: "Image.Image") -> os.stat_result:
        """Encode and store ``image`` atomically (runs in a writer thread); returns the file's stat."""
        return write_behind.write_atomic(self.path(key), self.encode(image))

    def put(self, key: str, image: "Image.Image") -> Path:
        """Store ``image`` now (synchronously); returns its path."""
        self.write(key, image)
        return self.path(key)


_PROBE_NAME = re.compile(r"^\.probe-[0-9a-z_]{8}$")


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


def check_k(k: int) -> int:
    if k < 1:
        raise ValueError("k must be >= 1 when images are requested")
    return k


@dataclass(frozen=True)
class ImageRef:
    """One image slot before anything is read: its cache key, the prompt it stands for, its PNG path."""

    key: str
    prompt: str
    path: str


@dataclass
class GeneratedImage:
    path: str
    prompt: str
    image: "Image.Image"
    key: str = ""


# Where the image of a slot came from. Every image slot of a request counts once, under exactly one of:
#   generated  - the image was generated now;
#   from_cache - the first time this run needed the image, it came from the disk cache (a PNG or its
#                stored vision features);
#   reused     - this run already had the image (another slot of the same key, in this request or an
#                earlier one), and it was not generated again.
# So image slots = generated + from_cache + reused. Re-reading a PNG is counted apart (pngs_decoded).
SLOT_ORIGINS = ("generated", "from_cache", "reused")


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


class ImageProvider:
    """Serves images for lists of prompts from the cache, generating the missing ones.

    Image i of an item uses the item's prompt i, with the prompt's occurrence number in the
    item's list as key index: a prompt repeated k times gives k different images, and a
    longer list of the same prompts reuses the images of a shorter one. Identical keys
    (across items, templates, answer options) are looked up and generated once per call;
    slots with the same key share one PIL image object.

    New images are returned at once; their PNGs are written behind the work
    (:mod:`models.write_behind`). Until then they are served from memory.

    Counters of :meth:`get` (:meth:`stats`): ``slots`` requested, each counted once as ``generated``,
    ``from_cache`` or ``reused`` (see :data:`SLOT_ORIGINS`), so they add up to ``slots``. The attribute
    ``generated`` counts every image generated, for :meth:`get` and for callers of :meth:`images`.
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
        self.generated = 0  # distinct images generated by this provider, for every caller
        self._keys: dict[tuple[str, int], str] = {}
        self._seen: set[str] = set()  # keys whose image this provider has served
        self._pending: dict[str, Image.Image] = {}  # generated, PNG not written yet
        self._lock = threading.Lock()

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

    def get(self, prompt_lists: list[list[str]]) -> list[list[GeneratedImage]]:
        refs = self.refs(prompt_lists)
        flat = [r for item in refs for r in item]
        found = self.images(flat)
        origin = {"memory": "reused", "disk": "from_cache", "generated": "generated"}
        self.counts["pngs_decoded"] += sum(o == "disk" for _, o, _ in found.values())
        tally(self.counts, (r.key for r in flat), {k: origin[o] for k, (_, o, _) in found.items()}, self._seen)
        return [[GeneratedImage(r.path, r.prompt, found[r.key][0], r.key) for r in item] for item in refs]

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
            self.generated += len(batch)

    def flush(self) -> None:
        """Wait until every image handed out so far is on disk."""
        write_behind.flush()

    def stats(self) -> dict:
        return {k: self.counts[k] for k in ("slots", *SLOT_ORIGINS)}


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


def read_texts(path: "str | os.PathLike") -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped; one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    from data.prompts import STRATEGIES
    from models.cli import OneLineArgumentParser, positive_int

    parser = OneLineArgumentParser(description="Pre-generate the images of a prompts file into the image cache.")
    parser.add_argument("--prompts_file", required=True, help="one text per line")
    parser.add_argument("--image_prompt", choices=STRATEGIES, default="sentences")
    parser.add_argument("--k", type=int, default=6, help="images per text")
    parser.add_argument("--last_n_words", type=positive_int, default=70,
                        help="length of the last prompt of 'sentences'")
    add_generation_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="base seed, part of every image key")
    parser.add_argument("--device", default=None, help="default: this process's accelerator device")
    parser.add_argument("--dtype", choices=("auto", *DTYPE_NAMES), default="auto")
    return parser


def main(argv: "list[str] | None" = None) -> dict:
    """Pre-generate; bad input is one ``error:`` line and exit status 2, with nothing generated."""
    from models.cli import report_error

    args = build_parser().parse_args(argv)
    try:
        return pregenerate(args)
    except (ValueError, OSError) as err:
        report_error(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise SystemExit(2) from None


def pregenerate(args: argparse.Namespace) -> dict:
    """Fill the cache with the images of every text of ``args.prompts_file``, each process taking its share."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from data.prompts import derive_prompts

    check_k(args.k)
    check_generation_args(args)
    device = check_device(args.device)
    texts = read_texts(args.prompts_file)
    if not texts:
        raise ValueError(f"prompts file {args.prompts_file} holds no text")
    state = PartialState()
    generator = build_generator(
        args.image_generator, device=device or state.device, dtype=args.dtype, noise=args.toyworld_noise
    )
    cache = ImageCache(args.image_cache)  # created only once every input is known to be good
    shard = texts[state.process_index :: state.num_processes]
    provider = ImageProvider(
        generator,
        cache,
        image_size=args.image_size,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        gen_batch_size=args.gen_batch_size,
    )
    chunk = 8 * args.gen_batch_size  # texts per call, so that only one chunk of images is held in memory
    # progress bars only on a terminal (disable=None), and only on the first process of each machine
    with tqdm(total=len(shard), unit="text", disable=None if state.is_local_main_process else True) as bar:
        for start in range(0, len(shard), chunk):
            texts_chunk = shard[start : start + chunk]
            provider.get(
                [derive_prompts(t, args.k, args.image_prompt, last_n_words=args.last_n_words, question=t) for t in texts_chunk]
            )
            bar.update(len(texts_chunk))
            bar.set_postfix(provider.stats())
    provider.flush()
    where = f"process {state.process_index}/{state.num_processes}: " if state.num_processes > 1 else ""
    stats = provider.stats()
    print(
        f"{where}{len(shard)} texts, {stats['slots']} image slots: {stats['generated']} generated, "
        f"{stats['from_cache']} from the cache, {stats['reused']} reused -> {provider.cache.root}"
    )
    state.wait_for_everyone()
    return stats


if __name__ == "__main__":
    main()
