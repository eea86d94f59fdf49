"""Text-to-image generators and the content-addressed image cache.

An image is a pure function of its key: (generator id, prompt, occurrence index of
the prompt within an item's prompt list, image size, steps, guidance scale, base
seed). The key fixes the seed of the image's own ``torch.Generator``, so images can
be cached on disk and shared across prompt templates, answer options, benchmarks
and reruns, and a batch gives the same image as generating one by one.

Pre-generate the images of a prompts file (one text per line)::

    python -m models.image_generation --prompts_file texts.txt --image_prompt sentences --k 6
    accelerate launch -m models.image_generation --prompts_file texts.txt ...   # sharded over GPUs
"""

import argparse
import hashlib
import json
import logging
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_GENERATOR = "stabilityai/sdxl-turbo"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

PIPELINE_LOADS = 0  # number of diffusers pipelines loaded by this process (tests count it)
_PIPELINES: dict[tuple, object] = {}  # (generator id, device, dtype) -> loaded pipeline, shared process-wide


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: "str | torch.dtype | None", device: "str | torch.device") -> torch.dtype:
    """'auto'/None -> fp16 on CUDA, fp32 elsewhere; 'fp16', 'bf16', 'fp32' or a torch.dtype as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class ImageGenerator:
    """Interface of a text-to-image generator.

    ``generator_id`` is a stable string that names the generator in cache keys.
    ``generate`` returns one RGB ``image_size`` x ``image_size`` image per (prompt, seed);
    each image depends only on its own prompt and seed, never on the rest of the batch.
    """

    generator_id: str

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        image_size: int,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> list[Image.Image]:
        raise NotImplementedError


class DiffusersGenerator(ImageGenerator):
    """A diffusers text-to-image pipeline (SDXL-Turbo by default), from a hub id or a local directory.

    The pipeline is loaded on the first ``generate`` call and then shared by every
    generator of this process with the same id, device and dtype.
    """

    def __init__(self, model_id: str = DEFAULT_GENERATOR, device=None, dtype=None):
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
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            key = (self.generator_id, str(self.device), self.dtype)
            if key not in _PIPELINES:
                _PIPELINES[key] = _load_pipeline(self.model_id, self.device, self.dtype)
            self._pipe = _PIPELINES[key]
        return self._pipe

    def generate(self, prompts, seeds, *, image_size, num_inference_steps, guidance_scale):
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


def _load_pipeline(model_id: str, device: torch.device, dtype: torch.dtype):
    global PIPELINE_LOADS
    from diffusers import AutoPipelineForText2Image

    PIPELINE_LOADS += 1
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(model_id, torch_dtype=dtype)
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
        from data.toyworld import ToyWorldGenerator

        return ToyWorldGenerator(noise=noise)
    return DiffusersGenerator(spec, device=device, dtype=dtype)


class ImageCache:
    """PNG files addressed by the sha256 of their key, under ``root/<first two hex digits>/``."""

    def __init__(self, root: "str | os.PathLike"):
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise ValueError(f"image cache directory {self.root} is not writable: {err.strerror or err}") from None

    @staticmethod
    def key(
        generator_id: str,
        prompt: str,
        index: int,
        image_size: int,
        num_inference_steps: int,
        guidance_scale: float,
        seed: int,
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
        canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def get(self, key: str) -> "Image.Image | None":
        """The cached RGB image, or None when absent or unreadable (a broken file is logged and regenerated)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with Image.open(path) as image:
                image.verify()  # checksums; the image must be reopened afterwards
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as err:  # PIL signals broken files with OSError, SyntaxError, struct.error, ...
            logger.warning("image cache: cannot read %s (%s); treating it as missing", path, err)
            return None

    def put(self, key: str, image: Image.Image) -> Path:
        """Store image atomically: write a temporary file beside the target, then rename it."""
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG", compress_level=1)  # fast: encoding dominated cold runs
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


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


@dataclass
class GeneratedImage:
    path: str
    prompt: str
    image: Image.Image


class ImageProvider:
    """Serves images for lists of prompts from the cache, generating (and storing) the missing ones.

    Image i of an item uses the item's prompt i, with the prompt's occurrence number in the
    item's list as key index: a prompt repeated k times gives k different images, and a
    longer list of the same prompts reuses the images of a shorter one. Identical keys
    (across items, templates, answer options) are looked up and generated once per call;
    slots with the same key share one PIL image object.

    Counters: ``hits`` and ``misses`` count requested image slots found / not found in the
    cache; ``generated`` counts distinct images generated.
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
        self.hits = self.misses = self.generated = 0

    def key(self, prompt: str, index: int) -> str:
        return self.cache.key(
            self.generator.generator_id,
            prompt,
            index,
            self.image_size,
            self.num_inference_steps,
            self.guidance_scale,
            self.seed,
        )

    def get(self, prompt_lists: list[list[str]]) -> list[list[GeneratedImage]]:
        keyed = [
            [(self.key(prompt, index), prompt) for prompt, index in zip(prompts, occurrence_indices(prompts))]
            for prompts in prompt_lists
        ]
        images: dict[str, Image.Image] = {}
        missing: dict[str, str] = {}  # key -> prompt, in first-seen order
        for item in keyed:
            for key, prompt in item:
                if key not in images and key not in missing:
                    image = self.cache.get(key)
                    if image is None:
                        missing[key] = prompt
                    else:
                        images[key] = image
                if key in images:
                    self.hits += 1
                else:
                    self.misses += 1
        self._generate(missing, images)
        return [[GeneratedImage(str(self.cache.path(key)), prompt, images[key]) for key, prompt in item] for item in keyed]

    def _generate(self, missing: dict[str, str], images: dict[str, Image.Image]) -> None:
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
                image = image.convert("RGB")
                self.cache.put(key, image)
                images[key] = image
            self.generated += len(batch)

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "generated": self.generated}


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
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
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
    with tqdm(total=len(shard), unit="text", disable=not state.is_local_main_process) as bar:
        for start in range(0, len(shard), chunk):
            texts_chunk = shard[start : start + chunk]
            provider.get(
                [derive_prompts(t, args.k, args.image_prompt, last_n_words=args.last_n_words, question=t) for t in texts_chunk]
            )
            bar.update(len(texts_chunk))
            bar.set_postfix(provider.stats())
    where = f"process {state.process_index}/{state.num_processes}: " if state.num_processes > 1 else ""
    stats = provider.stats()
    print(
        f"{where}{len(shard)} texts, {stats['hits']} hits, {stats['misses']} misses, "
        f"{stats['generated']} generated -> {provider.cache.root}"
    )
    state.wait_for_everyone()
    return stats


if __name__ == "__main__":
    main()
