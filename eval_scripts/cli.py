"""Command-line pieces every eval script shares: the common flags, list flags, and one-line errors."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

DTYPE_NAMES = ("bf16", "fp16", "fp32")


class EvalError(Exception):
    """Bad input: reported as one line, exit status 2."""


def bool_word(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "y", "on"):
        return True
    if v in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser(description: str, *, image_prompt_choices=("sentences", "full", "question"),
                 default_image_prompt: str = "sentences", default_k: int = 10) -> argparse.ArgumentParser:
    """The flags every eval script shares (released spellings kept as aliases)."""
    from models.image_generation import add_generation_args
    from models.mixing import MIX_MODES

    p = argparse.ArgumentParser(description=description)
    g = p.add_argument_group("model")
    g.add_argument("--model_name", "--model_name_or_path", dest="model_name", default="gpt2",
                   help="causal LM: hub id or local dir")
    g.add_argument("--pretrained_model", default=None,
                   help="trained fusion weights: a dir written by train.py, or a released .bin (suffix optional)")
    g.add_argument("--vision_encoder", default=None,
                   help="CLIP spec (default: the checkpoint's, else ViT-B-32-quickgelu/openai)")
    g.add_argument("--proj_hidden", type=int, default=None, help="projector width when no checkpoint is given")
    g = p.add_argument_group("images")
    g.add_argument("--generate_images", nargs="?", const=True, default=False, type=bool_word,
                   help="fuse k generated images (a switch; '--generate_images True/False' also works)")
    g.add_argument("--k", type=int, default=default_k, help="images per input")
    g.add_argument("--image_prompt", choices=image_prompt_choices, default=default_image_prompt,
                   help="how image prompts are derived from the input")
    add_generation_args(p)
    g = p.add_argument_group("mixing")
    g.add_argument("--mix", choices=MIX_MODES, default="logits",
                   help="logits: average weighted logits (the released code); probs: the paper's Eq. 2")
    g.add_argument("--clip_temperature", type=float, default=2.0, help="tau in s_i = tau * max(0, cos)")
    g.add_argument("--uniform_weights", "--no_clip_rescaling", dest="uniform_weights", action="store_true",
                   help="weight every image 0.5 instead of by CLIP agreement")
    g = p.add_argument_group("run")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples (per subset)")
    g.add_argument("--batch_size", type=int, default=8, help="texts per forward pass")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: accelerator's choice)")
    g.add_argument("--dtype", choices=("auto", *DTYPE_NAMES), default="auto",
                   help="frozen LM and CLIP dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--seed", type=int, default=0, help="base seed of every generated image")
    g.add_argument("--data_dir", default=None, help="local data in the original format (default: the hub)")
    g.add_argument("--output_dir", default="output/results")
    g.add_argument("--run_name", default=None, help="results go to OUTPUT_DIR/RUN_NAME (default: a timestamp)")
    return p


def parse_choices(value: str, allowed, what: str) -> list[str]:
    """A comma-separated flag value, every item checked against ``allowed``."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise EvalError(f"unknown {what} {unknown[0] if unknown else value!r}; choose from {', '.join(allowed)}")
    return items


def run_main(main: Callable[[list[str] | None], dict], argv=None) -> dict:
    """Run a script's main and turn bad input into one line on stderr and exit status 2.

    Run as the script itself (``python eval_scripts/x.py``), a finished run then ends the process at once
    (:func:`exit_now`): the interpreter's teardown of torch and transformers takes about a second."""
    try:
        result = main(argv)
    except (EvalError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if argv is None and getattr(sys.modules.get("__main__"), "main", None) is main:
        exit_now(0)
    return result


def exit_now(status: int = 0) -> None:
    """End the process as a normal exit would, minus the interpreter's teardown: non-daemon threads are
    joined and the ``atexit`` handlers run (the cache writer's flush, logging's), the standard streams
    are flushed; the final garbage collection and module-by-module teardown are skipped."""
    import atexit
    import os
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
