"""Command-line pieces every eval script shares: the common flags, list flags, their validation, and
one-line errors.

Every flag is checked when it is parsed (:func:`validate_args`), before any data or model is read and
before anything is written: numbers (finite, in range), ``--run_name`` (a plain folder name),
``--device`` (known and present), ``--data_dir``/``--data_file`` (exist, not both) and ``--output_dir``
(a writable folder, or one that can be made).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable

DTYPE_NAMES = ("bf16", "fp16", "fp32")


class EvalError(Exception):
    """Bad input: reported as one line, exit status 2."""


class NonFiniteScores(EvalError):
    """The model produced NaN or infinite values while scoring (e.g. NaN weights): never recorded."""


# Numeric flags and their ranges (low, high; None: unbounded), checked for every flag a parsed
# namespace holds, so that a script's own flags (e.g. --max_new_tokens) need only a line here.
# Floats must also be finite: NaN compares False with everything and would slip through a range.
NUMERIC_FLAGS: dict[str, tuple[float | None, float | None]] = {
    "k": (0, None),
    "limit": (1, None),
    "batch_size": (1, None),
    "proj_hidden": (1, None),
    "clip_temperature": (0.0, None),
    "image_size": (1, None),
    "num_inference_steps": (1, None),
    "guidance_scale": (None, None),
    "gen_batch_size": (1, None),
    "toyworld_noise": (0.0, 1.0),
    "max_new_tokens": (1, None),
    "dedup_threshold": (-1.0, 1.0),  # a cosine; 1 turns near-duplicate removal off
    "faiss_threshold": (0, None),
}


def check_numbers(args: argparse.Namespace, flags: dict = NUMERIC_FLAGS) -> None:
    """Every numeric flag of ``args`` named in ``flags`` is finite and within its range (None: unset)."""
    for name, (low, high) in flags.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise EvalError(f"--{name} must be a finite number, got {value}")
        if low is not None and value < low:
            raise EvalError(f"--{name} must be >= {low}, got {value}")
        if high is not None and value > high:
            raise EvalError(f"--{name} must be <= {high}, got {value}")


def check_run_name(name: str | None) -> None:
    """A run name is one plain folder name inside --output_dir: no separators, no '.'/'..', not absolute."""
    if name is None:
        return
    seps = [sep for sep in ("/", "\\", os.sep, os.altsep) if sep]
    if (not name.strip() or name in (".", "..") or any(sep in name for sep in seps) or "\0" in name
            or Path(name).is_absolute() or Path(name).drive):
        raise EvalError(f"--run_name {name!r} must be a plain folder name (no path separator, no '..'): "
                        "results go to OUTPUT_DIR/RUN_NAME")


def check_device(spec: str | None) -> None:
    """``--device`` names a device type torch knows and this machine has (cpu, cuda[:N], mps, xpu[:N])."""
    if spec is None:
        return
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise EvalError(f"unknown --device {spec!r}: use cpu, cuda or cuda:N") from None
    kind = device.type
    if kind == "cpu":
        return
    if kind in ("cuda", "xpu"):
        backend = getattr(torch, kind, None)
        n = backend.device_count() if backend is not None and backend.is_available() else 0
        if n == 0:
            raise EvalError(f"--device {spec}: no {kind.upper()} device is available on this machine; "
                            "use --device cpu")
        if device.index is not None and device.index >= n:
            raise EvalError(f"--device {spec}: this machine has {n} {kind.upper()} device(s) "
                            f"({kind}:0 to {kind}:{n - 1})")
        return
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise EvalError(f"--device {spec}: MPS is not available on this machine; use --device cpu")
        return
    raise EvalError(f"--device {spec}: {kind!r} devices are not supported; use cpu, cuda or cuda:N")


def check_output_dir(output_dir: str, run_name: str | None = None) -> None:
    """``OUTPUT_DIR/RUN_NAME`` is a folder, or can be made: its nearest existing ancestor is a writable
    folder (a file in the way would fail only after the models have loaded)."""
    target = Path(output_dir) / run_name if run_name else Path(output_dir)
    p = target
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise EvalError(f"--output_dir {output_dir}: {p} is {'a file' if p.exists() else 'a broken link'}, "
                        "not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise EvalError(f"--output_dir {output_dir}: {p} is not writable")


def validate_args(args: argparse.Namespace) -> None:
    """All checks of the common flags (and of the script flags named in ``NUMERIC_FLAGS``)."""
    check_numbers(args)
    if hasattr(args, "generate_images") and args.generate_images is None:
        # not given: images come with --image_source retrieve
        args.generate_images = getattr(args, "image_source", "generate") == "retrieve"
    if getattr(args, "generate_images", False) and getattr(args, "k", 1) < 1:
        raise EvalError(f"--k must be >= 1 when images are requested, got {args.k}")
    check_run_name(getattr(args, "run_name", None))
    if hasattr(args, "data_file"):
        check_data_source(args)
    check_device(getattr(args, "device", None))
    if getattr(args, "output_dir", None) is not None:
        check_output_dir(args.output_dir, getattr(args, "run_name", None))


class EvalArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that validates the flags it parsed (:func:`validate_args`)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        validate_args(parsed)
        return parsed, extras


def true_or_false(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "y", "on"):
        return True
    if v in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser(description: str, *, image_prompt_choices=("sentences", "full", "question"),
                 default_image_prompt: str = "sentences", default_k: int = 10) -> argparse.ArgumentParser:
    """The flags every eval script shares (released spellings kept as aliases)."""
    from models.images.flags import add_generation_args, add_retrieval_args
    from models.fusion.mixing import MIX_MODES

    p = EvalArgumentParser(description=description)
    g = p.add_argument_group("model")
    g.add_argument("--model_name", "--model_name_or_path", dest="model_name", default="gpt2",
                   help="causal or masked LM: hub id or local dir")
    g.add_argument("--pretrained_model", default=None,
                   help="trained fusion weights: a dir written by train.py, or a released .bin (suffix optional)")
    g.add_argument("--vision_encoder", default=None,
                   help="CLIP spec (default: the checkpoint's, else ViT-B-32-quickgelu/openai)")
    g.add_argument("--proj_hidden", type=int, default=None, help="projector width when no checkpoint is given")
    g = p.add_argument_group("images")
    g.add_argument("--generate_images", nargs="?", const=True, default=None, type=true_or_false,
                   help="fuse k images (a switch; '--generate_images True/False' also works; default: on "
                        "with --image_source retrieve, else off)")
    g.add_argument("--k", type=int, default=default_k, help="images per input")
    g.add_argument("--image_prompt", choices=image_prompt_choices, default=default_image_prompt,
                   help="how image prompts are derived from the input")
    add_generation_args(p)
    add_retrieval_args(p)
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
    g.add_argument("--data_dir", default=None,
                   help="folder of the benchmark's original files (default: the shipped files, else the hub)")
    g.add_argument("--data_file", default=None, help="one file of the benchmark in its original format")
    g.add_argument("--output_dir", default="output/results")
    g.add_argument("--run_name", default=None, help="results go to OUTPUT_DIR/RUN_NAME (default: a timestamp)")
    return p


def check_data_source(args: argparse.Namespace) -> None:
    """``--data_dir`` and ``--data_file`` exclude each other, and must exist when given."""
    from pathlib import Path

    if args.data_dir is not None and args.data_file is not None:
        raise EvalError("give --data_dir or --data_file, not both")
    if args.data_file is not None and not Path(args.data_file).is_file():
        raise EvalError(f"--data_file {args.data_file}: no such file")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise EvalError(f"--data_dir {args.data_dir}: no such folder")


def parse_choices(value: str, allowed, what: str) -> list[str]:
    """A comma-separated flag value, every item checked against ``allowed``."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise EvalError(f"unknown {what} {unknown[0] if unknown else value!r}; choose from {', '.join(allowed)}")
    return items


def one_line(message: object) -> str:
    """A message on one line (library errors often span several)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_main(main: Callable[[list[str] | None], dict], argv=None) -> dict:
    """Run a script's main and turn bad input into one line on stderr and exit status 2.

    Bad input is an :class:`EvalError`, a ``ValueError`` (malformed data, a checkpoint that does not
    fit; ``UnicodeDecodeError`` included) or an ``OSError`` (missing, unreadable or unwritable files).
    Run as the script itself (``python eval_scripts/x.py``), a finished run then ends the process at once
    (:func:`exit_now`): the interpreter's teardown of torch and transformers takes about a second.
    """
    try:
        result = main(argv)
    except (EvalError, ValueError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
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
