"""Train the late-fusion projector and fusion block (METHOD.md, section 4) with Accelerate.

The same command runs under ``python train.py``, ``accelerate launch train.py`` (one or many GPUs,
DDP through Accelerate's config) and ``torchrun --nproc_per_node N train.py`` (on CPUs with gloo)::

    # stage 1: Visual Genome regions
    accelerate launch train.py --run_name test --dataset_name cropped_vg --vg_dir data/vg \\
        --model_name_or_path meta-llama/Meta-Llama-3-8B --output_dir output/llama3 --report_to wandb \\
        --per_device_train_batch_size 64 --num_train_epochs 1 --run_bf16 --learning_rate 5e-4 --with_tracking
    # stage 2: WikiText-103 (200K chunks, one generated image each) + LAION-220, from the stage-1 weights
    accelerate launch train.py --run_name ft_wiki_laion_220 --dataset_name wiki_laion_220 \\
        --max_elements 200000 --laion_image_root data/coco --pretrained_model output/llama3/test_0 ...

Only ``mm_proj`` and ``fusion_layer`` train (fp32, under autocast with ``--mixed_precision``/``--run_bf16``);
the LM and the vision encoder stay frozen in ``--lm_dtype`` and in eval mode.

Outputs under ``--output_dir``:

* ``checkpoint-<step>/``: ``accelerator.save_state`` (trainable weights, optimizer, scheduler, RNG
  states, data position), every ``--checkpointing_steps`` steps or each epoch, at most
  ``--checkpoints_total_limit`` kept. ``--resume_from_checkpoint latest|PATH`` resumes exactly: the
  resumed run ends with the same weights as an uninterrupted one.
* ``<run_name>_<epoch>/``: the trainable weights (safetensors + config.json), written at each epoch's end
  and at the end of the run; ``eval_scripts/* --pretrained_model`` takes this path.

Wiki images: each WikiText chunk's image is generated from one of its sentences and stored in the
content-addressed ``--image_cache``. Fill the cache first (sharded over processes, then exit) with the
training command plus ``--pregenerate_images``; images still missing are generated inline by the
DataLoader workers. ``python -m models.image_generation --prompts_file P --image_prompt full --k 1
--seed S`` fills the same cache entries for a file P of prompts.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import shutil
import sys
import time
from pathlib import Path

logger = logging.getLogger("train")

CHECKPOINT_PREFIX = "checkpoint-"
TRACKER_PROJECT = "late-fusion"
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
LM_DTYPES = ("bf16", "fp16", "fp32")  # torch loads only when training starts: --help needs none
# Run arguments recorded in the saved weights' config.json.
RECORDED_ARGS = ("run_name", "dataset_name", "max_elements", "max_train_samples", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "num_warmup_steps",
                 "weight_decay", "max_train_steps", "num_train_epochs", "max_length", "mixed_precision",
                 "lm_dtype", "seed", "image_generator", "image_size", "num_inference_steps")


class InputError(Exception):
    """Bad user input, reported as one ``error: ...`` line and exit code 2."""


# ----------------------------------------------------------------------------- flags

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _checkpointing_steps(text: str) -> int | str:
    if text == "epoch":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"must be a positive integer or 'epoch', got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from models.image_generation import add_generation_args

    p = argparse.ArgumentParser(description="Train the late-fusion projector and fusion block (LM and CLIP frozen).")
    g = p.add_argument_group("run")
    g.add_argument("--run_name", default="test", help="name of the saved weights: <output_dir>/<run_name>_<epoch>")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--seed", type=int, default=42, help="seeds every RNG, the data order and the wiki images")
    g.add_argument("--with_tracking", action="store_true", help="log loss and lr to --report_to")
    g.add_argument("--report_to", default="wandb", help="wandb, tensorboard, all, or a comma-separated list")
    g.add_argument("--logging_steps", type=_positive_int, default=10)
    g.add_argument("--checkpointing_steps", type=_checkpointing_steps, default=None,
                   help="save the training state every N optimizer steps, or 'epoch'")
    g.add_argument("--checkpoints_total_limit", type=_positive_int, default=None,
                   help="keep at most this many checkpoint-<step> folders (the oldest are deleted)")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-<step> folder, or 'latest' (the newest in --output_dir, if any)")

    g = p.add_argument_group("models")
    g.add_argument("--model_name_or_path", required=True, help="the frozen causal LM (hub id or local dir)")
    g.add_argument("--config_name", default=None, help="LM config, if not the one of --model_name_or_path")
    g.add_argument("--tokenizer_name", default=None, help="tokenizer, if not the one of --model_name_or_path")
    g.add_argument("--use_slow_tokenizer", action="store_true")
    g.add_argument("--trust_remote_code", action="store_true")
    g.add_argument("--low_cpu_mem_usage", action="store_true",
                   help="accepted for compatibility; transformers 5 always loads weights lazily")
    g.add_argument("--vision_encoder", default=None,
                   help="see models.vision.load_vision_encoder (default: ViT-B-32-quickgelu/openai)")
    g.add_argument("--proj_hidden", type=_positive_int, default=None,
                   help="projector width (default: the released checkpoints' width for the architecture)")
    g.add_argument("--pretrained_model", default=None,
                   help="start from these trainable weights (our folder or a released .bin, with or without .bin)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="sources by substring: cropped_vg, wiki, laion_220, laion_220_short (e.g. wiki_laion_220)")
    g.add_argument("--vg_dir", default=None, help="folder with region_descriptions.json, image_data.json and the images")
    g.add_argument("--laion_file", default=None, help="LAION-220 captions: local parquet/jsonl/csv or a hub id")
    g.add_argument("--laion_image_root", default=None, help="folder holding the COCO/LVIS images of LAION-220")
    g.add_argument("--wiki_file", default=None, help="WikiText: local text/parquet file or a hub id")
    g.add_argument("--wiki_num", type=int, choices=(2, 103), default=103,
                   help="WikiText-2 or WikiText-103 when --wiki_file is a hub id (the default one)")
    g.add_argument("--wiki_chunk_tokens", type=_positive_int, default=447)
    g.add_argument("--train_file", default=None, help="extra JSONL/CSV source with image, caption and optional crop")
    g.add_argument("--max_elements", type=_positive_int, default=None, help="at most this many WikiText chunks")
    g.add_argument("--max_train_samples", type=_positive_int, default=None, help="at most this many items per source")
    g.add_argument("--shuffle_data", action="store_true",
                   help="shuffle the training set each epoch (seeded); the released default is file order")
    g.add_argument("--skip_invalid_boxes", action="store_true",
                   help="skip Visual Genome regions whose box lies outside the image instead of failing")
    g.add_argument("--max_length", "--max_seq_length", dest="max_length", type=_positive_int, default=512,
                   help="tokens per text, EOS included (WikiText chunks need wiki_chunk_tokens + 2)")
    g.add_argument("--num_workers", type=int, default=4, help="DataLoader workers (decoding, cropping, generation)")
    g.add_argument("--pregenerate_images", action="store_true",
                   help="fill --image_cache with the images of the wiki chunks, then exit")
    add_generation_args(p)

    g.add_argument("--cache_lm_states", action="store_true",
                   help="keep the frozen LM's hidden states of every distinct training text in memory and reuse "
                        "them (a large speed-up when texts repeat, as in the demo; memory grows with the data)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--per_device_train_batch_size", type=_positive_int, default=8)
    g.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default="linear")
    g.add_argument("--num_warmup_steps", type=int, default=0, help="in optimizer steps")
    g.add_argument("--num_train_epochs", type=_positive_int, default=1)
    g.add_argument("--max_train_steps", type=_positive_int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--max_grad_norm", type=float, default=None, help="clip the gradient norm (off by default)")

    g = p.add_argument_group("precision and device")
    g.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default=None,
                   help="autocast for the trainable modules (default: Accelerate's config)")
    g.add_argument("--run_bf16", action="store_true", help="the released spelling of --mixed_precision bf16")
    g.add_argument("--lm_dtype", choices=("auto", *LM_DTYPES), default="auto",
                   help="dtype of the frozen LM and vision encoder; auto: bf16 on CUDA when supported, else fp32")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: Accelerate's choice (the CPU when no accelerator is present)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.vision_encoder is None:
        from models.vision import DEFAULT_VISION_ENCODER

        args.vision_encoder = DEFAULT_VISION_ENCODER
    if args.run_bf16:
        if args.mixed_precision not in (None, "bf16"):
            parser.error(f"--run_bf16 conflicts with --mixed_precision {args.mixed_precision}")
        args.mixed_precision = "bf16"
    if args.num_workers < 0:
        parser.error("--num_workers must be >= 0")
    if args.num_warmup_steps < 0:
        parser.error("--num_warmup_steps must be >= 0")
    return args


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``output_dir``, oldest (lowest step) first."""
    root = Path(output_dir)
    found = [d for d in root.iterdir() if d.is_dir() and checkpoint_step(d) is not None] if root.is_dir() else []
    return sorted(found, key=checkpoint_step)


def resolve_resume(resume: str | None, output_dir) -> Path | None:
    """The checkpoint folder to resume from (None: start afresh)."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s; starting a new run", output_dir)
            return None
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise InputError(f"--resume_from_checkpoint {resume}: no such directory")
    if not (path / "custom_checkpoint_0.pkl").is_file():
        raise InputError(f"--resume_from_checkpoint {resume}: not a checkpoint of train.py (no training "
                         "state; saved weights go to --pretrained_model)")
    return path


class TrainState:
    """Where training stands; saved in every checkpoint (``accelerator.register_for_checkpointing``)."""

    def __init__(self):
        self.completed_steps = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # batches of `epoch` already consumed

    def state_dict(self) -> dict:
        return {"completed_steps": self.completed_steps, "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.completed_steps = int(state["completed_steps"])
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])


def _is_trainable_key(key: str) -> bool:
    from models.checkpoints import TRAINABLE_PREFIXES

    return key.removeprefix("module.").startswith(TRAINABLE_PREFIXES)


def register_trainable_only_hooks(accelerator) -> None:
    """``save_state``/``load_state`` keep the trainable weights only (not the frozen multi-GB LM)."""
    from models.checkpoints import load_trainable

    def save_hook(models, weights, output_dir):
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if _is_trainable_key(k)}

    def load_hook(models, input_dir):
        while models:
            load_trainable(accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: Path, state: TrainState, total_limit: int | None) -> Path:
    """``save_state`` into ``checkpoint-<step>``, first deleting the oldest beyond ``total_limit``."""
    if total_limit is not None and accelerator.is_main_process:
        old = list_checkpoints(output_dir)
        for path in old[:max(0, len(old) + 1 - total_limit)]:
            logger.info("deleting old checkpoint %s (--checkpoints_total_limit %d)", path, total_limit)
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
    path = _checkpoint_path(output_dir, state)
    accelerator.save_state(str(path))
    return path


def _checkpoint_path(output_dir: Path, state: TrainState) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{state.completed_steps}"


# ----------------------------------------------------------------------------- setup helpers

def resolve_lm_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _pretrained_exists(path: str) -> bool:
    p = Path(path)
    return p.exists() or p.with_name(p.name + ".bin").is_file()


def build_image_provider(args, device):
    from models.image_generation import ImageCache, ImageProvider, build_generator

    generator = build_generator(args.image_generator, device=device, noise=args.toyworld_noise)
    return ImageProvider(generator, ImageCache(args.image_cache), image_size=args.image_size,
                         num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                         seed=args.seed, gen_batch_size=args.gen_batch_size)


def pregenerate_wiki_images(accelerator, dataset, provider) -> dict:
    """Fill the image cache for every wiki chunk of ``dataset``, each process taking its share."""
    from torch.utils.data import ConcatDataset
    from tqdm.auto import tqdm

    from data.captions import WikiChunks

    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    for chunks in (d for d in parts if isinstance(d, WikiChunks)):
        mine = list(range(accelerator.process_index, len(chunks), accelerator.num_processes))
        step = 8 * provider.gen_batch_size
        with tqdm(total=len(mine), unit="chunk", disable=None if accelerator.is_local_main_process else True) as bar:
            for start in range(0, len(mine), step):
                batch = mine[start:start + step]
                provider.get([[chunks.prompt(i)] for i in batch])
                bar.update(len(batch))
                bar.set_postfix(provider.stats())
    provider.flush()  # on disk before DataLoader workers (other processes) look for them
    accelerator.wait_for_everyone()
    return provider.stats()


def _tracker_config(args) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


# ----------------------------------------------------------------------------- main

def main(argv=None, *, step_callback=None) -> dict:
    """Parse ``argv``, train, and return ``{"losses", "completed_steps", "model", "saved", ...}``.

    ``losses`` and ``lrs`` hold each optimizer step's mean training loss (on this process) and the learning
    rate after it, for the steps this invocation ran.
    ``step_callback(completed_steps)``, when given, runs after each optimizer step (tests use it to
    simulate an interruption).
    """
    args = parse_args(argv)
    try:
        return _run(args, step_callback)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def make_accelerator(args):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    report_to = [r.strip() for r in args.report_to.split(",") if r.strip()]
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=(report_to if len(report_to) > 1 else report_to[0]) if args.with_tracking else None,
        project_dir=args.output_dir,
        # Accelerate runs several processes on CPUs (torchrun, gloo) only with cpu=True
        cpu=args.device == "cpu" or (args.device is None and not torch.accelerator.is_available()),
        # the same shuffled order on every process and after a resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))


def prepare_data(args, accelerator):
    """Check every input and build the training set (no model is loaded yet).

    Returns ``(lm_config, tokenizer, dataset, image_provider or None)``.
    """
    from transformers import AutoConfig, AutoTokenizer

    from data.captions import build_train_dataset, select_sources

    try:
        lm_config = AutoConfig.from_pretrained(args.config_name or args.model_name_or_path,
                                               trust_remote_code=args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path,
                                                  use_fast=not args.use_slow_tokenizer,
                                                  trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the language model's config or tokenizer "
                         f"({args.model_name_or_path}): {str(err).strip().splitlines()[0]}") from None
    if args.pretrained_model is not None and not _pretrained_exists(args.pretrained_model):
        raise InputError(f"--pretrained_model {args.pretrained_model}: not found (also tried .bin)")
    sources = select_sources(args.dataset_name)
    if not sources and args.train_file is None:
        raise InputError(f"--dataset_name {args.dataset_name!r} names no source: use cropped_vg, wiki, laion_220 "
                         "or laion_220_short (or combinations such as wiki_laion_220), or give --train_file")
    if args.pregenerate_images and "wiki" not in sources:
        raise InputError("--pregenerate_images needs the wiki source in --dataset_name")
    if "wiki" in sources and args.max_length < args.wiki_chunk_tokens + 2:
        logger.warning("--max_length %d cuts the %d-token WikiText chunks", args.max_length, args.wiki_chunk_tokens)
    try:
        provider = build_image_provider(args, accelerator.device) if "wiki" in sources else None
        with accelerator.main_process_first():
            dataset = build_train_dataset(
                args.dataset_name, vg_dir=args.vg_dir, laion_file=args.laion_file,
                laion_image_root=args.laion_image_root, wiki_file=args.wiki_file,
                wiki_config=f"wikitext-{args.wiki_num}-raw-v1", train_file=args.train_file,
                tokenizer=tokenizer, max_elements=args.max_elements, max_train_samples=args.max_train_samples,
                wiki_chunk_tokens=args.wiki_chunk_tokens, image_provider=provider, seed=args.seed,
                skip_invalid_boxes=args.skip_invalid_boxes)
    except (OSError, ValueError) as err:
        raise InputError(str(err).strip().splitlines()[0]) from None
    if len(dataset) == 0:
        raise InputError(f"the training set {args.dataset_name!r} is empty")
    names = sources + (["--train_file"] if args.train_file else [])
    logger.info("training set: %d items from %s", len(dataset), " + ".join(names))
    return lm_config, tokenizer, dataset, provider


def load_models(args, accelerator, lm_config):
    """The frozen vision encoder and the model: LM frozen in --lm_dtype, mm_proj and fusion_layer in fp32."""
    from models.checkpoints import CheckpointMismatchError, load_trainable
    from models.late_fusion import LateFusionLM
    from models.vision import load_vision_encoder

    lm_dtype = resolve_lm_dtype(args.lm_dtype, accelerator.device)
    try:
        encoder = load_vision_encoder(args.vision_encoder, device=accelerator.device, dtype=lm_dtype)
        lm_kwargs = {"config": lm_config} if args.config_name else {}
        model = LateFusionLM.from_pretrained(args.model_name_or_path, vision_dim=encoder.hidden_size,
                                             proj_hidden=args.proj_hidden, torch_dtype=lm_dtype,
                                             trust_remote_code=args.trust_remote_code, **lm_kwargs)
        model.mm_proj.float()
        model.fusion_layer.float()
        if args.pretrained_model is not None:
            load_trainable(model, args.pretrained_model)
    except (OSError, ValueError, CheckpointMismatchError) as err:
        raise InputError(str(err).strip().splitlines()[0]) from None
    return encoder, model.train()


def _run(args, step_callback) -> dict:
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import get_scheduler
    from transformers.utils import logging as hf_logging

    from data.captions import CaptionCollator

    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if accelerator.is_local_main_process else logging.ERROR)
    hf_logging.set_verbosity_error()
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output_dir {output_dir} exists and is not a directory")
    resume_path = resolve_resume(args.resume_from_checkpoint, output_dir)
    lm_config, tokenizer, dataset, provider = prepare_data(args, accelerator)
    if args.pregenerate_images:
        stats = pregenerate_wiki_images(accelerator, dataset, provider)
        logger.info("image cache %s: %s", provider.cache.root, stats)
        return {"pregenerated": stats}
    encoder, model = load_models(args, accelerator, lm_config)

    # Decoding, cropping, generation and CLIP preprocessing run in the workers. CUDA cannot be used in
    # forked workers, so inline wiki image generation on a GPU needs spawned ones.
    spawn = provider is not None and accelerator.device.type == "cuda" and args.num_workers > 0
    train_dataloader = DataLoader(
        dataset, batch_size=args.per_device_train_batch_size, shuffle=args.shuffle_data,
        collate_fn=CaptionCollator(tokenizer, encoder.preprocess, max_length=args.max_length),
        num_workers=args.num_workers, pin_memory=accelerator.device.type == "cuda",
        multiprocessing_context="spawn" if spawn else None,
        # a private generator keeps the global RNG (dropout) independent of the data loading
        generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    # Lengths in optimizer steps. The prepared scheduler steps num_processes times per optimizer step.
    batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                                 num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

    state = TrainState()
    accelerator.register_for_checkpointing(state)
    register_trainable_only_hooks(accelerator)
    if resume_path is not None:
        logger.info("resuming from %s", resume_path)
        try:
            accelerator.load_state(str(resume_path))
        except (OSError, ValueError) as err:
            raise InputError(f"--resume_from_checkpoint {resume_path}: {str(err).splitlines()[0]}") from None

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if args.with_tracking:
        accelerator.init_trackers(TRACKER_PROJECT, _tracker_config(args), init_kwargs={
            "wandb": {"name": args.run_name, "dir": str(output_dir)}})
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("%d epochs, %d optimizer steps of %d samples (%d per device x %d processes x %d accumulation)",
                num_epochs, max_train_steps, total_batch, args.per_device_train_batch_size,
                accelerator.num_processes, args.gradient_accumulation_steps)
    result = _train_loop(args, accelerator, model, encoder, optimizer, train_dataloader, lr_scheduler, state,
                         max_train_steps, num_epochs, output_dir, total_batch, step_callback)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result["model"] = accelerator.unwrap_model(model)
    return result


def _save_weights(args, accelerator, model, output_dir: Path, epoch: int, state: TrainState) -> Path:
    from models.checkpoints import save_trainable

    path = output_dir / f"{args.run_name}_{epoch}"
    if accelerator.is_main_process:
        run_args = {k: getattr(args, k) for k in RECORDED_ARGS}
        run_args.update(completed_steps=state.completed_steps, num_processes=accelerator.num_processes)
        save_trainable(accelerator.unwrap_model(model), path, base_model=args.model_name_or_path,
                       vision_encoder=args.vision_encoder, extra={"run_args": run_args})
        logger.info("saved trainable weights to %s", path)
    return path


def _train_loop(args, accelerator, model, encoder, optimizer, train_dataloader, lr_scheduler, state,
                max_train_steps, num_epochs, output_dir, total_batch, step_callback) -> dict:
    import torch
    from tqdm.auto import tqdm

    from models.late_fusion import HiddenStateMemo

    params = accelerator.unwrap_model(model).trainable_parameters()
    memo = HiddenStateMemo(limit_bytes=2**62) if args.cache_lm_states else None
    losses, lrs, saved = [], [], []
    window_loss, window_steps = 0.0, 0
    bar = tqdm(total=max_train_steps, initial=state.completed_steps, desc="train", unit="step",
               disable=None if accelerator.is_local_main_process else True)
    started, steps_run = time.perf_counter(), 0
    for epoch in range(state.epoch, num_epochs):
        if state.completed_steps >= max_train_steps:
            break
        model.train()
        train_dataloader.set_epoch(epoch)
        skip = state.batches_in_epoch if epoch == state.epoch else 0
        loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        batch_index, micro_losses = skip, []
        for batch in loader:
            batch_index += 1
            with accelerator.accumulate(model):
                with torch.no_grad():
                    patches, _ = encoder.encode_images(batch["pixel_values"].to(encoder.device, encoder.dtype))
                hidden = None if memo is None else memo(accelerator.unwrap_model(model), batch["input_ids"],
                                                        batch["attention_mask"])
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             image_patches=patches, labels=batch["labels"], hidden=hidden).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            micro_losses.append(loss.detach().float())
            if not accelerator.sync_gradients:
                continue

            state.completed_steps += 1
            state.epoch, state.batches_in_epoch = epoch, batch_index
            if batch_index == len(train_dataloader):
                state.epoch, state.batches_in_epoch = epoch + 1, 0
            step_loss = torch.stack(micro_losses).mean().item()
            micro_losses = []
            losses.append(step_loss)
            lrs.append(lr_scheduler.get_last_lr()[0])
            steps_run += 1
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            samples_per_s = steps_run * total_batch / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", samples_per_s=f"{samples_per_s:.1f}")
            if state.completed_steps % args.logging_steps == 0 or state.completed_steps == max_train_steps:
                mean_loss = accelerator.reduce(torch.tensor(window_loss / window_steps, device=accelerator.device),
                                               reduction="mean").item()
                if args.with_tracking:
                    accelerator.log({"train_loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch,
                                     "samples_per_second": samples_per_s}, step=state.completed_steps)
                window_loss, window_steps = 0.0, 0
            if isinstance(args.checkpointing_steps, int) and state.completed_steps % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, state, args.checkpoints_total_limit)
            if step_callback is not None:
                step_callback(state.completed_steps)
            if state.completed_steps >= max_train_steps:
                break
        if args.checkpointing_steps == "epoch" and not _checkpoint_path(output_dir, state).is_dir():
            save_checkpoint(accelerator, output_dir, state, args.checkpoints_total_limit)
        saved.append(_save_weights(args, accelerator, model, output_dir, epoch, state))
    bar.close()
    if not saved:  # resumed at the very end: nothing to train, but the run still ends with its weights
        saved.append(_save_weights(args, accelerator, model, output_dir, max(state.epoch - 1, 0), state))
    return {"losses": losses, "lrs": lrs, "completed_steps": state.completed_steps, "saved": saved,
            "max_train_steps": max_train_steps, "num_epochs": num_epochs}


if __name__ == "__main__":
    main()
