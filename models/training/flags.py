"""The flags of train.py and their checks at parse time (argparse: one `error: ...` line, exit status 2)."""
from __future__ import annotations

import argparse
from pathlib import Path

from models.cli import (OneLineArgumentParser, finite_float, non_negative_int, positive_int,
                        seed as seed_type)

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
LM_DTYPES = ("bf16", "fp16", "fp32")  # torch loads only when training starts: --help needs none


def _checkpointing_steps(text: str) -> int | str:
    if text == "epoch":
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"must be a positive integer or 'epoch', got {text!r}")


def build_parser():
    from models.images.generation import add_generation_args
    from models.images.sources import add_retrieval_args

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
    from models.images.generation import check_generation_args

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

