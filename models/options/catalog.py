"""The options that several entry points share, each declared once (see :mod:`models.options.spec`).

Groups, in the order ``--help`` shows them:

* ``MODEL``: the frozen LM (evaluation's ``--model_name``), the trained weights, the vision encoder;
* ``IMAGES``: whether and how many images are fused, and how image prompts are made;
* ``GENERATION``: the text-to-image model and its cache (evaluation, training, pre-generation);
* ``RETRIEVAL``: images retrieved from an index instead (evaluation, training);
* ``MIXING``: how the k fused predictions are mixed with the text-only one;
* ``EVAL_RUN``: what an evaluation reads and where it writes;
* ``DEVICE``/``SEED``/``DTYPE``: shared with training and the image tools;
* ``SPEED``: how an evaluation computes, not what (the visual prefix cache, torch.compile).

An option that exists for one entry point only is declared next to it (a benchmark's ``--subsets`` in its
script; training's optimiser settings in :mod:`models.training.options`).
"""
from __future__ import annotations

import re

from models.fusion.mixing import MIX_MODES  # a mixing rule is added in mixing.py alone
from models.options.dtypes import AUTO_LM, AUTO_RULES, DTYPE_CHOICES
from models.options.spec import Option
from models.run_names import run_name_problem
from models.workers import PREFERRED_WORKERS, default_workers

DEFAULT_VISION_ENCODER = "ViT-B-32-quickgelu/openai"
DEFAULT_GENERATOR = "stabilityai/sdxl-turbo"
SEED_MAX = 2**32 - 1  # what numpy accepts
RETRIEVE_BY_CHOICES = ("clip", "caption")
DEFAULT_DEDUP = 0.95
DEFAULT_FAISS_THRESHOLD = 1_000_000
_DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")


def image_source_names() -> tuple[str, ...]:
    """The image sources of ``models/images/sources/`` (a registry: a new source is one new module there), looked
    up when ``--image_source`` is first checked or shown."""
    import importlib

    return importlib.import_module("models.images.sources").image_source_names()


def _device_syntax(value: str) -> str | None:
    if _DEVICE.match(value):
        return None
    return f"must be cpu, cuda, cuda:N, mps or xpu[:N], got {value!r}"


def plain_name_problem(name: str) -> str | None:
    """Why ``name`` is not one plain folder name, or None: the one run-name rule (:mod:`models.run_names`)."""
    return run_name_problem(name)


# ---------------------------------------------------------------------------------------------- model
MODEL_NAME = Option("model_name", default="gpt2", spellings=("--model_name_or_path",), results=True,
                    runtime=True, path=True, group="model", help="causal or masked LM: hub id or local dir")
PRETRAINED_MODEL = Option("pretrained_model", results=True, images_only=True, runtime=True, path=True, group="model",
                          help="trained fusion weights: a dir written by train.py, a released .bin (suffix "
                               "optional), or a hub id ORG/NAME (a local path wins)")
VISION_ENCODER = Option("vision_encoder", results=True, images_only=True, runtime=True, path=True, group="model",
                        help="CLIP spec: open_clip NAME/PRETRAINED, hf-hub:ORG/REPO, local-dir:PATH or hf-clip:ID "
                             f"(default: the checkpoint's, else {DEFAULT_VISION_ENCODER})")
PROJ_HIDDEN = Option("proj_hidden", kind="int", low=1, results=True, images_only=True, runtime=True, group="model",
                     help="projector width when no checkpoint gives it (default: the released checkpoints' width "
                          "for the architecture)")
MODEL = (MODEL_NAME, PRETRAINED_MODEL, VISION_ENCODER, PROJ_HIDDEN)

# ---------------------------------------------------------------------------------------------- images
GENERATE_IMAGES = Option("generate_images", kind="switch", results=True, images_only=True, group="images",
                         help="fuse k images (a switch; '--generate_images True/False' also works; default: on "
                              "with --image_source retrieve, else off)")
K = Option("k", kind="int", low=0, default=10, results=True, images_only=True, group="images",
           help="images per input")
IMAGE_PROMPT = Option("image_prompt", kind="choice", choices=("sentences", "full", "question"), default="sentences",
                      results=True, images_only=True, group="images",
                      help="how image prompts are derived from the input")
IMAGES = (GENERATE_IMAGES, K, IMAGE_PROMPT)

# ---------------------------------------------------------------------------------------------- generation
IMAGE_GENERATOR = Option("image_generator", default=DEFAULT_GENERATOR, results=True, images_only=True, runtime=True,
                         path=True, group="image generation",
                         help="diffusers text-to-image pipeline (hub id or local dir), or 'toyworld' for the "
                              "embedded offline world")
IMAGE_CACHE = Option("image_cache", default="output/image_cache", runtime=True, path=True, group="image generation",
                     help="directory of the content-addressed PNG cache (and the vision-feature cache)")
IMAGE_SIZE = Option("image_size", kind="int", low=1, default=512, results=True, images_only=True, runtime=True,
                    group="image generation", help="generated image side, in pixels")
NUM_INFERENCE_STEPS = Option("num_inference_steps", kind="int", low=1, default=1, results=True, images_only=True,
                             runtime=True, group="image generation", help="denoising steps (SDXL-Turbo: 1)")
GUIDANCE_SCALE = Option("guidance_scale", kind="float", low=0.0, default=0.0, results=True, images_only=True,
                        runtime=True, group="image generation",
                        help="classifier-free guidance (SDXL-Turbo: 0, no guidance)")
GEN_BATCH_SIZE = Option("gen_batch_size", kind="int", low=1, default=8, runtime=True, group="image generation",
                        help="images generated per pipeline call (images do not depend on it)")
TOYWORLD_NOISE = Option("toyworld_noise", kind="float", low=0.0, high=1.0, default=0.3, results=True,
                        images_only=True, runtime=True, group="image generation",
                        help="error rate of the toyworld generator")
VAE = Option("vae", results=True, images_only=True, runtime=True, path=True, group="image generation",
             metavar="DIR", help="swap the pipeline's VAE for this diffusers AutoencoderTiny (e.g. TAESD) or "
                                 "AutoencoderKL folder (default: the pipeline's own)")
CHANNELS_LAST = Option("channels_last", kind="flag", default=False, images_only=True, runtime=True,
                       group="image generation", help="run the UNet in channels-last memory format")
GENERATION = (IMAGE_GENERATOR, IMAGE_CACHE, IMAGE_SIZE, NUM_INFERENCE_STEPS, GUIDANCE_SCALE, GEN_BATCH_SIZE,
              TOYWORLD_NOISE, VAE, CHANNELS_LAST)

# ---------------------------------------------------------------------------------------------- retrieval
IMAGE_SOURCE = Option("image_source", kind="choice", choices=image_source_names, default="generate", results=True,
                      images_only=True, runtime=True, group="image retrieval",
                      help="generate images with --image_generator, or retrieve them from --image_index")
IMAGE_INDEX = Option("image_index", results=True, images_only=True, runtime=True, path=True, group="image retrieval",
                     help="an index folder (python -m models.images.index build)")
RETRIEVE_BY = Option("retrieve_by", kind="choice", choices=RETRIEVE_BY_CHOICES, default="clip", results=True,
                     images_only=True, runtime=True, group="image retrieval",
                     help="clip: CLIP text-image cosine; caption: BM25 between the prompt and the captions")
DEDUP_THRESHOLD = Option("dedup_threshold", kind="float", low=-1.0, high=1.0, default=DEFAULT_DEDUP, results=True,
                         images_only=True, runtime=True, group="image retrieval",
                         help="pass over images whose CLIP cosine with an image already taken exceeds this "
                              "(1: off)")
FAISS_THRESHOLD = Option("faiss_threshold", kind="int", low=0, default=DEFAULT_FAISS_THRESHOLD, runtime=True,
                         group="image retrieval", help="use faiss (when installed) for indexes of more images "
                                                       "than this")
RETRIEVAL = (IMAGE_SOURCE, IMAGE_INDEX, RETRIEVE_BY, DEDUP_THRESHOLD, FAISS_THRESHOLD)

# ---------------------------------------------------------------------------------------------- mixing
MIX = Option("mix", kind="choice", choices=MIX_MODES, default="logits", results=True, images_only=True,
             group="mixing", help="logits: average weighted logits (the released code); probs: the paper's Eq. 2")
CLIP_TEMPERATURE = Option("clip_temperature", kind="float", low=0.0, default=2.0, results=True, images_only=True,
                          group="mixing", help="tau in s_i = tau * max(0, cos)")
UNIFORM_WEIGHTS = Option("uniform_weights", kind="flag", default=False, spellings=("--no_clip_rescaling",),
                         results=True, images_only=True, group="mixing",
                         help="weight every image 0.5 instead of by CLIP agreement")
MIXING = (MIX, CLIP_TEMPERATURE, UNIFORM_WEIGHTS)

# ---------------------------------------------------------------------------------------------- device, seed
DEVICE = Option("device", runtime=True, check=_device_syntax, group="run",
                help="cpu, cuda, cuda:1, ... (default: the accelerator's choice)")
DTYPE = Option("dtype", kind="choice", choices=DTYPE_CHOICES, default="auto", results=True, runtime=True,
               group="run", help=f"frozen LM and CLIP dtype ({AUTO_RULES[AUTO_LM]})")
SEED = Option("seed", kind="int", low=0, high=SEED_MAX, default=0, results=True, images_only=True, runtime=True,
              group="run", help="base seed of every generated image")

# ---------------------------------------------------------------------------------------------- evaluation run
LIMIT = Option("limit", kind="int", low=1, data=True, group="run",
               help="evaluate only the first N examples (per subset)")
BATCH_SIZE = Option("batch_size", kind="int", low=1, default=8, group="run", help="texts per forward pass")
NUM_WORKERS = Option("num_workers", kind="int", low=0, default=default_workers(), group="run",
                     help=f"DataLoader workers (decoding, cropping, generation); at most the CPUs this process may "
                          f"use, a larger value is lowered to that (default: min({PREFERRED_WORKERS}, CPUs), "
                          f"{default_workers()} here)")
DATA_DIR = Option("data_dir", path=True, data=True, group="run",
                  help="folder of the benchmark's original files (default: the shipped files, else the hub)")
DATA_FILE = Option("data_file", path=True, data=True, group="run",
                   help="one file of the benchmark in its original format")
OUTPUT_DIR = Option("output_dir", default="output/results", path=True, group="run")
RUN_NAME = Option("run_name", check=run_name_problem, group="run",
                  help="results go to OUTPUT_DIR/RUN_NAME (default: a timestamp)")
EVAL_RUN = (LIMIT, BATCH_SIZE, DEVICE, DTYPE, SEED, DATA_DIR, DATA_FILE, OUTPUT_DIR, RUN_NAME)

# ---------------------------------------------------------------------------------------------- speed
PREFIX_CACHE = Option("prefix_cache", kind="switch", default=True, images_only=True, runtime=True, group="speed",
                      help="compute the fusion block's keys and values of each image's visual prefix once and "
                           "reuse them for every text (causal LMs; '--prefix_cache False' runs [V ; H] whole each "
                           "time; scores agree to float rounding)")
PREFIX_STORE = Option("prefix_store", kind="choice", choices=("auto", "on", "off"), default="auto", images_only=True,
                      runtime=True, group="speed",
                      help="also keep each image's visual prefix (keys and values) in the feature cache on disk, so "
                           "a warm run computes none: auto = on CPU only (on a GPU the block is cheaper than the "
                           "file); the same numbers either way")
COMPILE = Option("compile", kind="flag", default=False, runtime=True, group="speed",
                 help="torch.compile the UNet and the fusion block (refused in one line where torch.compile "
                      "cannot run)")
SPEED = (PREFIX_CACHE, PREFIX_STORE, COMPILE)


def eval_options(image_prompt_choices=("sentences", "full", "question"), default_image_prompt: str = "sentences",
                 default_k: int = 10) -> tuple[Option, ...]:
    """The options every eval script shares, with the script's image-prompt strategies and default k."""
    images = (GENERATE_IMAGES, K.replace(default=default_k),
              IMAGE_PROMPT.replace(choices=tuple(image_prompt_choices), default=default_image_prompt))
    return (*MODEL, *images, *GENERATION, *RETRIEVAL, *MIXING, *EVAL_RUN, *SPEED)


SHARED = {opt.name: opt for opt in (*MODEL, *IMAGES, *GENERATION, *RETRIEVAL, *MIXING, *EVAL_RUN, *SPEED)}
