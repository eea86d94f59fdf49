"""Train the late-fusion projector and fusion block (docs/method.md, "Training") with Accelerate.

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

A masked LM (``--model_name_or_path bert-base-uncased``, RoBERTa, ...) trains with the masked-LM objective
instead of next-token prediction: ``--mlm_probability`` of the caption tokens are masked (80% mask token,
10% random, 10% unchanged; ``data.masking``), the draws seeded per batch, and the loss is taken at those
positions only (``docs/masked_lm.md``).

Outputs under ``--output_dir``:

* ``checkpoint-<step>/``: the training state (trainable weights, optimizer, scheduler, RNG states, data
  position, the run's config) in safetensors and JSON only (``models/checkpoints/training_state.py``), every
  ``--checkpointing_steps`` steps or each epoch, written atomically; at most ``--checkpoints_total_limit``
  kept. ``--resume_from_checkpoint latest|PATH`` resumes exactly: the resumed run ends with the same weights
  as an uninterrupted one. A resume with settings that change the result is refused unless
  ``--ignore_config_mismatch``; a new run into a folder holding checkpoints or this run's weights is refused
  unless ``--overwrite_output_dir``.
* ``<run_name>_<epoch>/``: the trainable weights (safetensors + config.json), written at each epoch's end
  and at the end of the run; ``eval_scripts/* --pretrained_model`` takes this path. Its ``config.json``
  records the run's settings and how many training images were unreadable and skipped (``bad_images``).

Bad input is one ``error: ...`` line (exit status 2), found before anything is written; under torchrun
rank 0 prints it and every rank exits with it (a failure on one rank is shared with the others).

Wiki images: each WikiText chunk's image is generated from one of its sentences and stored in the
content-addressed ``--image_cache``. Fill the cache first (sharded over processes, then exit) with the
training command plus ``--pregenerate_images``; images still missing are generated inline by the
DataLoader workers. ``python -m models.images.pregenerate --prompts_file P --image_prompt full --k 1
--seed S`` fills the same cache entries for a file P of prompts.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import shutil
import time
from pathlib import Path

from models.cli import (OneLineArgumentParser, finite_float, non_negative_int, positive_int, report_error,
                        seed as seed_type)

logger = logging.getLogger("train")

TRACKER_PROJECT = "late-fusion"
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
LM_DTYPES = ("bf16", "fp16", "fp32")  # torch loads only when training starts: --help needs none
# Run arguments recorded in the saved weights' config.json.
RECORDED_ARGS = ("run_name", "dataset_name", "max_elements", "max_train_samples", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "num_warmup_steps",
                 "weight_decay", "max_train_steps", "num_train_epochs", "max_length", "mixed_precision",
                 "lm_dtype", "seed", "image_generator", "image_size", "num_inference_steps", "max_bad_images",
                 "image_source", "image_index", "retrieve_by", "mlm_probability")
# Flags that change what a run computes: a checkpoint records them, and a resume must match them
# (with the resolved mixed precision and LM dtype, the device type, the process count and the data size).
RESULT_ARGS = ("model_name_or_path", "config_name", "tokenizer_name", "vision_encoder", "proj_hidden",
               "pretrained_model", "dataset_name", "vg_dir", "laion_file", "laion_image_root", "wiki_file",
               "wiki_num", "wiki_chunk_tokens", "train_file", "max_elements", "max_train_samples", "shuffle_data",
               "skip_invalid_boxes", "max_length", "image_generator", "image_size", "num_inference_steps",
               "guidance_scale", "toyworld_noise", "image_source", "image_index", "retrieve_by", "dedup_threshold",
               "per_device_train_batch_size", "gradient_accumulation_steps",
               "learning_rate", "weight_decay", "lr_scheduler_type", "num_warmup_steps", "num_train_epochs",
               "max_train_steps", "max_grad_norm", "seed", "mlm_probability")
_PATH_ARGS = ("model_name_or_path", "config_name", "tokenizer_name", "pretrained_model", "vg_dir", "laion_file",
              "laion_image_root", "wiki_file", "train_file", "image_generator", "image_index")


class InputError(Exception):
    """Bad user input, reported as one ``error: ...`` line and exit code 2."""


# ----------------------------------------------------------------------------- flags

def _checkpointing_steps(text: str) -> int | str:
    if text == "epoch":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"must be a positive integer or 'epoch', got {text!r}")


def build_parser():
    from models.images.flags import add_generation_args, add_retrieval_args

    p = OneLineArgumentParser(description="Train the late-fusion projector and fusion block (LM and CLIP frozen).")
    g = p.add_argument_group("run")
    g.add_argument("--run_name", default="test", help="name of the saved weights: <output_dir>/<run_name>_<epoch>")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start a new run in an --output_dir that holds checkpoints or this run's weights, deleting "
                        "them (without it, such a run is refused)")
    g.add_argument("--seed", type=seed_type, default=42, help="seeds every RNG, the data order and the wiki images")
    g.add_argument("--with_tracking", action="store_true", help="log loss and lr to --report_to")
    g.add_argument("--report_to", default="wandb", help="wandb, tensorboard, all, or a comma-separated list")
    g.add_argument("--logging_steps", type=positive_int, default=10)
    g.add_argument("--checkpointing_steps", type=_checkpointing_steps, default=None,
                   help="save the training state every N optimizer steps, or 'epoch'")
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=None,
                   help="keep at most this many checkpoint-<step> folders (the oldest are deleted once a newer "
                        "one is complete)")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-<step> folder, or 'latest' (the newest complete one in --output_dir, if any)")
    g.add_argument("--ignore_config_mismatch", action="store_true",
                   help="resume even when the checkpoint was made with other result-changing settings")

    g = p.add_argument_group("models")
    g.add_argument("--model_name_or_path", required=True,
                   help="the frozen LM (hub id or local dir): a causal LM, or a masked LM (trained with the MLM "
                        "objective, see --mlm_probability)")
    g.add_argument("--config_name", default=None, help="LM config, if not the one of --model_name_or_path")
    g.add_argument("--tokenizer_name", default=None, help="tokenizer, if not the one of --model_name_or_path")
    g.add_argument("--use_slow_tokenizer", action="store_true")
    g.add_argument("--trust_remote_code", action="store_true")
    g.add_argument("--low_cpu_mem_usage", action="store_true",
                   help="accepted for compatibility; transformers 5 always loads weights lazily")
    g.add_argument("--vision_encoder", default=None,
                   help="see models.vision.load_vision_encoder (default: ViT-B-32-quickgelu/openai)")
    g.add_argument("--proj_hidden", type=positive_int, default=None,
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
    g.add_argument("--wiki_chunk_tokens", type=positive_int, default=447)
    g.add_argument("--train_file", default=None, help="extra JSONL/CSV source with image, caption and optional crop")
    g.add_argument("--max_elements", type=positive_int, default=None, help="at most this many WikiText chunks")
    g.add_argument("--max_train_samples", type=positive_int, default=None, help="at most this many items per source")
    g.add_argument("--shuffle_data", action="store_true",
                   help="shuffle the training set each epoch (seeded); the released default is file order")
    g.add_argument("--skip_invalid_boxes", action="store_true",
                   help="skip Visual Genome regions whose box lies outside the image instead of failing")
    g.add_argument("--max_bad_images", type=finite_float(0.0, 1.0), default=0.01,
                   help="stop when more than this fraction of the training images seen so far cannot be read "
                        "(unreadable images are skipped, counted and logged once; the fraction is taken over at "
                        "least the first min(training set size, 1000) images)")
    g.add_argument("--max_length", "--max_seq_length", dest="max_length", type=positive_int, default=512,
                   help="tokens per text, EOS included (WikiText chunks need wiki_chunk_tokens + 2)")
    g.add_argument("--num_workers", type=non_negative_int, default=4,
                   help="DataLoader workers (decoding, cropping, generation)")
    g.add_argument("--mlm_probability", type=finite_float(0.0, 1.0, low_open=True), default=0.15,
                   help="masked LMs: the share of caption tokens masked for the MLM loss (BERT's 0.15; the first "
                        "release used 0.2), strictly between 0 and 1")
    g.add_argument("--pregenerate_images", action="store_true",
                   help="fill --image_cache with the images of the wiki chunks, then exit")
    add_generation_args(p)
    add_retrieval_args(p)

    g.add_argument("--cache_lm_states", action="store_true",
                   help="keep the frozen LM's hidden states of every distinct training text in memory and reuse "
                        "them (a large speed-up when texts repeat, as in the demo; memory grows with the data)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--per_device_train_batch_size", type=positive_int, default=8)
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    g.add_argument("--learning_rate", type=finite_float(0.0, low_open=True), default=5e-5)
    g.add_argument("--weight_decay", type=finite_float(0.0), default=0.0)
    g.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default="linear")
    g.add_argument("--num_warmup_steps", type=non_negative_int, default=0, help="in optimizer steps")
    g.add_argument("--num_train_epochs", type=positive_int, default=1)
    g.add_argument("--max_train_steps", type=positive_int, default=None, help="overrides --num_train_epochs")
    g.add_argument("--max_grad_norm", type=finite_float(0.0, low_open=True), default=None,
                   help="clip the gradient norm (off by default)")

    g = p.add_argument_group("precision and device")
    g.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default=None,
                   help="autocast for the trainable modules (default: Accelerate's config)")
    g.add_argument("--run_bf16", action="store_true", help="the released spelling of --mixed_precision bf16")
    g.add_argument("--lm_dtype", choices=("auto", *LM_DTYPES), default="auto",
                   help="dtype of the frozen LM and vision encoder; auto: bf16 on CUDA when supported, else fp32")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: Accelerate's choice (the CPU when no accelerator is present)")
    return p


def parse_args(argv=None):
    """Parse and check every flag: whatever can be known before reading data is an error here."""
    from models.images.flags import check_generation_args

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.vision_encoder is None:
        from models.vision import DEFAULT_VISION_ENCODER

        args.vision_encoder = DEFAULT_VISION_ENCODER
    if args.run_bf16:
        if args.mixed_precision not in (None, "bf16"):
            parser.error(f"--run_bf16 conflicts with --mixed_precision {args.mixed_precision}")
        args.mixed_precision = "bf16"
    try:
        check_generation_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    _check_report_to(parser, args)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        parser.error(f"--output_dir {output_dir} exists and is not a directory")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir and --resume_from_checkpoint exclude each other")
    if args.mlm_probability >= 1.0:
        parser.error(f"--mlm_probability must lie strictly between 0 and 1, got {args.mlm_probability}")
    return args


def _check_report_to(parser, args) -> None:
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = [r.strip() for r in args.report_to.split(",") if r.strip()]
    unknown = [n for n in names if n not in LoggerType.list()]
    if unknown or not names:
        parser.error(f"--report_to {args.report_to!r}: choose from {', '.join(LoggerType.list())}")
    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n != "all" and n not in available]
    if args.with_tracking and missing:
        parser.error(f"--report_to {missing[0]}: the package is not installed (installed trackers: "
                     f"{', '.join(sorted(available)) or 'none'})")


# ----------------------------------------------------------------------------- checkpoints

def list_checkpoints(output_dir) -> list[Path]:
    """The complete ``checkpoint-<step>`` folders of ``output_dir``, oldest (lowest step) first."""
    from models.checkpoints.training_state import scan_checkpoints

    return scan_checkpoints(output_dir)[0]


def resolve_resume(resume: str | None, output_dir) -> Path | None:
    """The checkpoint folder to resume from (None: start afresh); incomplete ones are skipped with a warning."""
    from models.checkpoints.weights import FORMAT, CheckpointError, read_checkpoint_config
    from models.checkpoints.training_state import check_resumable, latest_checkpoint

    if not resume:
        return None
    if resume == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s; starting a new run",
                           output_dir)
        return path
    path = Path(resume)
    try:
        if path.is_dir() and read_checkpoint_config(path).get("format") == FORMAT:
            raise InputError(f"--resume_from_checkpoint {resume}: holds saved weights, not a training checkpoint "
                             "(give it as --pretrained_model to start from these weights)")
        check_resumable(path)
    except CheckpointError as err:
        raise InputError(f"--resume_from_checkpoint {resume}: {err}") from None
    return path


def _run_weights(output_dir: Path, run_name: str) -> list[Path]:
    """This run's saved weights ``<run_name>_<epoch>/`` in ``output_dir``."""
    if not output_dir.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(run_name)}_\d+")
    return sorted(d for d in output_dir.iterdir() if d.is_dir() and pattern.fullmatch(d.name))


def _previous_run(args) -> list[Path]:
    """Checkpoints (complete or not) and this run's weights already in ``--output_dir``."""
    output_dir = Path(args.output_dir)
    from models.checkpoints.training_state import scan_checkpoints

    complete, incomplete = scan_checkpoints(output_dir)
    return complete + incomplete + _run_weights(output_dir, args.run_name)


def check_output_dir(args, resume_path: Path | None) -> None:
    """Refuse a new run into a folder holding checkpoints or this run's weights (they would be mixed with the
    new run's, resumed by mistake or overwritten), unless resuming or ``--overwrite_output_dir``."""
    found = _previous_run(args)
    if not found or resume_path is not None or args.overwrite_output_dir:
        return
    names = ", ".join(p.name for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    if args.resume_from_checkpoint:  # 'latest' found nothing complete to resume
        raise InputError(f"--output_dir {args.output_dir} holds no complete checkpoint to resume, but {names}: "
                         "replace them with --overwrite_output_dir, or choose another --output_dir")
    raise InputError(f"--output_dir {args.output_dir} already holds {names}: resume with --resume_from_checkpoint "
                     "PATH|latest, replace them with --overwrite_output_dir, or choose another --output_dir")


def clear_previous_run(args) -> None:
    """``--overwrite_output_dir``: delete the checkpoints and this run's weights (main process only)."""
    for path in _previous_run(args):
        logger.warning("--overwrite_output_dir: deleting %s", path)
        shutil.rmtree(path)


def _normalised(name: str, value):
    """Local paths made absolute, so that a resume from another working directory compares equal."""
    if isinstance(value, str) and name in _PATH_ARGS and Path(value).exists():
        return str(Path(value).resolve())
    if name == "vision_encoder" and isinstance(value, str) and value.startswith("local-dir:"):
        return "local-dir:" + str(Path(value[len("local-dir:"):]).resolve())
    return value


def run_config(args, accelerator, dataset_size: int) -> dict:
    """The settings that change what this run computes, as recorded in its checkpoints."""
    config = {name: _normalised(name, getattr(args, name)) for name in RESULT_ARGS}
    config.update(mixed_precision=str(accelerator.mixed_precision),
                  lm_dtype=str(resolve_lm_dtype(args.lm_dtype, accelerator.device)).removeprefix("torch."),
                  device=accelerator.device.type, num_processes=accelerator.num_processes,
                  training_set_size=dataset_size)
    return config


def read_resume_checkpoint(accelerator, path: Path) -> dict:
    """Read and verify every file of the checkpoint this process needs (before any data or model loads)."""
    from models.checkpoints.weights import CheckpointError
    from models.checkpoints.training_state import read_training_checkpoint

    try:
        return read_training_checkpoint(path, accelerator.process_index)
    except CheckpointError as err:
        raise InputError(f"--resume_from_checkpoint: {err}") from None


def check_resume_config(args, ckpt: dict, config: dict) -> None:
    """Refuse a checkpoint made with other result-changing settings, unless --ignore_config_mismatch."""
    from models.checkpoints.training_state import config_differences

    diffs = config_differences(ckpt["trainer_state"]["config"], config)
    if diffs and not args.ignore_config_mismatch:
        raise InputError(f"--resume_from_checkpoint {ckpt['path']} was made with other settings: {'; '.join(diffs)} "
                         "(resume with the same flags, or pass --ignore_config_mismatch)")
    if diffs:
        logger.warning("--ignore_config_mismatch: resuming %s despite other settings: %s", ckpt["path"],
                       "; ".join(diffs))


class TrainState:
    """Where training stands; saved in every checkpoint's ``trainer_state.json``."""

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


# ----------------------------------------------------------------------------- errors on every process

def share_error(accelerator, message: str | None) -> None:
    """Collective: when any process has an error ``message``, every process raises it as InputError.

    The lowest failing rank's message is broadcast (as bytes in a tensor), so rank 0 can print it and no
    process is left waiting in a collective for a peer that has exited."""
    if accelerator.num_processes == 1:
        if message is not None:
            raise InputError(message)
        return
    import torch
    import torch.distributed as dist

    world, device = accelerator.num_processes, accelerator.device
    first = torch.tensor([accelerator.process_index if message is not None else world], device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    source = int(first.item())
    if source == world:
        return
    buffer = torch.zeros(2048, dtype=torch.uint8, device=device)
    if accelerator.process_index == source:
        data = message.encode("utf-8")[:buffer.numel()]
        buffer[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    dist.broadcast(buffer, src=source)
    raise InputError(bytes(buffer.cpu().tolist()).rstrip(b"\0").decode("utf-8", "replace"))


def agreed(accelerator, fn, *args, main_first: bool = False, **kwargs):
    """``fn(*args, **kwargs)`` on every process; bad input on any process is every process's InputError.

    ``main_first``: the main process runs first (it may download or build caches), then the others."""
    from models.checkpoints.weights import CheckpointError

    def attempt():
        try:
            return fn(*args, **kwargs), None
        except InputError as err:
            return None, str(err)
        except (CheckpointError, OSError, ValueError) as err:
            return None, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__

    if main_first and accelerator.num_processes > 1:
        result, message = attempt() if accelerator.is_main_process else (None, None)
        share_error(accelerator, message)
        if not accelerator.is_main_process:
            result, message = attempt()
        share_error(accelerator, message)
        return result
    result, message = attempt()
    share_error(accelerator, message)
    return result


# ----------------------------------------------------------------------------- setup helpers

def resolve_lm_dtype(name: str, device: "torch.device") -> "torch.dtype":
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
    """The wiki images' source: the generator with its cache, or (``--image_source retrieve``) a retriever
    over ``--image_index``, whose vision encoder is bound once loaded (:func:`prefetch_wiki_images`)."""
    from models.images.cache import ImageCache
    from models.images.generators import build_generator
    from models.images.provider import ImageProvider

    if args.image_source == "retrieve":
        from models.images.retrieval import build_retriever

        return build_retriever(args, device=device)

    generator = build_generator(args.image_generator, device=device, noise=args.toyworld_noise)
    return ImageProvider(generator, ImageCache(args.image_cache), image_size=args.image_size,
                         num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                         seed=args.seed, gen_batch_size=args.gen_batch_size)


def _wiki_parts(dataset) -> list:
    from torch.utils.data import ConcatDataset

    from data.captions import WikiChunks

    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    return [d for d in parts if isinstance(d, WikiChunks)]


def pregenerate_wiki_images(accelerator, dataset, provider) -> dict:
    """Fill the image cache for every wiki chunk of ``dataset``, each process taking its share."""
    from tqdm.auto import tqdm

    for chunks in _wiki_parts(dataset):
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


def prefetch_wiki_images(accelerator, dataset, retriever, encoder) -> int:
    """Retrieved wiki images: rank every chunk's image prompt now, on the device (each process its share,
    then shared with all), so that the DataLoader workers only read image files. Returns the prompt count."""
    from accelerate.utils import gather_object

    try:
        retriever.bind(encoder)  # refuses an index built with another vision encoder
    except ValueError as err:
        raise InputError(str(err)) from None
    for chunks in _wiki_parts(dataset):
        mine = range(accelerator.process_index, len(chunks), accelerator.num_processes)
        retriever.prefetch([[chunks.prompt(i)] for i in mine])
    for rankings in gather_object([retriever.rankings]):
        retriever.rankings.update(rankings)
    return len(retriever.rankings)


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
        import torch

        report_error(str(err))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # every rank is here: exit cleanly, not in gloo's teardown
        raise SystemExit(2) from None


def make_accelerator(args):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType

    report_to = [r.strip() for r in args.report_to.split(",") if r.strip()]
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=(report_to if len(report_to) > 1 else report_to[0]) if args.with_tracking else None,
            project_dir=args.output_dir,
            # Accelerate runs several processes on CPUs (torchrun, gloo) only with cpu=True
            cpu=args.device == "cpu" or (args.device is None and not torch.accelerator.is_available()),
            # the same shuffled order on every process and after a resume
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    except (ValueError, RuntimeError) as err:
        raise InputError(f"cannot set up Accelerate: {str(err).strip().splitlines()[0]}") from None
    sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    if accelerator.distributed_type in sharded and (args.checkpointing_steps or args.resume_from_checkpoint):
        raise InputError(f"checkpoints are written for one process or DDP, not {accelerator.distributed_type}: "
                         "drop --checkpointing_steps/--resume_from_checkpoint or use DDP")
    return accelerator


def prepare_data(args, accelerator):
    """Check every input and build the training set (no model is loaded yet).

    Returns ``(lm_config, tokenizer, dataset, image_provider or None)``.
    """
    from transformers import AutoConfig, AutoTokenizer

    from data.captions import build_train_dataset, select_sources
    from models.fusion.kinds import model_kind

    def load(what: str):
        try:
            if what == "config":
                return AutoConfig.from_pretrained(args.config_name or args.model_name_or_path,
                                                  trust_remote_code=args.trust_remote_code)
            return AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path,
                                                 use_fast=not args.use_slow_tokenizer,
                                                 trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load the language model's {what} "
                             f"({args.model_name_or_path}): {str(err).strip().splitlines()[0]}") from None

    def check_sources():
        sources = select_sources(args.dataset_name)
        if not sources and args.train_file is None:
            raise InputError(f"--dataset_name {args.dataset_name!r} names no source: use cropped_vg, wiki, laion_220 "
                             "or laion_220_short (or combinations such as wiki_laion_220), or give --train_file")
        if args.pregenerate_images and "wiki" not in sources:
            raise InputError("--pregenerate_images needs the wiki source in --dataset_name")
        if args.image_source == "retrieve" and "wiki" not in sources:
            raise InputError("--image_source retrieve replaces the wiki source's generated images, and "
                             f"--dataset_name {args.dataset_name!r} has no wiki source")
        if args.pregenerate_images and args.image_source == "retrieve":
            raise InputError("--pregenerate_images generates the wiki images; with --image_source retrieve there "
                             "is nothing to generate")
        return sources

    def build(sources, tokenizer):
        provider = build_image_provider(args, accelerator.device) if "wiki" in sources else None
        dataset = build_train_dataset(
            args.dataset_name, vg_dir=args.vg_dir, laion_file=args.laion_file,
            laion_image_root=args.laion_image_root, wiki_file=args.wiki_file,
            wiki_config=f"wikitext-{args.wiki_num}-raw-v1", train_file=args.train_file,
            tokenizer=tokenizer, max_elements=args.max_elements, max_train_samples=args.max_train_samples,
            wiki_chunk_tokens=args.wiki_chunk_tokens, image_provider=provider, seed=args.seed,
            skip_invalid_boxes=args.skip_invalid_boxes)
        if len(dataset) == 0:
            raise InputError(f"the training set {args.dataset_name!r} is empty")
        return dataset, provider

    lm_config = agreed(accelerator, load, "config", main_first=True)
    sources = agreed(accelerator, check_sources)
    if "wiki" in sources and args.max_length < args.wiki_chunk_tokens + 2:
        logger.warning("--max_length %d cuts the %d-token WikiText chunks", args.max_length, args.wiki_chunk_tokens)
    # the tokenizer first only where the data needs it (WikiText): other data errors show without waiting for it
    tokenizer = agreed(accelerator, load, "tokenizer", main_first=True) if "wiki" in sources else None
    dataset, provider = agreed(accelerator, build, sources, tokenizer, main_first=True)
    if tokenizer is None:
        tokenizer = agreed(accelerator, load, "tokenizer", main_first=True)
    try:
        if model_kind(lm_config) == "masked" and tokenizer.mask_token_id is None:
            raise InputError(f"the tokenizer of the masked LM {args.model_name_or_path} has no mask token")
    except ValueError as err:  # not a supported model: said in full when the model loads
        logger.debug("model kind: %s", err)
    names = sources + (["--train_file"] if args.train_file else [])
    logger.info("training set: %d items from %s", len(dataset), " + ".join(names))
    return lm_config, tokenizer, dataset, provider


def load_pretrained(path: str):
    """``--pretrained_model``'s trainable weights, read and checked (finite) before any data or model loads."""
    from models.checkpoints.weights import load_state

    if not _pretrained_exists(path):
        raise InputError(f"--pretrained_model {path}: not found (also tried .bin)")
    return load_state(path)


def load_models(args, accelerator, lm_config, pretrained=None):
    """The frozen vision encoder and the model: LM frozen in --lm_dtype, mm_proj and fusion_layer in fp32.
    ``pretrained``: what ``models.checkpoints.weights.load_state`` read from ``--pretrained_model`` (checked first,
    before the LM loads)."""
    from models.checkpoints.weights import load_trainable
    from models.fusion.factory import load_late_fusion_model
    from models.vision import load_vision_encoder

    lm_dtype = resolve_lm_dtype(args.lm_dtype, accelerator.device)
    encoder = load_vision_encoder(args.vision_encoder, device=accelerator.device, dtype=lm_dtype)
    lm_kwargs = {"config": lm_config} if args.config_name else {}
    model = load_late_fusion_model(args.model_name_or_path, vision_dim=encoder.hidden_size,
                                   proj_hidden=args.proj_hidden, torch_dtype=lm_dtype,
                                   trust_remote_code=args.trust_remote_code, **lm_kwargs)
    model.mm_proj.float()
    model.fusion_layer.float()
    if pretrained is not None:
        load_trainable(model, args.pretrained_model, loaded=pretrained)
    return encoder, model.train()


def masked_lm_setup(args, model, encoder, tokenizer):
    """For a masked LM: the MLM masker, with ``--max_length`` cut to the text the fusion block can number
    after the visual prefix and the LM-state cache off (None for a causal LM)."""
    from PIL import Image

    from data.masking import MLMMasker

    if model.kind != "masked":
        return None
    n_visual = encoder.encode_images(encoder.pixels([Image.new("RGB", (64, 64))]))[0].shape[1]
    limit = model.max_positions - n_visual if model.max_positions else None
    if limit is not None and args.max_length > limit:
        logger.warning("--max_length %d: cut to %d, the positions the %s fusion block has left after %d visual "
                       "tokens", args.max_length, limit, model.model_type, n_visual)
        args.max_length = limit
    if args.cache_lm_states:
        logger.warning("--cache_lm_states: off for a masked LM, whose inputs are masked anew at every step")
        args.cache_lm_states = False
    logger.info("masked LM: MLM objective, masking probability %s", args.mlm_probability)
    return MLMMasker(tokenizer, args.mlm_probability)


def _run(args, step_callback) -> dict:
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import get_scheduler
    from transformers.utils import logging as hf_logging

    from data.captions import BadImageBudget, CaptionCollator, NoReadableImage, SkipBadImages
    from models.checkpoints.training_state import restore_training_checkpoint

    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if accelerator.is_local_main_process else logging.ERROR)
    hf_logging.set_verbosity_error()
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    resume_path = None
    if not args.pregenerate_images:  # which writes to the image cache only
        resume_path = agreed(accelerator, resolve_resume, args.resume_from_checkpoint, output_dir)
        agreed(accelerator, check_output_dir, args, resume_path)
    ckpt = None if resume_path is None else agreed(accelerator, read_resume_checkpoint, accelerator, resume_path)
    pretrained = None if args.pretrained_model is None else agreed(accelerator, load_pretrained, args.pretrained_model)
    lm_config, tokenizer, dataset, provider = prepare_data(args, accelerator)
    if args.pregenerate_images:
        stats = pregenerate_wiki_images(accelerator, dataset, provider)
        logger.info("image cache %s: %s", provider.cache.root, stats)
        return {"pregenerated": stats}
    config = run_config(args, accelerator, len(dataset))
    if ckpt is not None:
        agreed(accelerator, check_resume_config, args, ckpt, config)
    encoder, model = agreed(accelerator, load_models, args, accelerator, lm_config, pretrained)
    del pretrained
    if provider is not None and args.image_source == "retrieve":
        logger.info("retrieved the images of %d wiki prompts from %s",
                    prefetch_wiki_images(accelerator, dataset, provider, encoder), args.image_index)
    masker = masked_lm_setup(args, accelerator.unwrap_model(model), encoder, tokenizer)

    # Decoding, cropping, generation and CLIP preprocessing run in the workers. CUDA cannot be used in
    # forked workers, so inline wiki image generation on a GPU needs spawned ones.
    spawn = (provider is not None and args.image_source == "generate" and accelerator.device.type == "cuda"
             and args.num_workers > 0)  # retrieved images: the workers only read files
    train_dataloader = DataLoader(
        SkipBadImages(dataset), batch_size=args.per_device_train_batch_size, shuffle=args.shuffle_data,
        collate_fn=CaptionCollator(tokenizer, encoder.preprocess, max_length=args.max_length,
                                   add_eos=masker is None),  # a masked LM's tokenizer ends its texts itself
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
    budget = BadImageBudget(args.max_bad_images, len(dataset))
    if ckpt is not None:
        logger.info("resuming from %s", resume_path)
        agreed(accelerator, restore_training_checkpoint, ckpt, accelerator, model, optimizer, lr_scheduler)
        state.load_state_dict(ckpt["trainer_state"])
        budget.add(ckpt["trainer_state"]["images_seen"], ckpt["trainer_state"]["bad_images"])
        del ckpt

    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            clear_previous_run(args)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    if args.with_tracking:
        accelerator.init_trackers(TRACKER_PROJECT, _tracker_config(args), init_kwargs={
            "wandb": {"name": args.run_name, "dir": str(output_dir)}})
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("%d epochs, %d optimizer steps of %d samples (%d per device x %d processes x %d accumulation)",
                num_epochs, max_train_steps, total_batch, args.per_device_train_batch_size,
                accelerator.num_processes, args.gradient_accumulation_steps)
    run = _Run(args, accelerator, model, encoder, optimizer, train_dataloader, lr_scheduler, state, budget,
               config, resume_path, output_dir, masker)
    try:
        result = run.train(max_train_steps, num_epochs, total_batch, step_callback)
    except NoReadableImage as err:
        raise InputError(NoReadableImage.message_of(err)) from None
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result["model"] = accelerator.unwrap_model(model)
    result["bad_images"] = budget.bad
    return result


class _Run:
    """The training loop and what it saves (checkpoints, weights), for one invocation of :func:`main`."""

    def __init__(self, args, accelerator, model, encoder, optimizer, train_dataloader, lr_scheduler, state,
                 budget, config, resume_path, output_dir, masker=None):
        self.args, self.accelerator, self.model, self.encoder = args, accelerator, model, encoder
        self.masker = masker  # masked LMs: the MLM masking of each batch
        self.optimizer, self.train_dataloader, self.lr_scheduler = optimizer, train_dataloader, lr_scheduler
        self.state, self.budget, self.config = state, budget, config
        self.resume_path, self.output_dir = resume_path, output_dir
        self.last_saved = state.completed_steps if resume_path is not None else None  # step of the newest checkpoint

    def save_checkpoint(self) -> Path:
        from models.checkpoints.training_state import save_training_checkpoint

        trainer_state = {**self.state.state_dict(), "accumulation_step": self.accelerator.step,
                         "images_seen": self.budget.seen, "bad_images": self.budget.bad, "config": self.config}
        path = save_training_checkpoint(self.accelerator, self.output_dir, self.state.completed_steps,
                                        model=self.model, optimizer=self.optimizer, scheduler=self.lr_scheduler,
                                        trainer_state=trainer_state, total_limit=self.args.checkpoints_total_limit)
        self.last_saved = self.state.completed_steps
        return path

    def save_weights(self, epoch: int) -> Path:
        from models.checkpoints.weights import save_trainable

        args, accelerator = self.args, self.accelerator
        path = self.output_dir / f"{args.run_name}_{epoch}"
        if accelerator.is_main_process:
            run_args = {k: getattr(args, k) for k in RECORDED_ARGS}
            run_args.update(completed_steps=self.state.completed_steps, num_processes=accelerator.num_processes,
                            images_seen=self.budget.seen, bad_images=self.budget.bad,
                            resumed_from=None if self.resume_path is None else str(self.resume_path))
            save_trainable(accelerator.unwrap_model(self.model), path, base_model=args.model_name_or_path,
                           vision_encoder=args.vision_encoder, extra={"run_args": run_args})
            logger.info("saved trainable weights to %s", path)
        return path

    def count_images(self, seen: int, bad: int) -> None:
        """Add this optimizer step's image counts of every process; stop when too many images were bad."""
        import torch

        counts = torch.tensor([seen, bad], dtype=torch.long, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        self.budget.add(*(int(c) for c in counts.tolist()))
        if self.budget.exceeded():
            raise InputError(self.budget.message())

    def train(self, max_train_steps, num_epochs, total_batch, step_callback) -> dict:
        import torch
        from tqdm.auto import tqdm

        from data.masking import batch_seed
        from models.fusion.memo import HiddenStateMemo

        args, accelerator, model, state = self.args, self.accelerator, self.model, self.state
        optimizer, lr_scheduler, train_dataloader = self.optimizer, self.lr_scheduler, self.train_dataloader
        encoder = self.encoder
        params = accelerator.unwrap_model(model).trainable_parameters()
        memo = HiddenStateMemo(limit_bytes=2**62) if args.cache_lm_states else None
        losses, lrs, saved = [], [], []
        window_loss, window_steps = 0.0, 0
        bar = tqdm(total=max_train_steps, initial=state.completed_steps, desc="train", unit="step",
                   disable=not accelerator.is_local_main_process)
        started, steps_run = time.perf_counter(), 0
        try:
            for epoch in range(state.epoch, num_epochs):
                if state.completed_steps >= max_train_steps:
                    break
                model.train()
                train_dataloader.set_epoch(epoch)
                skip = state.batches_in_epoch if epoch == state.epoch else 0
                loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
                batch_index, micro_losses, seen, bad = skip, [], 0, 0
                for batch in loader:
                    batch_index += 1
                    if self.masker is not None:  # seeded by the batch's place in the run: a resume masks it alike
                        batch["input_ids"], batch["labels"] = self.masker(
                            batch["input_ids"], batch["labels"],
                            batch_seed(args.seed, epoch, batch_index, accelerator.process_index))
                    skipped = batch.pop("bad_images")
                    self.budget.log(skipped)
                    seen, bad = seen + len(batch["input_ids"]) + len(skipped), bad + len(skipped)
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

                    self.count_images(seen, bad)
                    seen, bad = 0, 0
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
                        window = torch.tensor(window_loss / window_steps, device=accelerator.device)
                        mean_loss = accelerator.reduce(window, reduction="mean").item()
                        if args.with_tracking:
                            accelerator.log({"train_loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0],
                                             "epoch": epoch, "samples_per_second": samples_per_s},
                                            step=state.completed_steps)
                        window_loss, window_steps = 0.0, 0
                    every = args.checkpointing_steps
                    if isinstance(every, int) and state.completed_steps % every == 0:
                        self.save_checkpoint()
                    if step_callback is not None:
                        step_callback(state.completed_steps)
                    if state.completed_steps >= max_train_steps:
                        break
                if args.checkpointing_steps == "epoch" and self.last_saved != state.completed_steps:
                    self.save_checkpoint()
                saved.append(self.save_weights(epoch))
        finally:  # a stop mid-run ends the progress bar's line before the error line
            bar.close()
        if not saved:  # resumed at the very end: nothing to train, but the run still ends with its weights
            saved.append(self.save_weights(max(state.epoch - 1, 0)))
        return {"losses": losses, "lrs": lrs, "completed_steps": state.completed_steps, "saved": saved,
                "max_train_steps": max_train_steps, "num_epochs": num_epochs}


if __name__ == "__main__":
    main()
