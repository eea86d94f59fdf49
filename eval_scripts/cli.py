"""Command-line pieces every eval script shares: parsing and resolving its settings, the checks a value
alone cannot make, and one-line errors.

The options themselves are declared in :mod:`models.options` (the shared ones) and next to each script (its
own). :func:`parse_eval_args` parses them (command line over ``--config FILE.yaml`` over defaults), resolves
what depends on other settings (:func:`resolve_args`) and checks, before any data or model is read and before
anything is written: ``--run_name`` (a plain folder name), ``--device`` (known and present),
``--data_dir``/``--data_file`` (exist, not both) and ``--output_dir`` (a writable folder, or one that can be
made). The result is read-only: what a run records is what it used.
"""
from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

# Bad input: reported as one line, exit status 2. The same class as loading's and scoring's own
# (models/errors.py), so an error raised while scoring is an EvalError here.
from models.errors import InputError as EvalError
from models.errors import NonFiniteScores  # noqa: F401
from models.distributed import RankFailure

if TYPE_CHECKING:
    from models.options import Settings


def check_run_name(name: str | None) -> None:
    """A run name is one plain folder name inside --output_dir: no separators, no '.'/'..', not absolute."""
    from models.run_names import RULE, run_name_problem

    if name is not None and run_name_problem(name):
        raise EvalError(f"--run_name {name!r} must be {RULE}: results go to OUTPUT_DIR/RUN_NAME")


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


def resolve_args(args) -> "Settings":
    """The settings as the run uses and records them, from parsed (or hand-built) ones: a new object,
    ``args`` itself is not changed.

    * ``--generate_images`` not given: on with ``--image_source retrieve``, else off;
    * ``--vision_encoder`` not given: the one ``--pretrained_model``'s config.json names, else the default;
    * ``--run_name`` not given: a timestamp.
    """
    from models.options import DEFAULT_VISION_ENCODER, as_settings

    args = as_settings(args)
    changes = {}
    if hasattr(args, "generate_images") and args.generate_images is None:
        changes["generate_images"] = getattr(args, "image_source", "generate") == "retrieve"
    if hasattr(args, "vision_encoder") and args.vision_encoder is None:
        changes["vision_encoder"] = (checkpoint_vision_encoder(getattr(args, "pretrained_model", None))
                                     or DEFAULT_VISION_ENCODER)
    if hasattr(args, "run_name") and args.run_name is None:
        changes["run_name"] = _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    return args.replace(**changes) if changes else args


def checkpoint_vision_encoder(pretrained_model: str | None) -> str | None:
    """The vision encoder a train.py checkpoint (a folder or a hub id) names in its config.json (None for a
    released .bin)."""
    if not pretrained_model:
        return None
    from models.checkpoints.config_file import CheckpointError, read_checkpoint_config
    from models.checkpoints.locate import locate_checkpoint

    try:
        folder = locate_checkpoint(pretrained_model)  # a hub id ORG/NAME: its downloaded snapshot
        if not folder.is_dir():
            return None
        spec = read_checkpoint_config(folder).get("vision_encoder")
    except (CheckpointError, OSError) as err:
        raise EvalError(f"--pretrained_model {pretrained_model}: {err}") from None
    return spec if isinstance(spec, str) and spec else None


def validate_args(args, options=()) -> None:
    """The checks a parsed value alone cannot make (every value was checked against its declaration when
    parsed; with ``options``, a namespace built by hand is checked against those declarations here too): k
    with images, the run name, the data source, the device and the output folder."""
    from models.options import OptionError, check_settings

    try:
        check_settings(args, options)
    except OptionError as err:
        raise EvalError(str(err)) from None
    if getattr(args, "generate_images", False) and getattr(args, "k", 1) < 1:
        raise EvalError(f"--k must be >= 1 when images are requested, got {args.k}")
    check_run_name(getattr(args, "run_name", None))
    if hasattr(args, "data_file"):
        check_data_source(args)
    check_device(getattr(args, "device", None))
    if getattr(args, "output_dir", None) is not None:
        check_output_dir(args.output_dir, getattr(args, "run_name", None))


def parse_eval_args(options, argv=None, description: str = "", resolve=None) -> "Settings":
    """An eval script's settings: its ``options`` parsed (command line over ``--config`` over defaults),
    resolved (:func:`resolve_args`, then the script's own ``resolve(settings) -> settings``) and checked.
    Bad input is an ``EvalError`` or ``ValueError``: one line and exit status 2 through :func:`run_main`."""
    from models.options import parse

    args = resolve_args(parse(options, argv, description=description, raise_errors=True))
    if resolve is not None:
        args = resolve(args)
    validate_args(args, options)
    return args


def option_parser(options, description: str = ""):
    """The argparse parser of ``options`` (``--help``; the suite reads its flags)."""
    from models.options import build_parser

    return build_parser(options, description)


def check_data_source(args) -> None:
    """``--data_dir`` and ``--data_file`` exclude each other, and must exist when given."""
    from pathlib import Path

    if args.data_dir is not None and args.data_file is not None:
        raise EvalError("give --data_dir or --data_file, not both")
    if args.data_file is not None and not Path(args.data_file).is_file():
        raise EvalError(f"--data_file {args.data_file}: no such file")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise EvalError(f"--data_dir {args.data_dir}: no such folder")


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
    except (EvalError, ValueError, OSError, RankFailure) as e:
        stop_every_rank(e)
    except Exception as e:
        from models.distributed import world

        if world()[1] == 1:
            raise  # one process: a bug keeps its traceback
        import traceback

        traceback.print_exc()
        stop_every_rank(e)
    if argv is None and getattr(sys.modules.get("__main__"), "main", None) is main:
        exit_now(0)
    return result


def stop_every_rank(err: BaseException):
    """End this process for ``err`` with the line and exit status every rank agrees on
    (:mod:`models.distributed`): rank 0 prints it, the others exit quietly with the same status."""
    from models.distributed import agree_on, close, report

    failure = agree_on(err, (EvalError,))
    report(failure)
    close()
    raise SystemExit(failure.status) from None


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
