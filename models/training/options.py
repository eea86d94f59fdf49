"""train.py's options, declared once (:mod:`models.options`), and the settings a training run resolves from
them before anything loads.

The image, vision and seed options are the very declarations the eval scripts use, so a range is the same
everywhere (``--guidance_scale -1`` is refused by both). Options declared ``results`` are the ones a resume
must share (the checkpoint records them, see :func:`models.training.run_config.run_config`).
"""
from __future__ import annotations

import sys
from pathlib import Path

from models.cli import is_rank0
from models.options import Option, catalog
from models.options.dtypes import AUTO_LM, AUTO_RULES, DTYPE_CHOICES
from models.workers import capped_workers

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISION = ("no", "bf16", "fp16")
DESCRIPTION = "Train the late-fusion projector and fusion block (LM and CLIP frozen)."


def _checkpointing_problem(value) -> str | None:
    return None if value == "epoch" or value >= 1 else f"must be a positive integer or 'epoch', got {value!r}"


RUN = (
    catalog.RUN_NAME.replace(default="test", help="name of the saved weights: <output_dir>/<run_name>_<epoch> (a plain "
                                                  "folder name)"),
    Option("output_dir", required=True, path=True, group="run"),
    Option("overwrite_output_dir", kind="flag", default=False, record=False, group="run",
           help="start a new run in an --output_dir that holds checkpoints or this run's weights, deleting them "
                "(without it, such a run is refused)"),
    catalog.SEED.replace(default=42, help="seeds every RNG, the data order and the wiki images", group="run"),
    Option("with_tracking", kind="flag", default=False, group="run", help="log loss and lr to --report_to"),
    Option("report_to", default="wandb", group="run", help="wandb, tensorboard, all, or a comma-separated list"),
    Option("logging_steps", kind="int", low=1, default=10, group="run"),
    Option("checkpointing_steps", kind="int", words=("epoch",), check=_checkpointing_problem, group="run",
           help="save the training state every N optimizer steps, or 'epoch'"),
    Option("checkpoints_total_limit", kind="int", low=1, group="run",
           help="keep at most this many checkpoint-<step> folders (the oldest are deleted once a newer one is "
                "complete)"),
    Option("resume_from_checkpoint", record=False, path=True, group="run",
           help="a checkpoint-<step> folder, or 'latest' (the newest complete one in --output_dir, if any)"),
    Option("ignore_config_mismatch", kind="flag", default=False, record=False, group="run",
           help="resume even when the checkpoint was made with other result-changing settings"),
)

MODELS = (
    Option("model_name_or_path", required=True, results=True, path=True, group="models",
           help="the frozen LM (hub id or local dir): a causal LM, or a masked LM (trained with the MLM objective, "
                "see --mlm_probability)"),
    Option("config_name", results=True, path=True, group="models",
           help="LM config, if not the one of --model_name_or_path"),
    Option("tokenizer_name", results=True, path=True, group="models",
           help="tokenizer, if not the one of --model_name_or_path"),
    Option("use_slow_tokenizer", kind="flag", default=False, group="models"),
    Option("trust_remote_code", kind="flag", default=False, group="models"),
    Option("low_cpu_mem_usage", kind="flag", default=False, group="models",
           help="accepted as the release wrote it; transformers 5 always loads weights lazily"),
    catalog.VISION_ENCODER.replace(group="models", help=f"CLIP spec (default: {catalog.DEFAULT_VISION_ENCODER})"),
    catalog.PROJ_HIDDEN.replace(group="models"),
    catalog.PRETRAINED_MODEL.replace(group="models", help="start from these trainable weights (our folder or a "
                                                          "released .bin, with or without .bin)"),
)

DATA = (
    Option("dataset_name", results=True, group="data",
           help="sources by substring: cropped_vg, wiki, laion_220, laion_220_short (e.g. wiki_laion_220)"),
    Option("vg_dir", results=True, path=True, group="data",
           help="folder with region_descriptions.json, image_data.json and the images"),
    Option("laion_file", results=True, path=True, group="data",
           help="LAION-220 captions: local parquet/jsonl/csv or a hub id"),
    Option("laion_image_root", results=True, path=True, group="data",
           help="folder holding the COCO/LVIS images of LAION-220"),
    Option("wiki_file", results=True, path=True, group="data", help="WikiText: local text/parquet file or a hub id"),
    Option("wiki_num", kind="choice", choices=(2, 103), default=103, results=True, group="data",
           help="WikiText-2 or WikiText-103 when --wiki_file is a hub id (the default one)"),
    Option("wiki_chunk_tokens", kind="int", low=1, default=447, results=True, group="data"),
    Option("train_file", results=True, path=True, group="data",
           help="extra JSONL/CSV source with image, caption and optional crop"),
    Option("max_elements", kind="int", low=1, results=True, group="data", help="at most this many WikiText chunks"),
    Option("max_train_samples", kind="int", low=1, results=True, group="data",
           help="at most this many items per source"),
    Option("shuffle_data", kind="flag", default=False, results=True, group="data",
           help="shuffle the training set each epoch (seeded); the released default is file order"),
    Option("skip_invalid_boxes", kind="flag", default=False, results=True, group="data",
           help="skip Visual Genome regions whose box lies outside the image instead of failing"),
    Option("max_bad_images", kind="float", low=0.0, high=1.0, default=0.01, group="data",
           help="stop when more than this fraction of the training images seen so far cannot be read (unreadable "
                "images are skipped, counted and logged once; the fraction is taken over at least the first "
                "min(training set size, 1000) images)"),
    Option("max_length", kind="int", low=1, default=512, spellings=("--max_seq_length",), results=True,
           group="data", help="tokens per text, EOS included (WikiText chunks need wiki_chunk_tokens + 2)"),
    catalog.NUM_WORKERS.replace(group="data"),
    Option("mlm_probability", kind="float", low=0.0, high=1.0, low_open=True, default=0.15, results=True,
           check=lambda v: None if v < 1.0 else f"must lie strictly between 0 and 1, got {v}", group="data",
           help="masked LMs: the share of caption tokens masked for the MLM loss (BERT's 0.15; the first release "
                "used 0.2), strictly between 0 and 1"),
    Option("pregenerate_images", kind="flag", default=False, record=False, group="data",
           help="fill --image_cache with the images of the wiki chunks, then exit"),
    Option("cache_lm_states", kind="flag", default=False, group="data",
           help="keep the frozen LM's hidden states of every distinct training text in memory and reuse them (a "
                "large speed-up when texts repeat, as in the demo; memory grows with the data)"),
)

OPTIMISATION = (
    Option("per_device_train_batch_size", kind="int", low=1, default=8, results=True, group="optimisation"),
    Option("gradient_accumulation_steps", kind="int", low=1, default=1, results=True, group="optimisation"),
    Option("learning_rate", kind="float", low=0.0, low_open=True, default=5e-5, results=True, group="optimisation"),
    Option("weight_decay", kind="float", low=0.0, default=0.0, results=True, group="optimisation"),
    Option("lr_scheduler_type", kind="choice", choices=SCHEDULERS, default="linear", results=True,
           group="optimisation"),
    Option("num_warmup_steps", kind="int", low=0, default=0, results=True, group="optimisation",
           help="in optimizer steps"),
    Option("num_train_epochs", kind="int", low=1, default=1, results=True, group="optimisation"),
    Option("max_train_steps", kind="int", low=1, results=True, group="optimisation",
           help="overrides --num_train_epochs"),
    Option("max_grad_norm", kind="float", low=0.0, low_open=True, results=True, group="optimisation",
           help="clip the gradient norm (off by default)"),
)

def _percentage_problem(value) -> str | None:
    return None if value < 100 else f"must lie strictly between 0 and 100, got {value:g}"


VALIDATION = (  # models/training/validation.py
    Option("validation_file", path=True, group="validation",
           help="held-out captions in --train_file's format (JSONL/CSV: image, caption, optional crop and prompt): "
                "the fused model's and the text-only LM's mean loss on them is measured every --eval_steps and at "
                "the end"),
    Option("validation_split_percentage", kind="float", low=0.0, low_open=True, check=_percentage_problem,
           results=True, group="validation",
           help="hold out this percentage of the training set (drawn with --seed, at least one item) as the "
                "validation captions instead of --validation_file"),
    Option("eval_steps", kind="int", low=1, group="validation",
           help="measure the validation loss every N optimizer steps (it is always measured at the end)"),
    Option("per_device_eval_batch_size", kind="int", low=1, default=8, group="validation",
           help="captions per validation batch and process (the losses do not depend on it)"),
)

PRECISION = (
    Option("mixed_precision", kind="choice", choices=MIXED_PRECISION, results=True, group="precision and device",
           help="autocast for the trainable modules (default: Accelerate's config)"),
    Option("run_bf16", kind="flag", default=False, group="precision and device",
           help="the released spelling of --mixed_precision bf16"),
    Option("lm_dtype", kind="choice", choices=DTYPE_CHOICES, default="auto", results=True,
           group="precision and device", help=f"dtype of the frozen LM and vision encoder ({AUTO_RULES[AUTO_LM]})"),
    catalog.DEVICE.replace(group="precision and device",
                           help="cpu or cuda (default: Accelerate's choice, the CPU when no accelerator is present)"),
)


def _hub_id_problem(value: str) -> str | None:
    from models.checkpoints.locate import looks_like_hub_id

    return None if looks_like_hub_id(value) else f"must be a hub id ORG/NAME, got {value!r}"


HUB = (
    Option("push_to_hub", kind="flag", default=False, record=False, group="hub",
           help="at the end, upload the final weights folder (with its model card) to --hub_model_id"),
    Option("hub_model_id", check=_hub_id_problem, record=False, group="hub", help="the hub repo to push to, ORG/NAME"),
    Option("hub_private_repo", kind="flag", default=False, record=False, group="hub",
           help="create the hub repo private"),
)

OPTIONS = (*RUN, *MODELS, *DATA, *catalog.GENERATION, *catalog.RETRIEVAL, *OPTIMISATION, *VALIDATION, *PRECISION, *HUB)


def resolve(args):
    """The settings the run uses, from the parsed ones (a new object): the vision encoder's default,
    ``--run_bf16`` as ``--mixed_precision bf16``, ``--num_workers`` at most the CPU count. Bad combinations are a ``ValueError`` (one line)."""
    changes = {}
    if args.vision_encoder is None:
        changes["vision_encoder"] = catalog.DEFAULT_VISION_ENCODER
    if args.run_bf16:
        if args.mixed_precision not in (None, "bf16"):
            raise ValueError(f"--run_bf16 conflicts with --mixed_precision {args.mixed_precision}")
        changes["mixed_precision"] = "bf16"
    if args.device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device {args.device}: train.py takes cpu or cuda (Accelerate places each process)")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} exists and is not a directory")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise ValueError("--overwrite_output_dir and --resume_from_checkpoint exclude each other")
    if args.validation_file is not None and args.validation_split_percentage is not None:
        raise ValueError("--validation_file and --validation_split_percentage exclude each other")
    if args.validation_file is not None and not Path(args.validation_file).is_file():
        raise ValueError(f"--validation_file {args.validation_file} not found")
    if args.eval_steps is not None and args.validation_file is None and args.validation_split_percentage is None:
        raise ValueError("--eval_steps needs validation captions: --validation_file or --validation_split_percentage")
    workers, warning = capped_workers(args.num_workers)
    if warning is not None:  # once, from rank 0: PyTorch would warn at every epoch's first batch instead
        changes["num_workers"] = workers
        if is_rank0():
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    if args.push_to_hub:  # refused now, not after the training
        from models.hub import hub_offline

        if args.hub_model_id is None:
            raise ValueError("--push_to_hub needs --hub_model_id ORG/NAME")
        if hub_offline():
            raise ValueError("--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it or leave "
                             "out --push_to_hub")
    return args.replace(**changes) if changes else args


def check_environment(args) -> None:
    """What only this machine can say (a ``ValueError`` line each): CUDA asked for but absent, trackers
    unknown or not installed."""
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = [r.strip() for r in args.report_to.split(",") if r.strip()]
    unknown = [n for n in names if n not in LoggerType.list()]
    if unknown or not names:
        raise ValueError(f"--report_to {args.report_to!r}: choose from {', '.join(LoggerType.list())}")
    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n != "all" and n not in available]
    if args.with_tracking and missing:
        raise ValueError(f"--report_to {missing[0]}: the package is not installed (installed trackers: "
                         f"{', '.join(sorted(available)) or 'none'})")


def parse_args(argv=None):
    """train.py's settings: parsed (command line over ``--config`` over defaults), resolved and checked before
    anything is read or written; bad input is one ``error: ...`` line and exit status 2 (rank 0 prints it)."""
    from models.options import OptionsParser, build_parser, parse

    parser = build_parser(OPTIONS, DESCRIPTION)
    args = parse(OPTIONS, argv, parser=parser)
    try:
        args = resolve(args)
        check_environment(args)
    except ValueError as err:
        OptionsParser.error(parser, str(err))
    return args
