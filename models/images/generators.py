"""Text-to-image generators: the interface, the diffusers pipeline wrapper, and the generation dtype.

A generator turns (prompt, seed) pairs into images; each image depends only on its own prompt and seed,
so images can be cached by key (:mod:`models.images.cache`) and a batch gives the same images as one by
one. ``toyworld`` (:mod:`models.images.toyworld`) is the embedded offline world's generator; anything
else names a diffusers pipeline (a hub id or a local folder).

The generation dtype matters because fp16 and fp32 pipelines draw different images: a generator says
which one its images depend on (``key_dtype``), and the cache key holds it.

The GPU path's standard knobs, each off by default: ``--vae DIR`` swaps the pipeline's autoencoder for a
diffusers ``AutoencoderTiny`` (the TAESD family) or ``AutoencoderKL`` folder (:func:`check_vae` refuses
anything else before any image is made; the VAE's content hash joins ``generator_id``, so its images are
cached apart), ``channels_last`` puts the UNet in channels-last memory format, ``compile`` wraps the UNet in
``torch.compile`` (:func:`models.compiling.compile_problem` says first whether this machine can).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and PIL load on first use: ``--help`` and text-only runs never need them
    import torch
    from PIL import Image

from models.options.catalog import DEFAULT_GENERATOR  # noqa: F401  (declared with the options)

_PIPELINES: dict[tuple, object] = {}  # (generator id, device, dtype, knobs) -> loaded pipeline, shared process-wide
VAE_CLASSES = ("AutoencoderTiny", "AutoencoderKL")


def _read_json(path: Path, limit: int = 1 << 20) -> dict | None:
    import json

    try:
        if not path.is_file() or path.stat().st_size > limit:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _pipeline_latent_channels(model_id: str) -> int | None:
    """The latent channels a pipeline's UNet takes (its ``in_channels``; else its VAE's ``latent_channels``),
    read from a local folder's configs; None when they cannot be read without loading (a hub id)."""
    root = Path(model_id).expanduser()
    unet = _read_json(root / "unet" / "config.json")
    if unet is not None and isinstance(unet.get("in_channels"), int):
        return unet["in_channels"]
    vae = _read_json(root / "vae" / "config.json")
    if vae is not None and isinstance(vae.get("latent_channels"), int):
        return vae["latent_channels"]
    return None


def check_vae(vae_dir: str, model_id: str) -> str:
    """The content identity of a ``--vae`` folder, after checking it: a diffusers ``AutoencoderTiny`` or
    ``AutoencoderKL`` folder (``config.json`` naming the class, weights beside it) whose latent channels are
    those of the pipeline's. Raises ValueError (one line naming the folder) otherwise."""
    path = Path(vae_dir).expanduser()
    if not path.is_dir():
        raise ValueError(f"--vae {vae_dir!r}: no such directory")
    cfg = _read_json(path / "config.json")
    name = cfg.get("_class_name") if cfg else None
    if name not in VAE_CLASSES:
        raise ValueError(f"--vae {vae_dir!r}: not a diffusers autoencoder folder (config.json names "
                         f"{name!r}; expected one of {', '.join(VAE_CLASSES)})")
    if not any(path.glob("diffusion_pytorch_model*.safetensors")) and not any(path.glob("diffusion_pytorch_model*.bin")):
        raise ValueError(f"--vae {vae_dir!r}: no diffusion_pytorch_model weights in the folder")
    latent = cfg.get("latent_channels")
    wanted = _pipeline_latent_channels(model_id)
    if wanted is not None and latent != wanted:
        raise ValueError(f"--vae {vae_dir!r}: {latent} latent channels, but the pipeline {model_id!r} "
                         f"works in {wanted}")
    return f"{name}:{_folder_hash(path)[:16]}"


def _folder_hash(folder: Path) -> str:
    """sha256 over the names and contents of the regular files directly in ``folder`` (read in chunks)."""
    import hashlib

    total = hashlib.sha256()
    for entry in sorted((e for e in folder.iterdir() if e.is_file()), key=lambda e: e.name):
        total.update(entry.name.encode() + b"\0")
        with open(entry, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                total.update(chunk)
        total.update(b"\0")
    return total.hexdigest()


def default_device() -> "torch.device":
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: "str | torch.dtype | None", device: "str | torch.device") -> "torch.dtype":
    """A pipeline's dtype: a torch.dtype as given, else a name of the dtype table, ``auto``/None by its
    ``AUTO_HALF`` rule (fp16 on CUDA, fp32 elsewhere; :mod:`models.options.dtypes`)."""
    import torch

    from models.options.dtypes import AUTO_HALF, resolve, torch_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    return torch_dtype(resolve(dtype or "auto", device, AUTO_HALF))


def dtype_name(dtype: "torch.dtype") -> str:
    """torch.float16 -> 'fp16' (the names of ``--dtype``; other dtypes as torch prints them)."""
    from models.options.dtypes import name_of

    try:
        return name_of(dtype)
    except ValueError:
        return str(dtype)


class ImageGenerator:
    """Interface of a text-to-image generator.

    ``generator_id`` is a stable string that names the generator in cache keys; ``key_dtype`` the
    dtype its images depend on ('fp16', 'bf16', 'fp32'), or None when they depend on none;
    ``pipeline_loads`` how many pipelines this generator has loaded (0 for one that loads none).
    ``generate`` returns one RGB ``image_size`` x ``image_size`` image per (prompt, seed);
    each image depends only on its own prompt and seed, never on the rest of the batch.
    """

    generator_id: str
    key_dtype: "str | None" = None
    pipeline_loads: int = 0

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
    generator of this process with the same id, device and dtype (only the generator that loads it
    counts the load in ``pipeline_loads``).
    """

    def __init__(self, model_id: str = DEFAULT_GENERATOR, device=None, dtype=None, *, vae: str | None = None,
                 channels_last: bool = False, compile: bool = False):
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
        self.vae = str(vae) if vae else None
        if self.vae:  # checked now, before any image is made; images of another VAE are other images
            self.generator_id += f"+vae={check_vae(self.vae, self.model_id)}"
        self.channels_last, self.compile = bool(channels_last), bool(compile)
        if self.compile:
            from models.compiling import compile_problem

            problem = compile_problem()
            if problem:
                raise ValueError(f"--compile: torch.compile is unavailable here ({problem})")
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.key_dtype = dtype_name(self.dtype)
        self.pipeline_loads = 0
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            key = (self.generator_id, str(self.device), self.dtype, self.channels_last, self.compile)
            if key not in _PIPELINES:
                self.pipeline_loads += 1
                _PIPELINES[key] = _load_pipeline(self.model_id, self.device, self.dtype, vae=self.vae,
                                                 channels_last=self.channels_last, compile=self.compile)
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


def load_vae(vae_dir: str, dtype: "torch.dtype"):
    """A checked ``--vae`` folder's autoencoder (:func:`check_vae`), in ``dtype``."""
    import diffusers

    name = (_read_json(Path(vae_dir).expanduser() / "config.json") or {}).get("_class_name")
    if name not in VAE_CLASSES:
        raise ValueError(f"--vae {vae_dir!r}: not a diffusers autoencoder folder")
    try:
        return getattr(diffusers, name).from_pretrained(str(Path(vae_dir).expanduser()), torch_dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--vae {vae_dir!r}: cannot load it: {reason}") from err


def _load_pipeline(model_id: str, device: "torch.device", dtype: "torch.dtype", *, vae: str | None = None,
                   channels_last: bool = False, compile: bool = False):
    with warnings.catch_warnings():
        # importing the auto pipelines imports every pipeline module; one of them (Kolors) calls the
        # deprecated torch.jit.script at import time. Not ours to fix, and not worth a line in every log.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        from diffusers import AutoPipelineForText2Image
        from diffusers.utils import logging as diffusers_logging

    if not sys.stderr.isatty():  # progress bars only on a terminal
        diffusers_logging.disable_progress_bar()
    swapped = {"vae": load_vae(vae, dtype)} if vae else {}
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(model_id, dtype=dtype, **swapped)
    except (OSError, ValueError, KeyError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load text-to-image pipeline {model_id!r}: {reason}") from err
    unet = getattr(pipe, "unet", None)
    if vae:  # a hub pipeline's channels are known only now: still before its first image
        wanted = getattr(getattr(unet, "config", None), "in_channels", None)
        if wanted is not None and pipe.vae.config.latent_channels != wanted:
            raise ValueError(f"--vae {vae!r}: {pipe.vae.config.latent_channels} latent channels, but the "
                             f"pipeline {model_id!r} works in {wanted}")
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if unet is not None and channels_last:
        import torch

        pipe.unet.to(memory_format=torch.channels_last)
    if unet is not None and compile:
        pipe.unet.compile()
    return pipe


def build_generator(spec: str, *, device=None, dtype=None, noise: float = 0.3, vae: str | None = None,
                    channels_last: bool = False, compile: bool = False) -> ImageGenerator:
    """'toyworld' -> the embedded offline world's generator; anything else -> a diffusers pipeline id or dir
    (with the knobs ``vae``, ``channels_last`` and ``compile``, see the module docstring).

    Nothing heavy is loaded here: a diffusers pipeline loads on its first ``generate``.
    """
    if spec == "toyworld":
        if vae:
            raise ValueError(f"--vae {vae!r}: the toyworld generator has no autoencoder to swap")
        from models.images.toyworld import ToyWorldGenerator

        return ToyWorldGenerator(noise=noise)
    return DiffusersGenerator(spec, device=device, dtype=dtype, vae=vae, channels_last=channels_last,
                              compile=compile)
