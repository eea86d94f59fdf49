"""Error agreement across ranks: bad input found on one process stops every process with the same message.

Under torchrun a rank that raised alone would leave the others waiting in their next collective; here the
lowest failing rank's message is shared, so rank 0 prints it and every rank exits with it.
"""
from __future__ import annotations

from models.distributed import BAD_INPUT
from models.training.errors import InputError


def share_error(accelerator, message: str | None) -> None:
    """Collective: when any process has an error ``message``, every process raises it as InputError.

    The lowest failing rank's message is shared (:func:`models.distributed.check_in`, the one collective of
    every agreement), so rank 0 can print it and no process is left waiting in a collective for a peer that
    has exited."""
    from models.distributed import RankFailure, check_in

    try:
        check_in(None if message is None else (message, BAD_INPUT))
    except RankFailure as failure:
        raise InputError(failure.message) from None


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

