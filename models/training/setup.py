"""Setting up a run from its flags: the accelerator, the training data, the models (frozen LM and vision
encoder, trainable projector and fusion block), the masked-LM objective, the DataLoader and the optimiser.

Every function here runs before the first step and before anything is written; bad input is an InputError,
and what may fail on one process only runs under :func:`models.training.ranks.agreed`.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from models.training.errors import InputError
from models.training.ranks import agreed
from models.training.wiki_images import build_image_provider

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("train")  # one logger for the whole run: its lines read "train: ..."


def make_accelerator(args):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

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
    refused = checkpoint_refusal(accelerator)
    if refused and (args.checkpointing_steps or args.resume_from_checkpoint):
        raise InputError(f"checkpoints are written for one process, DDP or FSDP2, not {refused}: drop "
                         "--checkpointing_steps/--resume_from_checkpoint, or use DDP or FSDP2 (fsdp_version: 2)")
    return accelerator


def checkpoint_refusal(accelerator) -> str | None:
    """What this run's sharding is when its training checkpoints cannot be written or resumed, else None.

    One process, DDP and FSDP2 checkpoint (FSDP2's shards of the trainable part and of its optimizer
    state are gathered into the same files, :mod:`models.checkpoints.training_state`); FSDP1's flat
    parameters, DeepSpeed (not installed here, so never tested) and Megatron-LM do not."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        return None if version == 2 else f"FSDP version {version}"
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        return str(kind)
    return None


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


def _pretrained_exists(path: str) -> bool:
    from models.checkpoints.locate import is_hub_id

    p = Path(path)
    return p.exists() or p.with_name(p.name + ".bin").is_file() or is_hub_id(path)  # a hub id: downloaded


def resolve_lm_dtype(name: str, device: "torch.device") -> "torch.dtype":
    """The frozen LM's dtype: ``--lm_dtype``, ``auto`` by the table's ``AUTO_LM`` rule."""
    from models.options.dtypes import AUTO_LM, resolve, torch_dtype

    return torch_dtype(resolve(name, device, AUTO_LM))


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
    """``(masker, settings)``: for a masked LM, the MLM masker and the settings it trains with: ``--max_length``
    cut to the text the fusion block can number after the visual prefix, and the LM-state cache off, each said
    in a warning (a new settings object: the parsed one is not changed). For a causal LM: ``(None, args)``."""
    from PIL import Image

    from data.masking import MLMMasker

    if model.kind != "masked":
        return None, args
    n_visual = encoder.encode_images(encoder.pixels([Image.new("RGB", (64, 64))]))[0].shape[1]
    limit = model.max_positions - n_visual if model.max_positions else None
    if limit is not None and args.max_length > limit:
        logger.warning("--max_length %d: cut to %d, the positions the %s fusion block has left after %d visual "
                       "tokens", args.max_length, limit, model.model_type, n_visual)
        args = args.replace(max_length=limit)
    if args.cache_lm_states:
        logger.warning("--cache_lm_states: off for a masked LM, whose inputs are masked anew at every step")
        args = args.replace(cache_lm_states=False)
    logger.info("masked LM: MLM objective, masking probability %s", args.mlm_probability)
    return MLMMasker(tokenizer, args.mlm_probability), args



def build_dataloader(args, accelerator, dataset, tokenizer, encoder, provider, masker):
    """The training DataLoader (not yet prepared by Accelerate). Decoding, cropping, generation and CLIP
    preprocessing run in its workers."""
    import torch
    from torch.utils.data import DataLoader

    from data.captions import CaptionCollator, SkipBadImages

    # CUDA cannot be used in forked workers, so inline wiki image generation on a GPU needs spawned ones.
    spawn = (provider is not None and args.image_source == "generate" and accelerator.device.type == "cuda"
             and args.num_workers > 0)  # retrieved images: the workers only read files
    return DataLoader(
        SkipBadImages(dataset), batch_size=args.per_device_train_batch_size, shuffle=args.shuffle_data,
        collate_fn=CaptionCollator(tokenizer, encoder.preprocess, max_length=args.max_length,
                                   add_eos=masker is None),  # a masked LM's tokenizer ends its texts itself
        num_workers=args.num_workers, pin_memory=accelerator.device.type == "cuda",
        multiprocessing_context="spawn" if spawn else None,
        # a private generator keeps the global RNG (dropout) independent of the data loading
        generator=torch.Generator().manual_seed(args.seed))


def build_optimizer(args, accelerator, model, train_dataloader):
    """AdamW over the trainable parameters and its learning-rate schedule (not yet prepared by Accelerate).

    Returns ``(optimizer, lr_scheduler, max_train_steps)``."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    # Lengths in optimizer steps. The prepared scheduler steps num_processes times per optimizer step.
    batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                                 num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    return optimizer, lr_scheduler, max_train_steps
